"""Kill a training run with SIGKILL at random moments, resume each time, compare bitwise.

One uninterrupted run is the reference. Each chaos run is killed ``--kills`` times at
random moments (during start-up, mid-epoch, while a background checkpoint is being
written) and resumed with ``--resume`` after each kill; its final weights, optimizer
state and clock must equal the reference bit for bit.

Run: python bench/resume_chaos.py [--kills 20 --chains 1 --seed 0]   (JSON line last)
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


def chaos_chain(recipe: Path, run_dir: Path, kills: int, rng: random.Random, env: dict) -> int:
    """Run with ``kills`` SIGKILLs and resumes; return how many kills landed mid-run."""
    landed = 0
    resume = False
    while landed < kills:
        process = subprocess.Popen(command(recipe, run_dir, resume), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 7.0))
        if process.poll() is not None:  # finished before the kill: start a fresh chain
            raise RuntimeError("the run finished before it could be killed; lengthen trainer.max_steps")
        process.send_signal(signal.SIGKILL)
        process.wait()
        landed += 1
        resume = True
    done = subprocess.run(command(recipe, run_dir, True), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the last resume failed:\n{done.stderr[-3000:]}")
    return landed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="hookengine-chaos-") as tmp:
        tmp_path = Path(tmp)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE))
        reference = tmp_path / "reference"
        subprocess.run(command(recipe, reference, False), env=env, check=True, capture_output=True)
        ref_bytes, ref_clock = final(reference)
        equal = 0
        for chain in range(args.chains):
            run_dir = tmp_path / f"chain{chain}"
            t0 = time.perf_counter()
            landed = chaos_chain(recipe, run_dir, args.kills, rng, env)
            got_bytes, got_clock = final(run_dir)
            same = got_bytes == ref_bytes and got_clock == ref_clock
            equal += same
            print(f"chain {chain}: {landed} kills, {time.perf_counter() - t0:.0f} s, bitwise equal: {same}")
    print(json.dumps({"bench": "resume_chaos", "kills_per_chain": args.kills, "chains": args.chains,
                      "equal_runs": equal, "all_equal": equal == args.chains}))


if __name__ == "__main__":
    main()
