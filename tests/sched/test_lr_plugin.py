"""lr_sched inside the loop: reference equality per optimizer step, fractions, epochs,
metric-driven schedules, override semantics, exact resume and recipe errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hookengine.recipe import RecipeError

from .helpers import make_engine, record_lrs, weights

LR = 0.05


def reference_lrs(make, steps, lr=LR):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name,options", [("cosine", {}), ("linear", {}), ("polynomial", {"power": 2.0}), ("cosine_with_restarts", {"num_cycles": 2})])
def test_loop_lrs_equal_transformers_with_accumulation(run_dir: Path, name, options) -> None:
    """T = 10 optimizer steps (20 batches, accumulation 2), run to T + 20: equal to
    transformers up to T, then held at the value of T (transformers' cosine climbs back)."""
    from transformers import get_scheduler

    engine = make_engine(
        run_dir,
        trainer={"max_steps": 30, "lr": LR, "gradient_accumulation_steps": 2},
        plugins=[("lr_sched", {"schedule": name, "warmup": 3, "total_steps": 10, "options": options})],
    )
    seen = record_lrs(engine)
    engine.run()
    expected = reference_lrs(lambda o: get_scheduler(name, o, 3, 10, scheduler_specific_kwargs=options), 11)
    assert [row[0] for row in seen] == expected + [expected[10]] * 19


def test_warmup_fraction_rounds_up_and_uses_the_loop_length(run_dir: Path) -> None:
    from transformers import get_scheduler

    engine = make_engine(run_dir, trainer={"max_steps": 14, "lr": LR}, plugins=[("lr_sched", {"schedule": "cosine", "warmup": 0.2})])
    seen = record_lrs(engine)
    engine.run()
    warmup = math.ceil(14 * 0.2)  # transformers' warmup_ratio rounding
    assert [r[0] for r in seen] == reference_lrs(lambda o: get_scheduler("cosine", o, warmup, 14), 14)


def test_wsd_decay_as_a_fraction(run_dir: Path) -> None:
    from transformers import get_scheduler

    engine = make_engine(
        run_dir,
        trainer={"max_steps": 20, "lr": LR},
        plugins=[("lr_sched", {"schedule": "warmup_stable_decay", "warmup": 0.1, "decay": 0.25, "options": {"decay_type": "1-sqrt"}})],
    )
    seen = record_lrs(engine)
    engine.run()
    kwargs = {"num_decay_steps": 5, "decay_type": "1-sqrt"}
    assert [r[0] for r in seen] == reference_lrs(lambda o: get_scheduler("warmup_stable_decay", o, 2, 20, scheduler_specific_kwargs=kwargs), 20)


def test_per_epoch_interval_equals_torch_stepped_per_epoch(run_dir: Path) -> None:
    import torch.optim.lr_scheduler as L

    engine = make_engine(
        run_dir,
        trainer={"epochs": 4, "lr": LR},
        plugins=[("lr_sched", {"schedule": "StepLR", "interval": "epoch", "options": {"step_size": 1, "gamma": 0.5}})],
    )
    seen = record_lrs(engine)
    engine.run()
    per_epoch = reference_lrs(lambda o: L.StepLR(o, step_size=1, gamma=0.5), 4)
    batches = 96 // 8
    assert [r[0] for r in seen] == [lr for lr in per_epoch for _ in range(batches)]


def test_plateau_steps_once_per_evaluation(run_dir: Path) -> None:
    options = {"patience": 0, "factor": 0.5, "threshold": 0.5}
    engine = make_engine(
        run_dir,
        trainer={"max_steps": 12, "lr": LR, "eval_every": 2},
        plugins=[("lr_sched", {"schedule": "reduce_lr_on_plateau", "options": options})],
    )
    seen = record_lrs(engine)
    losses: list[float] = []
    engine.on("evaluate_end", lambda state, metrics: losses.append(metrics["val_loss"]), priority=100)
    engine.run()
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=LR)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **options)
    expected = []
    for step in range(12):
        expected.append(opt.param_groups[0]["lr"])
        if (step + 1) % 2 == 0:
            ref.step(losses[(step + 1) // 2 - 1])
    assert [r[0] for r in seen] == expected
    assert expected[-1] < LR


def test_override_semantics_never_compound(run_dir: Path) -> None:
    """A listener that scales the lr in place is overridden at the next step; groups'
    multipliers apply on top of the schedule."""
    engine = make_engine(
        run_dir,
        trainer={"max_steps": 6, "lr": LR},
        plugins=[
            ("optim_sched", {"groups": [{"name": "head", "params": ["head"], "lr_mult": 10.0}]}),
            ("lr_sched", {"schedule": "linear", "total_steps": 6}),
        ],
    )

    def meddle(state):
        for group in state.optimizers["main"].param_groups:
            group["lr"] *= 3

    engine.on("step_end", meddle)
    seen = []
    engine.on(
        "before_optimizer_step",
        lambda state: seen.append({g["name"]: g["lr"] for g in state.optimizers["main"].param_groups}),
        priority=-1000,
    )
    engine.run()
    for step, row in enumerate(seen):
        factor = (6 - step) / 6
        assert row["default"] == pytest.approx(LR * factor, rel=1e-12)
        assert row["head"] == pytest.approx(LR * factor * 10.0, rel=1e-12)
        assert row["head/no_decay"] == pytest.approx(LR * factor * 10.0, rel=1e-12)


def _checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("schedule,options", [("ExponentialLR", {"gamma": 0.8}), ("ReduceLROnPlateau", {"patience": 0, "threshold": 0.5})])
def test_resume_is_exact(tmp_path: Path, schedule, options) -> None:
    plugins = [("lr_sched", {"schedule": schedule, "options": options})]
    trainer = {"max_steps": 12, "lr": LR, "eval_every": 2}
    full = make_engine(tmp_path / "a", trainer=trainer, plugins=plugins, checkpoint={"every": 4, "keep_last": 0})
    full_lrs = record_lrs(full)
    full.run()
    resumed = make_engine(
        tmp_path / "b", trainer=trainer, plugins=plugins, checkpoint={"resume": str(_checkpoint_path(tmp_path / "a", 4))}
    )
    resumed_lrs = record_lrs(resumed)
    resumed.run()
    assert resumed_lrs == full_lrs[4:]
    a, b = weights(full.state.models["model"]), weights(resumed.state.models["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_keys_and_unknown_names(run_dir: Path) -> None:
    from hookengine import Engine

    recipe = {
        "name": "sched",
        "run_dir": str(run_dir),
        "plugins": {
            "model": {"use": "supervised", "model": "tests.sched.helpers:stack"},
            "data": {"use": "tests.sched.helpers:data"},
            "lr": {"use": "lr_sched", "schedule": "cosine_with_min_lr", "warmup": 0.1, "options": {"min_lr_rate": 0.1}},
            "optim": {"use": "optim_sched", "optimizer": "SGD", "options": {"momentum": 0.9}},
            "layers": {"use": "layer_sched", "layer_decay": 0.8},
        },
        "trainer": {"max_steps": 5},
        "checkpoint": {"save_at_end": False},
        "logging": {"every": 1},
        "progress": {"enabled": False},
    }
    engine = Engine()
    engine.run(recipe)
    assert engine.state.clock.step == 5
    assert type(engine.state.optimizers["main"]).__name__ == "SGD"
    bad = {**recipe, "plugins": {**recipe["plugins"], "lr": {"use": "lr_sched", "schedule": "cosine_with_min"}}}
    with pytest.raises(RecipeError, match="did you mean 'cosine_with_min_lr'"):
        Engine().run(bad)
    bad = {**recipe, "plugins": {**recipe["plugins"], "optim": {"use": "optim_sched", "optimizer": "Adamw"}}}
    with pytest.raises(RecipeError, match="did you mean 'AdamW'"):
        Engine().run(bad)
    bad = {**recipe, "plugins": {**recipe["plugins"], "layers": {"use": "layer_sched", "layer_decy": 0.8}}}
    with pytest.raises(RecipeError, match="did you mean 'layer_decay'"):
        Engine().run(bad)


def test_a_schedule_from_the_algebra_is_a_factor(run_dir: Path) -> None:
    from hookengine import schedule as schedules

    factor = schedules.warmup(2, schedules.cosine(1.0, 0.1, 6))
    engine = make_engine(run_dir, trainer={"max_steps": 8, "lr": LR}, plugins=[("lr_sched", {"schedule": factor})])
    seen = record_lrs(engine)
    engine.run()
    assert [r[0] for r in seen] == [LR * factor(k) for k in range(8)]
