"""Two processes (torchrun, gloo) through accelerate: one bucket per step, disjoint samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hookengine.data.buckets import kohya_assign, kohya_bucket_resolutions

from .conftest import write_images

SCRIPT = Path(__file__).with_name("mp_bucketing_script.py")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_same_bucket_disjoint_samples(tmp_path, sizes):
    rows = write_images(tmp_path / "imgs", sizes)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path / "imgs"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = ranks[0]["steps"], ranks[1]["steps"]
    assert len(a) == len(b) > 0  # the same number of steps
    assert ranks[0]["weight"] == pytest.approx(ranks[1]["weight"])  # DDP kept them in sync
    # expected per epoch: every bucket's samples, in global batches of 2 x 2
    w = [r["width"] for r in rows]
    h = [r["height"] for r in rows]
    counts = Counter(kohya_assign(w, h, kohya_bucket_resolutions(128, 64, 256, 32)).bucket.tolist())
    per_epoch = sum(c // 4 for c in counts.values())
    assert len(a) == 2 * per_epoch
    for epoch in (0, 1):
        used = []
        for sa, sb in zip(a, b):
            if sa["epoch"] != epoch:
                continue
            assert sb["epoch"] == epoch
            targets = {tuple(t) for t in sa["target"] + sb["target"]}
            assert len(targets) == 1  # both ranks draw from the same bucket
            assert not set(sa["index"]) & set(sb["index"])  # disjoint
            used += sa["index"] + sb["index"]
        assert len(used) == len(set(used)) == 4 * per_epoch  # each sample at most once
