#!/usr/bin/env bash
# The README's main job: set up .venv and run the quickstart demo (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh examples
.venv/bin/python examples/quickstart.py "$@"
