"""The run's plan in State: written by train_sched (or the trainer's short forms), walked by any loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hookengine import Engine
from hookengine.core.plan import Phase, Plan, PlanError
from tests.sched.helpers import data


def test_phases_coerce_and_name_bad_keys() -> None:
    plan = Plan()
    plan.configure("train_sched", phases=[{"name": "a", "steps": 3}, {"name": "b", "epochs": 2, "accumulation": 2}])
    assert plan.phase_names == ["a", "b"] and plan.phase("b").accumulation == 2
    assert plan.total_steps({"train": list(range(10))}) == 3 + 2 * (10 // 2)
    with pytest.raises(PlanError, match=r"phases.0.step: unknown phase setting \(did you mean 'steps'\?\)"):
        Phase.coerce({"name": "a", "step": 3})
    with pytest.raises(PlanError, match="phases.a.steps: expected a positive integer"):
        Phase("a", steps=0)
    with pytest.raises(PlanError, match="no phase named 'c'"):
        plan.phase("c")


def test_two_plugins_setting_the_same_plan_key_differently_is_an_error() -> None:
    engine = Engine()
    engine.use("train_sched", lr=0.1, max_steps=5)
    engine.use("trainer", max_steps=5)  # the same value: fine
    with pytest.raises(Exception, match="trainer2.lr and train_sched.lr both set"):
        engine.use("trainer", name="trainer2", lr=0.2)


def test_the_default_phase_follows_max_steps_or_epochs() -> None:
    plan = Plan()
    plan.configure("trainer", max_steps=7)
    assert (plan.phases[0].steps, plan.phases[0].epochs) == (7, None)
    plan = Plan()
    plan.configure("trainer", epochs=2)
    assert (plan.phases[0].steps, plan.phases[0].epochs) == (None, 2)


def test_per_phase_accumulation_and_precision(tmp_path: Path) -> None:
    """Phase 'b' accumulates 2 batches per step and computes the loss under bf16 autocast."""
    engine = Engine(seed=0, run_dir=None, cpu=True)
    engine.use(data, samples=64)
    engine.use("supervised", model="tests.sched.helpers:stack")
    engine.use("train_sched", phases=[{"name": "a", "steps": 3}, {"name": "b", "steps": 2, "accumulation": 2, "precision": "bf16"}])
    engine.use("trainer", eval_at_phase_end=False)
    seen: list[tuple[str, int, bool]] = []

    @engine.attach("compute_loss")
    def record(next_impl, batch):
        seen.append((engine.state.phase.name, engine.state.clock.step, torch.is_autocast_enabled("cpu")))
        return next_impl(batch)

    engine.use("checkpoint", every=0)
    state = engine.run()
    assert state.clock.step == 5 and state.clock.micro_step == 3 + 4
    assert seen == [("a", 0, False), ("a", 1, False), ("a", 2, False),
                    ("b", 3, True), ("b", 3, True), ("b", 4, True), ("b", 4, True)]
