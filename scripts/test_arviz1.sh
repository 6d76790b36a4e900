#!/usr/bin/env bash
# Run tests/arviz1 (the ArviZ adapter and the VI reports) against ArviZ 1.x.
#
# ArviZ 1.x (DataTree; arviz-base/arviz-stats/arviz-plots) needs Python >= 3.12. These tests
# need only NumPy, SciPy, matplotlib and ArviZ (no torch, no Pyro), so they run in a separate
# Python 3.12 virtualenv, created on first use in $ARVIZ1_VENV (default .venv/arviz1-py312,
# inside the git- and ruff-ignored .venv folder).
# Without a Python 3.12 (on PATH as python3.12, or under pyenv) it prints SKIP and exits 0.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
    local candidate
    if command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" >/dev/null 2>&1; then
        command -v python3.12
        return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        for candidate in "$(pyenv root)"/versions/3.12*/bin/python; do
            if [ -x "$candidate" ]; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    return 1
}

if ! python312="$(find_python312)"; then
    echo "SKIP tests/arviz1: no Python 3.12 found (python3.12 or \$(pyenv root)/versions/3.12*)"
    exit 0
fi

venv="${ARVIZ1_VENV:-.venv/arviz1-py312}"
if [ ! -x "$venv/bin/python" ]; then
    "$python312" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "arviz>=1,<2" numpy scipy matplotlib pytest
"$venv/bin/python" -c "import arviz, sys; sys.exit(int(arviz.__version__.split('.')[0]) < 1)" || {
    echo "tests/arviz1: $venv holds ArviZ < 1; remove it and run again" >&2
    exit 1
}
# --confcutdir keeps pytest from loading tests/conftest.py, which imports torch and Pyro.
"$venv/bin/python" -m pytest -q -p no:cacheprovider --confcutdir tests/arviz1 tests/arviz1 "$@"
