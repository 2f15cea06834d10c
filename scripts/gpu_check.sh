#!/usr/bin/env bash
# On a machine with one CUDA GPU: run the GPU-only tests and the benchmarks, and write
# their figures to gpu_figures.txt (or $OUT/gpu_figures.txt). Takes a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_FILE="${OUT:-.}/gpu_figures.txt"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KERAS_BACKEND=torch
{
  echo "# hookengine GPU check $(date -u +%FT%TZ)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "## GPU tests"
  timeout 300 "$PY" -m pytest -q -m gpu tests 2>&1 | tail -15
  echo "## bench/hook_dispatch.py"
  timeout 120 "$PY" bench/hook_dispatch.py 2>&1 | tail -1
  echo "## bench/step_overhead.py"
  timeout 180 "$PY" bench/step_overhead.py --steps 500 --repeats 3 2>&1 | tail -1
  echo "## bench/model_cache.py"
  timeout 120 "$PY" bench/model_cache.py 2>&1 | tail -1
} | tee "$OUT_FILE"
