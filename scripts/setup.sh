#!/usr/bin/env bash
# Set up .venv with the tested versions (constraints.txt) and hookengine installed.
# torch comes first and pinned: 2.13.0 is a CPU build that installs from local disk here;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints.txt torch 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[all,test]" 2>&1 | grep -v "^WARNING: Location" || true
# tensorboard comes with the "track" extra (in "all"): the tracker tests read its event files back.
.venv/bin/python -c "import hookengine, torch, tensorboard; print('hookengine', hookengine.__version__, 'torch', torch.__version__, 'tensorboard', tensorboard.__version__)"
