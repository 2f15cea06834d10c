"""Bucketing footguns: options of the other mode, sizes that leave one bucket, one remainder
policy for the dataset and bucketing, and buckets.json accounting for every rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hookengine import Engine
from hookengine.data.bucketing import Bucketing
from hookengine.data.buckets import BucketError, kohya_bucket_resolutions
from hookengine.data.sampler import epoch_report, plan_epoch

from .conftest import write_images


@pytest.mark.parametrize("mode, option, value", [
    ("kohya", "resolutions", [64]), ("kohya", "align", 16), ("kohya", "weights", [1.0]),
    ("area", "max_resolution", 512), ("area", "min_size", 128), ("area", "step", 32), ("area", "no_upscale", True),
])
def test_an_option_of_the_other_mode_is_an_error_naming_it(mode, option, value) -> None:
    with pytest.raises(BucketError, match=rf"bucketing\.{option} does not apply to mode '{mode}'"):
        Bucketing(mode=mode, **{option: value})


def test_through_the_engine_kohya_with_resolutions_fails_before_anything_runs() -> None:
    engine = Engine(seed=0)
    with pytest.raises(Exception, match=r"bucketing\.resolutions does not apply to mode 'kohya'"):
        engine.use("bucketing", resolutions=[64])


def test_sizes_scale_with_max_resolution_and_512_keeps_kohyas_defaults() -> None:
    assert (Bucketing().step, Bucketing().min_size, Bucketing().max_size) == (64, 256, 1024)
    assert Bucketing().table.tolist() == [list(b) for b in kohya_bucket_resolutions(512, 256, 1024, 64)]
    small = Bucketing(max_resolution=64)
    assert (small.step, small.min_size, small.max_size) == (8, 32, 128)
    assert len(small.table) > 5  # several aspect ratios, not just 64x64
    assert {tuple(b) for b in small.table} >= {(64, 64), (32, 128), (128, 32), (48, 80), (80, 48)}


def test_sizes_that_leave_one_bucket_are_an_error() -> None:
    with pytest.raises(BucketError, match=r"max_resolution=64 with min_size=256.* leaves one bucket \(64x64\).*min_size=256"):
        Bucketing(max_resolution=64, min_size=256, max_size=1024)  # the old defaults at 64 px
    with pytest.raises(BucketError, match=r"min_size=256 is larger than bucketing\.max_size=128"):
        Bucketing(max_resolution=64, min_size=256)  # max_size scaled to 128
    Bucketing(max_resolution=64, min_size=64, max_size=64, step=8)  # square on purpose: min_size == max_size


def test_bucketing_has_no_remainder_of_its_own() -> None:
    engine = Engine(seed=0)
    with pytest.raises(Exception, match="remainder"):
        engine.use("bucketing", remainder="drop")


@pytest.mark.parametrize("remainder", ["drop", "pad", "carry"])
def test_bucketing_follows_the_datasets_remainder(tmp_path: Path, remainder: str) -> None:
    write_images(tmp_path / "imgs", [(64, 64)] * 5 + [(128, 64)] * 3, captions=False)
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2, remainder=remainder)
    engine.use("bucketing", max_resolution=64)
    engine.fire("setup")
    sampler = engine.state.dataloaders["train"].batch_sampler
    assert sampler.remainder == remainder
    seen = [i for batch in sampler for i, _ in batch]
    assert len(seen) == {"drop": 6, "pad": 10, "carry": 6}[remainder]


def test_epoch_report_accounts_for_every_rank() -> None:
    """40 images with 2 processes x batch 4: 16 do not fill a global batch and are dropped."""
    ids = np.array([0] * 20 + [1] * 13 + [2] * 7)
    plan = plan_epoch(ids, 4, num_replicas=2, seed=0, epoch=3, remainder="drop")
    report = epoch_report(plan, 3, 4, 2)
    assert (report["epoch"], report["steps"], report["dropped"]) == (3, 3, 16)
    trained = {rank: set(plan.for_rank(rank, 4).reshape(-1).tolist()) for rank in (0, 1)}
    for rank in (0, 1):
        entry = report["ranks"][rank]
        assert entry["samples"] == len(trained[rank]) == 12
        assert entry["dropped"] == len(entry["dropped_samples"])
    dropped = [int(n.split()[1]) for r in report["ranks"] for n in r["dropped_samples"]]
    assert sorted(dropped + sorted(trained[0] | trained[1])) == list(range(40))  # every sample accounted once
    # bucket 1 has 13 samples: 8 in a global batch, the next 4 were rank 0's slice, the last one rank 1's
    assert [r["dropped"] for r in report["ranks"]] == [4 + 4 + 4, 1 + 3]
    assert epoch_report(plan_epoch(ids, 4, num_replicas=2, remainder="pad"), 0, 4, 2)["dropped"] == 0


def test_buckets_json_reports_what_each_rank_dropped_per_epoch(tmp_path: Path) -> None:
    """Two ranks planned in-process (the planner reads the world from the runtime)."""
    rows = write_images(tmp_path / "imgs", [(64, 64)] * 20 + [(128, 64)] * 13 + [(64, 128)] * 7, captions=False)
    seen = {}
    for rank in (0, 1):
        engine = Engine(seed=0, run_dir=tmp_path / f"run{rank}")
        engine.use("dataset", path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=4, remainder="drop")
        engine.use("bucketing", max_resolution=64)
        runtime = engine.runtime
        runtime.accelerator  # noqa: B018 - then pretend to be one of two processes
        runtime.num_processes, runtime.process_index, runtime.is_main_process = 2, rank, True
        engine.state.is_main_process = True
        engine.fire("setup")
        sampler = engine.state.dataloaders["train"].batch_sampler
        seen[rank] = {}
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seen[rank][epoch] = {i for batch in sampler for i, _ in batch}
    report = json.loads((tmp_path / "run0" / "buckets.json").read_text())
    assert report["remainder"] == "drop" and report["left_out"] == []
    names = [r["file_name"] for r in rows]
    for epoch in (0, 1):
        entry = report["epochs"][str(epoch)]
        assert entry["processes"] == 2 and entry["dropped"] == 16
        dropped = {rank: {Path(n).name for n in entry["ranks"][rank]["dropped_samples"]} for rank in (0, 1)}
        trained = {Path(names[i]).name for rank in (0, 1) for i in seen[rank][epoch]}
        assert not trained & (dropped[0] | dropped[1])
        assert trained | dropped[0] | dropped[1] == set(names)
        assert all(entry["ranks"][rank]["samples"] == len(seen[rank][epoch]) for rank in (0, 1))
    assert report["epochs"]["0"]["ranks"] != report["epochs"]["1"]["ranks"]  # other samples dropped next epoch
