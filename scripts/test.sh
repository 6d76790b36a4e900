#!/usr/bin/env bash
# The README's test command: set up .venv, lint, build the documentation site strictly
# (nitpicky, warnings are errors: a broken cross-reference fails; offline), run the unit suite
# (and the ArviZ 1.x adapter tests when a Python 3.12 is available). Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m sphinx -n -W --keep-going -q -b html docs docs/_build/html
.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
if [ -f scripts/test_arviz1.sh ]; then
    bash scripts/test_arviz1.sh
fi
