"""Steady-state training steps must not make the host wait for the GPU.

Trains a LoRA on the tiny SD pipeline through the engine (diffusion routine, captions,
``lora_sched``) on the GPU; after ``--warmup`` steps it turns on
``torch.cuda.set_sync_debug_mode("error")`` for ``--steps`` steps, so any host read of a
device value (``.item()``, ``float(t)``, an ``if`` on a tensor, ``nonzero``, a copy to the
CPU) raises where it happens. Prints one JSON line: ``{"sync_check": "pass" | "fail",
...}`` with the offending frames on failure; exit status 1 on failure.

Without CUDA (``scripts/gpu_check.sh --dry-run``) the same loop runs on the CPU with the
mode left alone: it checks the script, not the property.

Run: python scripts/sync_check.py [--warmup 3 --steps 5] [--cache]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache", action="store_true", help="with cache_latents and the disk text cache")
    args = parser.parse_args(argv)

    import torch

    from hookengine import Engine
    from hookengine.testing import save_tiny_sd_pipeline

    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="sync-check-"))
    folder = save_tiny_sd_pipeline(tmp / "tiny-sd")
    g = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    batches = [{"pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
                "caption": [f"a digit {i % 3}", "a line"]} for i in range(total)]
    if args.cache:  # the steady state of a cache: the warm-up steps filled it (storing a miss reads the GPU)
        batches = [batches[i % args.warmup] for i in range(total)]
    engine = Engine(seed=0, run_dir=tmp / "run")
    cache = {"cache_latents": True, "cache_text_embeddings": "disk"} if args.cache else {}
    engine.use("diffusion", pipeline=str(folder), seed=0, sample_at_phase_end=False, **cache)
    engine.use("lora_sched", model="unet", adapters={"check": {"rank": 4, "alpha": 4, "targets": ["to_q", "to_v"]}})
    engine.use_defaults({"trainer": {"max_steps": total, "lr": 1e-4, "eval_at_phase_end": False},
                         "checkpoint": {"save_at_end": False}, "logging": {"every": 1000, "plot": False},
                         "progress": {"enabled": False}})
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))

    def mode(state) -> None:
        if cuda and state.clock.step == args.warmup:
            torch.cuda.set_sync_debug_mode("error")
        if cuda and state.clock.step == total:
            torch.cuda.set_sync_debug_mode(0)

    engine.on("step_end", mode, priority="last")
    try:
        engine.run()
    except Exception as exc:  # noqa: BLE001 - the report is the point
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)
                  if "hookengine" in f.filename or "diffusers" in f.filename][-6:]
        print(json.dumps({"sync_check": "fail", "cuda": cuda, "error": str(exc).splitlines()[0][:300],
                          "frames": frames}))
        return 1
    print(json.dumps({"sync_check": "pass" if cuda else "dry-run (no CUDA: the mode was not set)", "cuda": cuda,
                      "steady_steps": args.steps, "cache": args.cache}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
