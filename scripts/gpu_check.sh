#!/usr/bin/env bash
# On a machine with one CUDA GPU, in under 8 minutes: the GPU-only tests, the sync-debug
# check of the steady-state loop, and a short bench of LoRA training on an SD-1.x-shaped
# pipeline (bench/diffusion_lora.py, width 320: SD's UNet/VAE/text-encoder shapes, 64x64
# latents) against the diffusers example loop: steps/s, the encoders' share of a step and
# peak memory, without and with the latent cache, then with bf16 autocast, gradient
# checkpointing, block swap and torch.compile. Figures go to gpu_figures.txt (or
# $OUT/gpu_figures.txt). A tiny DeepSpeed ZeRO-2 run (only when deepspeed is installed) checks
# the accelerate-config path of docs/DISTRIBUTED.md. Each section gets what is left of the
# 8 minutes at most; a section that would not fit is skipped and says so.
#
#   scripts/gpu_check.sh             # on the GPU machine
#   scripts/gpu_check.sh --dry-run   # anywhere: the CPU parts, tiny sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT_FILE="${OUT:-.}/gpu_figures.txt"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c "import hookengine" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KERAS_BACKEND=torch TOKENIZERS_PARALLELISM=false
WORK="$(mktemp -d -t gpu-check-XXXXXX)"
export TMPDIR="$WORK"  # torch's inductor cache and torchrun leftovers stay in here
trap 'rm -rf "$WORK"' EXIT
BUDGET=465          # seconds: 8 minutes less a margin for the start
START=$SECONDS

# section TITLE LIMIT_S TAIL_LINES COMMAND...: run it within min(LIMIT_S, time left).
section() {
  local title=$1 limit=$2 lines=$3; shift 3
  local left=$(( BUDGET - (SECONDS - START) ))
  echo "## $title"
  if [ "$left" -lt 20 ]; then echo "skipped: ${left}s left of the ${BUDGET}s budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -n "$lines"
  echo "(exit ${PIPESTATUS[0]}, $(( SECONDS - t0 ))s of at most ${limit}s)"
}

# Whether a plugin module exists in this checkout (the memory options are built elsewhere).
have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

if [ "$DRY" = 1 ]; then
  BENCH=(bench/diffusion_lora.py --width 32 --steps 1 --warmup 1 --measure 1 --repeats 1 --batch 1)
  FLAGS_VARIANTS=raw,hookengine
else
  BENCH=(bench/diffusion_lora.py --width 320 --steps 8 --warmup 2 --measure 2 --repeats 1 --batch 4
         --pipeline "$WORK/sd-medium")
  FLAGS_VARIANTS=raw,hookengine
fi

{
  echo "# hookengine GPU check $(date -u +%FT%TZ)$([ "$DRY" = 1 ] && echo ' (dry run: CPU parts only)')"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
  if [ "$DRY" = 1 ]; then
    echo "## GPU tests"; echo "skipped (dry run)"
  else
    section "GPU tests (pytest -m gpu)" 100 15 "$PY" -m pytest -q -m gpu tests
  fi
  # DeepSpeed ZeRO-2 set by accelerate's launcher (docs/DISTRIBUTED.md): 20 steps of the digits
  # demo on one GPU; the loss must fall. deepspeed is not a dependency: no package, no step.
  echo "## DeepSpeed ZeRO-2 through accelerate (digits demo, 20 steps)"
  if [ "$DRY" = 1 ]; then
    echo "skipped (dry run)"
  elif ! have deepspeed; then
    echo "NOT RUN: deepspeed is not installed (pip install deepspeed)"
  elif ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "NOT RUN: no CUDA device"
  else
    cat > "$WORK/zero2.yaml" <<EOF
name: zero2
seed: 1
run_dir: $WORK/zero2
plugins:
  digits: {use: digits, batch_size: 32}
  classifier: {use: supervised, model: "hookengine.demo.digits:DigitsConvNet", model_options: {dropout: 0.0}}
trainer: {max_steps: 20, lr: 0.003, optimizer: AdamW}
checkpoint: {save_at_end: false}
logging: {every: 2}
progress: {enabled: false}
EOF
    section "DeepSpeed ZeRO-2 run" 150 6 "$PY" -m accelerate.commands.launch --use_deepspeed --zero_stage 2 \
      --num_processes 1 --mixed_precision no -m hookengine run "$WORK/zero2.yaml"
    "$PY" - "$WORK/zero2/metrics.jsonl" <<'EOF'
import json, sys
try:
    losses = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
    print(f"losses: first logged {losses[0]:.4f}, last {losses[-1]:.4f}:", "FELL" if losses[-1] < losses[0] else "DID NOT FALL")
except (OSError, IndexError, ValueError) as exc:
    print(f"no losses to compare ({exc})")
EOF
  fi
  section "sync-debug check: steady-state steps under torch.cuda.set_sync_debug_mode('error')" 60 3 \
    "$PY" scripts/sync_check.py --warmup 3 --steps 5
  section "sync-debug check, with the latent and text caches" 60 3 \
    "$PY" scripts/sync_check.py --warmup 3 --steps 5 --cache
  section "bench: medium SD LoRA, hookengine vs the diffusers example loop, without and with caching" 170 9 \
    "$PY" "${BENCH[@]}"
  section "bench: bf16 autocast (both loops)" 70 3 "$PY" "${BENCH[@]}" --variants "$FLAGS_VARIANTS" --bf16
  if have hookengine.sched.memory; then
    section "bench: gradient checkpointing (UNet; hookengine: the memory plugin)" 70 3 \
      "$PY" "${BENCH[@]}" --variants "$FLAGS_VARIANTS" --checkpointing
  else
    echo "## bench: gradient checkpointing"; echo "NOT RUN: no hookengine.sched.memory plugin in this checkout"
  fi
  if have hookengine.sched.block_swap; then
    section "bench: block swap (hookengine only; the example loop has none)" 70 3 \
      "$PY" "${BENCH[@]}" --variants hookengine --block-swap '{"blocks": "unet.up_blocks.*", "count": 2}'
  else
    echo "## bench: block swap"; echo "NOT RUN: no hookengine.sched.block_swap plugin in this checkout"
  fi
  if [ "$DRY" = 1 ]; then
    echo "## bench: torch.compile"; echo "skipped (dry run: compiling takes minutes on a CPU)"
  elif have hookengine.sched.memory; then
    section "bench: torch.compile of the UNet (hookengine: the memory plugin)" 200 3 \
      "$PY" "${BENCH[@]}" --variants "$FLAGS_VARIANTS" --compile
  else
    echo "## bench: torch.compile"; echo "NOT RUN: no hookengine.sched.memory plugin in this checkout"
  fi
  echo "# done in $(( SECONDS - START ))s"
} | tee "$OUT_FILE"
