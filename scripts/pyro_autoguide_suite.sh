#!/usr/bin/env bash
# Pyro's own autoguide tests (tests/infer/test_autoguide.py, test_predictive.py,
# autoguide/test_inference.py) with pyro-flowvi's eight guides added to every guide-class
# parametrization, Pyro's assertions unchanged, float64 and warnings as errors as Pyro's
# conftest and setup.cfg set them. Not part of CI; see docs/guides.md for the last tally.
#
# Usage: bash scripts/pyro_autoguide_suite.sh [pytest arguments...]
#
# Environment:
#   PYRO_SRC   where Pyro's tests come from: a source tree, a clone, or a bare git directory.
#              Default: fetch PYRO_REF from PYRO_GIT_URL with git (Pyro's
#              sdist on PyPI ships no tests/infer, so git is the only reproducible source).
#   PYRO_GIT_URL  the repository to fetch from (default https://github.com/pyro-ppl/pyro).
#   PYRO_REF   the Pyro commit or tag (default: the commit the docs' tally was measured at;
#              release 1.9.1's test_serialization calls torch.load without weights_only=False,
#              which torch >= 2.6 refuses for every guide, Pyro's included).
#   SUITE_DIR  scratch folder for the patched copy (replaced; default: a new temp folder).
#   PYTHON     the interpreter with torch, pyro-ppl and pytest (default: .venv/bin/python).
#   ONLY_FLOWVI=0  also run Pyro's own guides (default 1: only the tests of our guides).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
ref="${PYRO_REF:-ff6ae1c9572591791aae8842bcd702fcf0b46fd6}"
suite="${SUITE_DIR:-$(mktemp -d)/pyro_autoguide_suite}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Pyro's files, at a fixed commit.
src="$work/pyro"
mkdir -p "$src"
paths=(setup.cfg tests)
if [ -z "${PYRO_SRC:-}" ]; then
    git -C "$src" init -q
    git -C "$src" fetch -q --depth 1 "${PYRO_GIT_URL:-https://github.com/pyro-ppl/pyro}" "$ref"
    git -C "$src" archive FETCH_HEAD "${paths[@]}" | tar -x -C "$src"
elif [ -f "$PYRO_SRC/HEAD" ] && [ -d "$PYRO_SRC/objects" ]; then  # a bare git directory
    git --git-dir="$PYRO_SRC" archive "$ref" "${paths[@]}" | tar -x -C "$src"
elif [ -e "$PYRO_SRC/.git" ]; then  # a clone
    git -C "$PYRO_SRC" archive "$ref" "${paths[@]}" | tar -x -C "$src"
else  # a plain source tree, used as it is
    src="$PYRO_SRC"
fi

# 2. A patched copy with our guides added (Pyro's code never enters this repository).
"$python" "$root/scripts/pyro_autoguide_suite.py" prepare --pyro-src "$src" --out "$suite"

# 3. Run it from the copy, importing pyro_flowvi from this checkout.
cd "$suite"
select=()
if [ "${ONLY_FLOWVI:-1}" = 1 ]; then
    select=(-k flowvi)
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import pyro, pyro_flowvi, torch; print('pyro', pyro.__version__, 'torch', \
torch.__version__, 'pyro_flowvi from', pyro_flowvi.__file__)"
status=0
"$python" -m pytest -q -p no:cacheprovider "${select[@]}" --junitxml="$suite/junit.xml" \
    tests/infer/test_autoguide.py tests/infer/test_predictive.py \
    tests/infer/autoguide/test_inference.py "$@" || status=$?
"$python" "$root/scripts/pyro_autoguide_suite.py" tally "$suite/junit.xml"
echo "patched copy and junit.xml: $suite"
exit "$status"
