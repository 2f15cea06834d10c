"""Extending a finished run on resume: the recipe's lengths, lr and weight decay win over
the checkpoint's, and the lr follows the schedule of the new length."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from tests.sched.helpers import make_engine, record_lrs

LR = 0.05


def transformers_lrs(make, steps: int, lr: float = LR) -> list[float]:
    """The lr a transformers scheduler gives each optimizer step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("explicit_total", [True, False])
def test_extended_cosine_run_follows_the_new_length(tmp_path: Path, explicit_total: bool) -> None:
    from transformers import get_cosine_schedule_with_warmup

    run = tmp_path / "run"
    first = make_engine(run, trainer={"max_steps": 50, "lr": LR},
                        plugins=[("lr_sched", {"schedule": "cosine", "warmup": 5, "total_steps": 50})], checkpoint={})
    first_lrs = record_lrs(first)
    first.run()
    assert first.state.clock.step == 50 and first_lrs[-1][0] < 1e-2 * LR  # ended at the bottom

    options = {"schedule": "cosine", "warmup": 5, **({"total_steps": 100} if explicit_total else {})}
    second = make_engine(run, trainer={"max_steps": 100, "lr": LR}, plugins=[("lr_sched", options)],
                         checkpoint={"resume": "latest"})
    rows = record_lrs(second)
    second.run()
    lrs = [row[0] for row in rows]
    assert second.state.clock.step == 100
    expected = transformers_lrs(lambda o: get_cosine_schedule_with_warmup(o, 5, 100), 100)[50:]
    assert lrs == expected  # the 100-step curve from step 50 on, bitwise
    assert lrs[0] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 45 / 95)))
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # never climbs back to the peak
    assert lrs[-1] < 1e-3 * LR  # ends near zero (2.7e-4 of the peak)


def test_a_cosine_past_its_end_holds_the_minimum(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "run", trainer={"max_steps": 14, "lr": LR},
                         plugins=[("lr_sched", {"schedule": "cosine", "total_steps": 10})])
    rows = record_lrs(engine)
    engine.run()
    lrs = [row[0] for row in rows]
    assert lrs[10:] == [0.0] * 4  # transformers' cosine would climb back up here


def test_a_changed_lr_and_weight_decay_win_over_the_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    trainer = {"max_steps": 6, "lr": 1e-4, "weight_decay": 0.01, "optimizer": "AdamW"}
    make_engine(run, trainer=trainer, checkpoint={}).run()

    resumed = make_engine(run, trainer={**trainer, "max_steps": 10, "lr": 5e-5, "weight_decay": 0.1},
                          checkpoint={"resume": "latest"})
    lrs = record_lrs(resumed)
    decays: list[float] = []
    resumed.on("before_optimizer_step", lambda state: decays.append(state.optimizers["main"].param_groups[0]["weight_decay"]))
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert resumed.state.clock.step == 10
    assert lrs == [[5e-5]] * 4 and decays == [0.1] * 4
    assert "lr changed on resume: 0.0001 → 5e-05" in caplog.text
    assert "weight_decay changed on resume: 0.01 → 0.1" in caplog.text


def test_a_changed_base_lr_under_a_schedule_wins(tmp_path: Path) -> None:
    from transformers import get_linear_schedule_with_warmup

    run = tmp_path / "run"
    plugins = [("lr_sched", {"schedule": "linear", "total_steps": 12})]
    make_engine(run, trainer={"max_steps": 6, "lr": 0.02}, plugins=plugins, checkpoint={}).run()
    resumed = make_engine(run, trainer={"max_steps": 12, "lr": 0.01}, plugins=plugins, checkpoint={"resume": "latest"})
    rows = record_lrs(resumed)
    resumed.run()
    lrs = [row[0] for row in rows]
    assert lrs == transformers_lrs(lambda o: get_linear_schedule_with_warmup(o, 0, 12), 12, lr=0.01)[6:]
