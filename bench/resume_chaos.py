"""Kill a training run with SIGKILL at random moments, resume each time, compare bitwise.

One uninterrupted run is the reference. Each chaos run is killed ``--kills`` times at
random moments (during start-up, mid-epoch, while a background checkpoint is being
written) and resumed with ``--resume`` after each kill; its final weights, optimizer
state and clock must equal the reference bit for bit. With ``--corrupt P``, after a kill
the newest checkpoint gets a flipped byte with probability P: the resume must skip it
(its manifest no longer matches) and fall back to an older one, still bitwise equal.

Run: python bench/resume_chaos.py [--kills 20 --chains 1 --seed 0 --corrupt 0.3]   (JSON line last)
     python bench/resume_chaos.py --quick   (3 kills, each after 2 new checkpoints; corrupt 0.5: 2-3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RECIPE = {
    "name": "chaos",
    "seed": 7,
    "plugins": {
        "digits": {"use": "digits", "batch_size": 16},
        "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet"},
    },
    "trainer": {"max_steps": 240, "lr": 0.003, "eval_every": 60},
    "checkpoint": {"every": 5, "keep_last": 2, "background": True},
    "logging": {"every": 5},
    "progress": {"enabled": False},
}


def command(recipe: Path, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "hookengine", "run", str(recipe), "--run-dir", str(run_dir)]
    return cmd + (["--resume"] if resume else [])


def final(run_dir: Path) -> tuple[bytes, dict]:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return (newest / "tensors.safetensors").read_bytes(), json.loads((newest / "state.json").read_text())["clock"]


def corrupt_newest(run_dir: Path) -> bool:
    """Flip one byte of the newest checkpoint's tensor data; ``False`` when there is none."""
    found = sorted((run_dir / "checkpoints").glob("step-*/tensors.safetensors"))
    if not found:
        return False
    data = bytearray(found[-1].read_bytes())
    data[-5] ^= 0x01
    found[-1].write_bytes(bytes(data))
    return True


def newest(run_dir: Path) -> str | None:
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def wait_for_new_checkpoint(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    """Wait until the run has written two checkpoints since it started (or has ended)."""
    seen, fresh = newest(run_dir), 0
    deadline = time.monotonic() + timeout
    while fresh < 2 and process.poll() is None and time.monotonic() < deadline:
        now = newest(run_dir)
        if now != seen:
            seen, fresh = now, fresh + 1
        time.sleep(0.01)


def chaos_chain(recipe: Path, run_dir: Path, kills: int, rng: random.Random, env: dict,
                corrupt: float = 0.0, window: tuple[float, float] = (1.0, 7.0),
                after_checkpoint: bool = False) -> tuple[int, int]:
    """Run with ``kills`` SIGKILLs and resumes; return (kills that landed mid-run, checkpoints corrupted).

    A kill lands ``window`` seconds after a start, or, with ``after_checkpoint``, that long
    after the run has written two new checkpoints (a loaded machine starts slowly).
    """
    landed = corrupted = 0
    resume = False
    while landed < kills:
        process = subprocess.Popen(command(recipe, run_dir, resume), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if after_checkpoint:
            wait_for_new_checkpoint(process, run_dir)
        time.sleep(rng.uniform(*window))
        if process.poll() is not None:  # finished before the kill: start a fresh chain
            raise RuntimeError("the run finished before it could be killed; lengthen trainer.max_steps")
        process.send_signal(signal.SIGKILL)
        process.wait()
        landed += 1
        resume = True
        # Never the only checkpoint: with none valid, a resume refuses instead of starting over.
        if rng.random() < corrupt and len(list((run_dir / "checkpoints").glob("step-*"))) > 1:
            corrupted += corrupt_newest(run_dir)
    had_checkpoint = any((run_dir / "checkpoints").glob("step-*"))
    done = subprocess.run(command(recipe, run_dir, True), env=env, capture_output=True, text=True)
    said = "resumed from" if had_checkpoint else "starting from scratch"
    if done.returncode != 0 or said not in done.stdout:
        raise RuntimeError(f"the last resume failed or did not say {said!r}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return landed, corrupted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=float, default=0.0, help="chance of damaging the newest checkpoint after a kill")
    parser.add_argument("--window", type=float, nargs=2, default=(1.0, 7.0), metavar=("LO", "HI"),
                        help="seconds after a start at which the kill lands (uniform)")
    parser.add_argument("--quick", action="store_true", help="3 kills late enough to hit checkpoints, corrupt 0.5")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.chains, args.corrupt, args.window = 3, 1, 0.5, (0.0, 1.0)
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="hookengine-chaos-") as tmp:
        tmp_path = Path(tmp)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE))
        reference = tmp_path / "reference"
        subprocess.run(command(recipe, reference, False), env=env, check=True, capture_output=True)
        ref_bytes, ref_clock = final(reference)
        equal = damaged = 0
        for chain in range(args.chains):
            run_dir = tmp_path / f"chain{chain}"
            t0 = time.perf_counter()
            landed, corrupted = chaos_chain(recipe, run_dir, args.kills, rng, env, args.corrupt, tuple(args.window),
                                            after_checkpoint=args.quick)
            damaged += corrupted
            got_bytes, got_clock = final(run_dir)
            same = got_bytes == ref_bytes and got_clock == ref_clock
            equal += same
            print(f"chain {chain}: {landed} kills, {corrupted} damaged checkpoints, "
                  f"{time.perf_counter() - t0:.0f} s, bitwise equal: {same}")
    print(json.dumps({"bench": "resume_chaos", "kills_per_chain": args.kills, "chains": args.chains,
                      "damaged_checkpoints": damaged, "equal_runs": equal, "all_equal": equal == args.chains}))


if __name__ == "__main__":
    main()
