"""Exact resume through real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

RECIPE = {
    "name": "resume",
    "seed": 3,
    "plugins": {
        "digits": {"use": "digits", "batch_size": 16},
        "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet"},
    },
    "trainer": {"max_steps": 150, "lr": 0.003, "eval_every": 50},
    "checkpoint": {"every": 7, "keep_last": 2},
    "logging": {"every": 1},
    "progress": {"enabled": False},
}


def start(recipe: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hookengine", "run", str(recipe), "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def kill_after(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"run did not reach step {step} in {timeout}s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def final_state(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(newest / "tensors.safetensors")), json.loads((newest / "state.json").read_text())


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "metrics repeat steps after a resume"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))

    reference = tmp_path / "reference"
    done = start(recipe, reference)
    assert done.wait(timeout=300) == 0, done.stdout.read()

    interrupted = tmp_path / "interrupted"
    kill_after(start(recipe, interrupted), interrupted, 40)  # mid-epoch (epoch = 89 steps)
    kill_after(start(recipe, interrupted, "--resume"), interrupted, 100)  # past an evaluation
    resumed = start(recipe, interrupted, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output

    (ref_tensors, ref_tree), (got_tensors, got_tree) = final_state(reference), final_state(interrupted)
    assert ref_tree["clock"] == got_tree["clock"]
    assert ref_tree["clock"]["step"] == 150
    assert ref_tensors.keys() == got_tensors.keys()
    different = [k for k in ref_tensors if not (ref_tensors[k] == got_tensors[k]).all()]
    assert not different, f"{len(different)} of {len(ref_tensors)} tensors differ"
    assert train_losses(reference) == train_losses(interrupted)


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = subprocess.run(
        [sys.executable, "-m", "hookengine", "run", str(recipe), "--resume", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "checkpoint" in result.stderr and "nope" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
