"""Exact resume on another number of processes: the saved global batch is kept (bucket batch sampler)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hookengine.data.sampler import BucketBatchSampler, WorldSizeError, fit_world
from hookengine.training.run_signature import compare_signatures

from .test_ddp import assert_ok, single, torchrun



def recipe(tmp: Path, name: str, batch: int, steps: int) -> Path:
    data = {
        "name": name,
        "seed": 1,
        "run_dir": str(tmp / name),
        "plugins": {
            "data": {"use": "tests.multiproc.ws_plugins:BucketDigits", "batch_size": batch},
            "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet",
                           "model_options": {"dropout": 0.0}},
            "dump": {"use": "tests.multiproc.plugins:DumpWeights", "folder": str(tmp / name / "out")},
            "record": {"use": "tests.multiproc.ws_plugins:RecordSamples", "folder": str(tmp / name / "out")},
        },
        "trainer": {"max_steps": steps, "lr": 0.05, "optimizer": "SGD", "eval_at_phase_end": False},
        "checkpoint": {"every": 0, "keep_last": 2},
        "progress": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch(path: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    result = single(path, *args) if nproc == 1 else torchrun(path, *args, nproc=nproc)
    assert_ok(result)
    return result


def seen(tmp: Path, *runs: tuple[str, int]) -> dict[str, list[int]]:
    """Per epoch, every sample index the ranks of these runs trained on, sorted (repeats kept)."""
    out: dict[str, list[int]] = {}
    for name, ranks in runs:
        for rank in range(ranks):
            for epoch, indices in json.loads((tmp / name / "out" / f"rank{rank}.json").read_text())["seen"].items():
                out.setdefault(epoch, []).extend(indices)
    return {epoch: sorted(indices) for epoch, indices in out.items()}


def sizes(tmp: Path, name: str, rank: int = 0) -> set[int]:
    return set(json.loads((tmp / name / "out" / f"rank{rank}.json").read_text())["sizes"])


def weights(tmp: Path, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / name / "out" / f"rank{rank}.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_two_to_one_to_two_processes_sees_every_sample_once(tmp_path: Path) -> None:
    launch(recipe(tmp_path, "full", 16, 25), nproc=2)  # 10 global batches of 32 per epoch
    launch(recipe(tmp_path, "part", 16, 7), nproc=2)  # stops mid-epoch 0
    # 2 x 16 → 1 process, the same recipe: micro-batches of 16, accumulation x2; stops mid-epoch 1
    down = launch(recipe(tmp_path, "down", 16, 16), "--resume", str(tmp_path / "part" / "checkpoints"))
    assert "2 processes x 16 → 1 process x 16 with gradient accumulation x2" in down.stdout, down.stdout[-2000:]
    # → 2 processes with batch_size 32: each rank takes 16 of every global batch of 32
    up = launch(recipe(tmp_path, "up", 32, 25), "--resume", str(tmp_path / "down" / "checkpoints"), nproc=2)
    assert "1 process x 16 → 2 processes x 16" in up.stdout, up.stdout[-2000:]

    full = seen(tmp_path, ("full", 2))
    assert set(full) == {"0", "1", "2"} and len(full["0"]) == len(set(full["0"])) == 320
    # every sample of every epoch exactly once, across the three runs
    assert seen(tmp_path, ("part", 2), ("down", 1), ("up", 2)) == full
    assert sizes(tmp_path, "down") == sizes(tmp_path, "up", 1) == {16}
    reference, got = weights(tmp_path, "full"), weights(tmp_path, "up")
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(got[k], weights(tmp_path, "up", 1)[k]) for k in reference)  # ranks in sync


def test_fit_world_splits_a_global_batch_into_equal_micro_batches() -> None:
    assert fit_world(32, 1, 16) == (16, 2)
    assert fit_world(32, 2, 32) == (16, 1)
    assert fit_world(32, 4, 16) == (8, 1)
    assert fit_world(48, 1, 20) == (16, 3)
    with pytest.raises(WorldSizeError, match=r"global batch of 32 samples cannot be split evenly over 3 processes: "
                                             r"resume on 1, 2, 4, 8, 16, 32 processes"):
        fit_world(32, 3, 16)


def test_a_sampler_resumed_on_one_process_yields_both_ranks_shares_in_order() -> None:
    ids = np.zeros(100, dtype=np.int64)
    ranks = [BucketBatchSampler(ids, 8, num_replicas=2, rank=r, seed=3) for r in range(2)]
    state = ranks[0].state_dict()
    state["start"] = 0
    alone = BucketBatchSampler(ids, 8, seed=3)
    alone.load_state_dict(state)
    assert (alone.batch_size, alone.micro_steps, alone.global_batch) == (8, 2, 16)
    expected = [b for pair in zip(*(list(r) for r in ranks)) for b in pair]
    assert list(alone) == expected and len(alone) == len(expected) == 12
    assert alone.state_dict()["plan_replicas"] == 2  # a later resume keeps the same plan
    alone.set_start(4)  # micro-batches: global batch 2 on
    assert list(alone) == expected[4:]


def _signature(procs: int, batch: int, global_batch: int, micro: int = 1, accumulation: int = 1) -> dict:
    phase = {"name": "train", "data": "train", "accumulation": accumulation, "batch_size": batch,
             "global_batch": global_batch, "micro_steps": micro, "replan": True}
    return {"num_processes": procs, "phases": [phase]}


def test_a_global_batch_that_does_not_split_is_refused_naming_the_numbers() -> None:
    clock = {"step": 5, "phase_index": 0}
    refuse, handled = compare_signatures(_signature(2, 16, 32), _signature(3, 16, 48), clock)
    assert handled == [] and len(refuse) == 1
    assert "global batch of 32 samples cannot be split evenly over 3 processes" in refuse[0]
    refuse, handled = compare_signatures(_signature(2, 16, 32), _signature(1, 16, 16), clock)
    assert refuse == [] and "2 processes x 16 → 1 process x 16 with gradient accumulation x2" in handled[0]
    # a checkpoint of the adjusted run (accumulation 2 over 2 micro-batches) continues on 2 x 16 as before
    refuse, handled = compare_signatures(_signature(1, 16, 32, micro=2, accumulation=2), _signature(2, 16, 32), clock)
    assert refuse == []
    refuse, _ = compare_signatures(_signature(2, 16, 32), _signature(1, 16, 16, accumulation=2), clock)
    assert refuse and "gradient accumulation" in refuse[0]


def test_the_same_world_with_another_batch_size_is_still_a_recipe_change() -> None:
    clock = {"step": 5, "phase_index": 0}
    refuse, _ = compare_signatures(_signature(2, 16, 32), _signature(2, 32, 64), clock)
    assert refuse and "global batch 32 → 64" in refuse[0]
    # a run that continued a 2-process plan on 1 process may change its micro-batch on 1 process
    refuse, handled = compare_signatures(_signature(1, 16, 32, micro=2, accumulation=2), _signature(1, 32, 32), clock)
    assert refuse == [] and "1 process x 16 → 1 process x 32" in handled[0]
    ids = np.zeros(64, dtype=np.int64)
    saved = BucketBatchSampler(ids, 8, num_replicas=2, rank=0).state_dict()
    same_world = BucketBatchSampler(ids, 16, num_replicas=2, rank=0)
    same_world.load_state_dict(saved)  # shape_check=warn let it through: planned anew
    assert (same_world.global_batch, same_world.batch_size) == (32, 16)
