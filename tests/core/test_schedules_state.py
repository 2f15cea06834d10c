"""Schedules compose as pure functions; state and checkpoints round-trip exactly."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hookengine import schedule as S
from hookengine.training.checkpoint import (
    CheckpointError, checkpoints_in, latest_checkpoint, load_tree, save_tree, write_checkpoint,
)
from hookengine.core.state import capture_rng, restore_rng


def test_basic_schedules_against_their_formulas() -> None:
    assert [S.linear(1.0, 0.0, 4)(t) for t in (-1, 0, 1, 4, 9)] == [1.0, 1.0, 0.75, 0.0, 0.0]
    c = S.cosine(2.0, 0.5, 10)
    for t in range(12):
        expected = 0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10))
        assert c(t) == pytest.approx(expected, rel=1e-15)
    assert S.exponential(1.0, 0.5)(3) == 0.125
    p = S.piecewise(1.0, [(10, 0.5), (20, 0.1)])
    assert [p(t) for t in (0, 9, 10, 19, 20, 100)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def test_warmup_then_cosine_equals_transformers() -> None:
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=20)
    ours = S.warmup(5, S.cosine(1.0, 0.0, 15))
    for step in range(21):
        assert ours(step) == pytest.approx(reference.lr_lambdas[0](step), rel=1e-12, abs=1e-15), step


def test_sequence_scale_clamp_and_callables_compose() -> None:
    s = S.sequence([(S.constant(1.0), 3), (lambda t: 10 - t, None)])
    assert [s(t) for t in range(6)] == [1.0, 1.0, 1.0, 10, 9, 8]
    scaled = (S.linear(0.0, 1.0, 10) * 2 + 1).clamp(high=2.0)
    assert [scaled(t) for t in (0, 2, 5, 10)] == [1.0, 1.4, 2.0, 2.0]
    assert S.as_schedule(0.3)(99) == 0.3
    assert S.constant(1.0).shift(5)(4) == 1.0
    assert S.linear(0.0, 1.0, 10).shift(5)(10) == 0.5
    with pytest.raises(TypeError, match="cannot make a schedule"):
        S.as_schedule("fast")


def test_schedules_are_pure_no_hidden_state() -> None:
    s = S.warmup(3, S.cosine(1.0, 0.1, 7))
    forward = [s(t) for t in range(12)]
    backward = [s(t) for t in reversed(range(12))][::-1]
    assert forward == backward  # evaluating in any order gives the same values


def test_rng_capture_restore_is_exact() -> None:
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_tree_round_trip_without_pickle(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tied = torch.arange(4.0)
    tree = {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "rng": capture_rng(),
        "tied": [tied, tied[:2]],
        "misc": {"tuple": (1, "a", None), 3: "int key", "dtype": torch.bfloat16},
    }
    save_tree(tree, tmp_path / "ck")
    assert not list((tmp_path / "ck").glob("*.pt")) and not list((tmp_path / "ck").glob("*.bin"))
    back = load_tree(tmp_path / "ck")
    assert back["misc"] == tree["misc"]
    assert torch.equal(back["tied"][1], tied[:2])
    assert back["optim"]["param_groups"] == tree["optim"]["param_groups"]
    for k, v in tree["optim"]["state"][0].items():
        assert torch.equal(back["optim"]["state"][0][k], v)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optim"])
    restore_rng(back["rng"])


def test_atomic_write_prunes_and_ignores_partial_checkpoints(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        write_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step-00000010", "step-00000015"]
    partial = tmp_path / ".step-00000020.tmp-1"  # what a killed writer leaves
    partial.mkdir()
    (partial / "tensors.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step-00000015"
    broken = tmp_path / "step-00000030"
    broken.mkdir()
    (broken / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="step-00000030 is incomplete: tensors.safetensors is missing"):
        load_tree(broken)
