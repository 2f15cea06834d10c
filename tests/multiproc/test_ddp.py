"""Several processes on the CPU (gloo): in sync, equal to one process, resumable, bounded failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def recipe(tmp: Path, name: str, batch: int, steps: int, out: Path, **extra) -> Path:
    data = {
        "name": name,
        "seed": 1,
        "run_dir": str(tmp / name),
        "plugins": {
            "digits": {"use": "digits", "batch_size": batch},
            "classifier": {
                "use": "supervised",
                "model": "hookengine.demo.digits:DigitsConvNet",
                "model_options": {"dropout": 0.0},
            },
            "dump": {"use": "tests.multiproc.plugins:DumpWeights", "folder": str(out)},
            **extra.pop("plugins", {}),
        },
        # SGD: linear in the gradients, so 1-vs-2-process rounding stays at float noise (Adam amplifies it).
        "trainer": {"max_steps": steps, "lr": 0.05, "optimizer": "SGD", "eval_at_phase_end": True},
        "checkpoint": {"every": 0, "keep_last": 3},
        "progress": {"enabled": False},
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(path: Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "-m", "hookengine", "run", str(path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def single(path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hookengine", "run", str(path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)


def weights(folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"rank{rank}.safetensors"))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_stay_in_sync_and_equal_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(single(recipe(tmp_path, "one", 32, 25, one)))
    assert_ok(torchrun(recipe(tmp_path, "two", 16, 25, two)))
    r0, r1, ref = weights(two, 0), weights(two, 1), weights(one)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks drifted apart"
    for k in ref:
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(ref["model.0.weight"], weights(one)["model.0.weight"] * 0)  # trained, non-trivial


def test_resume_under_two_processes_and_with_a_different_count(tmp_path: Path) -> None:
    full, part, cont, other = (tmp_path / n for n in ("full", "part", "cont", "other"))
    assert_ok(torchrun(recipe(tmp_path, "full", 16, 24, full)))
    part_recipe = recipe(tmp_path, "part", 16, 11, part)
    assert_ok(torchrun(part_recipe))
    checkpoints = tmp_path / "part" / "checkpoints"
    assert (checkpoints / "step-00000011").is_dir()
    # the same two processes continue: bitwise equal to the uninterrupted run
    assert_ok(torchrun(recipe(tmp_path, "cont", 16, 24, cont), "--resume", str(checkpoints)))
    a, b = weights(full), weights(cont)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one process with the same global batch continues the two-process checkpoint
    assert_ok(single(recipe(tmp_path, "other", 32, 24, other), "--resume", str(checkpoints)))
    c = weights(other)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)


def test_a_dying_rank_stops_the_others_in_bounded_time(tmp_path: Path) -> None:
    path = recipe(tmp_path, "dies", 16, 400, tmp_path / "out",
                  plugins={"die": {"use": "tests.multiproc.plugins:DieAt", "rank": 1, "step": 5}},
                  runtime={"timeout_s": 30})
    start = time.monotonic()
    result = torchrun(path, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 90
    text = result.stdout + result.stderr
    assert "rank: 1" in text and "exitcode: 3" in text, text[-2000:]
    assert not (tmp_path / "out" / "rank0.json").exists()  # rank 0 did not finish alone


def test_two_machines_on_loopback_run_one_recipe(tmp_path: Path) -> None:
    out = tmp_path / "machines"
    path = recipe(tmp_path, "machines", 16, 12, out)
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "--rdzv_backend", "static", "-m", "hookengine", "run", str(path)],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    r0, r1 = weights(out, 0), weights(out, 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert yaml.safe_load((out / "rank1.json").read_text())["world"] == 2
