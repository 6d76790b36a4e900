#!/usr/bin/env bash
# Shared set-up for the README commands: a local virtualenv with the CPU build of torch
# installed first (an unpinned torch would pull a multi-GB CUDA build), then this package.
# Usage: source scripts/_venv.sh EXTRA   (EXTRA: "test" or "examples")
set -euo pipefail
extra="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extra}]"
