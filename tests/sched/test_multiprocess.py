"""Two gloo processes (torchrun): learning rates equal the one-process values at every
optimizer step, and after every structural change all ranks hold equal parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(tmp_path: Path, *args: str) -> list[dict]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "tests/sched/mp_run.py"), str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_lrs_equal_one_process_and_ranks_stay_equal(tmp_path: Path) -> None:
    from .mp_run import run

    ranks = torchrun(tmp_path)
    assert [r["processes"] for r in ranks] == [2, 2]
    single = run(str(tmp_path / "single"))
    assert single["processes"] == 1
    assert len(single["lrs"]) == 12
    for r in ranks:
        assert r["lrs"] == single["lrs"]  # not stepped twice per optimizer step
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # equal after every unfreezing


@pytest.mark.multiprocess
@pytest.mark.slow
def test_without_rewrapping_ranks_drift(tmp_path: Path) -> None:
    """The negative control: unfreezing after DDP wrapped the model, without re-wrapping,
    lets the unfrozen layers drift apart (docs/TRAPS.md) - the check above can fail."""
    ranks = torchrun(tmp_path, "--no-rewrap")
    assert ranks[0]["checksums"][:3] == ranks[1]["checksums"][:3]
    assert ranks[0]["checksums"][-1] != ranks[1]["checksums"][-1]
