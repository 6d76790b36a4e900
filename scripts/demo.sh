#!/usr/bin/env bash
# The README's main job: set up .venv and run the quickstart demo (a few minutes on 2 cores);
# it prints its tables and writes its figures to demo_output/ (or --outdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh examples
.venv/bin/python examples/quickstart.py "$@"
