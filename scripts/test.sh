#!/usr/bin/env bash
# The README's test command: set up .venv, lint, run the unit suite (and the ArviZ 1.x
# adapter tests when a Python 3.12 is available). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
if [ -f scripts/test_arviz1.sh ]; then
    bash scripts/test_arviz1.sh
fi
