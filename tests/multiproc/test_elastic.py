"""Elastic restarts: torchrun --max-restarts restarts the group after a worker dies; the run resumes itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hookengine.training.elastic import restart_count, resume_mode

ROOT = Path(__file__).resolve().parents[2]


def recipe(tmp: Path, name: str, **plugins: dict) -> Path:
    data = {
        "name": name,
        "seed": 1,
        "run_dir": str(tmp / name),
        "plugins": {
            "data": {"use": "tests.multiproc.ws_plugins:BucketDigits", "batch_size": 16, "samples": 200},
            "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet",
                           "model_options": {"dropout": 0.0}},
            "dump": {"use": "tests.multiproc.plugins:DumpWeights", "folder": str(tmp / name / "out")},
            **plugins,
        },
        "trainer": {"max_steps": 14, "lr": 0.05, "optimizer": "SGD", "eval_at_phase_end": False},
        "checkpoint": {"every": 4, "keep_last": 3},
        "runtime": {"timeout_s": 30},
        "progress": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(path: Path, restarts: int) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "-m", "hookengine", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_resumes_and_ends_as_if_uninterrupted(tmp_path: Path) -> None:
    torchrun(recipe(tmp_path, "plain"), restarts=0)
    # rank 1 dies at step 10 the first time; checkpoints at 4 and 8; the restarted group resumes from 8
    killed = recipe(tmp_path, "killed", kill={"use": "tests.multiproc.ws_plugins:KillOnce", "rank": 1, "step": 10})
    result = torchrun(killed, restarts=1)
    assert (tmp_path / "killed" / "killed-once").is_file()  # it did die once
    assert "restarted by torchelastic (restart 1 of 1)" in result.stdout, result.stdout[-2000:]
    assert "step-00000008 (step 8)" in result.stdout, result.stdout[-2000:]
    a, b = load_file(str(tmp_path / "plain" / "out" / "rank0.safetensors")), None
    for rank in (0, 1):
        b = load_file(str(tmp_path / "killed" / "out" / f"rank{rank}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"rank {rank} differs from the uninterrupted run"


def test_resume_mode_follows_the_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0 and resume_mode(None, said.append) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_mode(None, said.append) is None and said == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert resume_mode("some/checkpoint", said.append) == "some/checkpoint"  # the recipe said otherwise
    assert resume_mode(None, said.append) == "latest"
    assert said == ["restarted by torchelastic (restart 2 of 3): resuming from the newest valid checkpoint"]
