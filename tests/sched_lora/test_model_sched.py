"""model_sched: per-phase training, step ranges, teachers, EMA equal to diffusers' EMAModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine.sched.model import EMASpec, ema_decay

from .conftest import DIGITS_MODEL, assert_equal_tensors, digits_engine, stop_at, weights

PHASES = [{"name": "head", "steps": 3, "train": ["model.6", "model.9"]}, {"name": "all", "steps": 3, "train": ["model"]}]


def ema_model(params: Any, **options: Any) -> Any:
    from diffusers.training_utils import EMAModel

    return EMAModel(params, **options)


def track_changes(engine: Any) -> list[set[str]]:
    """Names of the model's parameters that each optimizer step changed."""
    changes: list[set[str]] = []
    before: dict[str, torch.Tensor] = {}
    engine.on("batch_start", lambda state: before.update(weights(state.models["model"])))

    def after(state: Any) -> None:
        now = weights(state.models["model"])
        changes.append({k for k in now if not torch.equal(now[k], before[k])})

    engine.on("step_end", after)
    return changes


# --------------------------------------------------------------- training
def test_phases_train_only_the_models_and_patterns_they_name(run_dir: Path) -> None:
    engine = digits_engine(run_dir, model_sched={}, phases=PHASES)
    changes = track_changes(engine)
    engine.run()
    head = {"6.weight", "6.bias", "9.weight", "9.bias"}
    assert changes[:3] == [head] * 3
    assert all(c == set(weights(engine.state.models["model"])) for c in changes[3:])
    assert len(engine.state.optimizers["main"].param_groups[0]["params"]) == 8  # frozen ones stay in it


def test_step_range_rule_stops_training_a_part(run_dir: Path) -> None:
    engine = digits_engine(run_dir, model_sched={"train": {"model.0": {"until": 2}, "model.9": {"from": 3}}}, max_steps=4)
    changes = track_changes(engine)
    engine.run()
    conv0, head = {"0.weight", "0.bias"}, {"9.weight", "9.bias"}
    assert [bool(c & conv0) for c in changes] == [True, True, False, False]
    assert [bool(c & head) for c in changes] == [False, False, False, True]


def test_teacher_never_trains_and_stays_in_eval_mode(run_dir: Path) -> None:
    from hookengine.core.plugins import resolve

    engine = digits_engine(run_dir, model_sched={"teachers": ["teacher"]}, max_steps=3)
    modes: list[bool] = []

    def add_teacher(state: Any) -> None:
        state.models["teacher"] = resolve(DIGITS_MODEL)()

    engine.on("setup", add_teacher, priority=5)
    engine.on("step_end", lambda state: modes.append(state.models["teacher"].training))
    start: dict[str, torch.Tensor] = {}
    engine.on("setup", lambda state: start.update(weights(state.models["teacher"])), priority=-1000)
    engine.run()
    teacher = engine.state.models["teacher"]
    assert_equal_tensors(weights(teacher), start)
    assert modes == [False] * 3 and not any(p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for g in engine.state.optimizers["main"].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}


def test_unknown_model_in_a_phase_is_an_error(run_dir: Path) -> None:
    phases = [{"name": "a", "steps": 2, "train": ["modle"]}]
    engine = digits_engine(run_dir, model_sched={}, phases=phases)
    with pytest.raises(KeyError, match=r"phases\.a\.train: 'modle' names no model \(did you mean 'model'\?\)"):
        engine.run()


# -------------------------------------------------------------------- EMA
def test_decay_formula_equals_diffusers() -> None:
    for options in ({}, {"warmup": True, "power": "3/4", "inv_gamma": 2.0}, {"update_after_step": 5, "min_decay": 0.5}):
        spec = EMASpec(model="m", decay=0.999, **options)
        reference = ema_model(
            [torch.nn.Parameter(torch.zeros(1))], decay=0.999, min_decay=spec.min_decay,
            update_after_step=spec.update_after_step, use_ema_warmup=spec.warmup, inv_gamma=spec.inv_gamma, power=spec.power,
        )
        assert [ema_decay(spec, t) for t in range(1, 60)] == [reference.get_decay(t) for t in range(1, 60)]


def test_ema_equals_diffusers_ema_model_step_by_step(run_dir: Path) -> None:
    options = {"model": "model", "decay": 0.95, "warmup": True, "power": "2/3", "update_after_step": 1}
    engine = digits_engine(run_dir, model_sched={"ema": options}, phases=PHASES)
    reference: list[Any] = []
    engine.on("setup", lambda state: reference.append(
        ema_model(state.models["model"].parameters(), decay=0.95, use_ema_warmup=True, power=2 / 3, update_after_step=1)
    ), priority=-1000)
    compared: list[int] = []

    def compare(state: Any) -> None:
        reference[0].step(state.models["model"].parameters())
        ema = engine.plugins["model_sched"].ema("model")
        names = [n for n, _ in state.models["model"].named_parameters()]
        for name, expected in zip(names, reference[0].shadow_params):
            assert torch.equal(ema.shadow[name], expected), (state.clock.step, name)
        compared.append(state.clock.step)

    engine.on("step_end", compare, priority=-100)
    engine.run()
    assert compared == list(range(1, 7))
    # frozen parameters (the convs in the first phase) are copied, as EMAModel does
    assert engine.state.metrics["ema_decay/model"] == reference[0].cur_decay_value


def test_ema_of_lora_weights_equals_ema_model_on_the_cpu_every_second_step(run_dir: Path) -> None:
    lora = {"adapters": {"a": {"targets": ["6", "9"], "rank": 4}}}
    sched = {"ema": {"model": "model", "decay": 0.9, "cpu": True, "update_every": 2}}
    engine = digits_engine(run_dir, lora=lora, model_sched=sched, max_steps=6)
    reference: list[Any] = []

    def adapter(state: Any) -> list[torch.nn.Parameter]:
        return [p for p in state.models["model"].parameters() if p.requires_grad]

    engine.on("setup", lambda state: reference.append(ema_model(adapter(state), decay=0.9)), priority=-1000)
    engine.on("step_end", lambda state: reference[0].step(adapter(state)), priority=-100, every=2)
    engine.run()
    ema = engine.plugins["model_sched"].ema("model")
    names = [n for n, p in engine.state.models["model"].named_parameters() if p.requires_grad]
    assert sorted(ema.shadow) == sorted(names) and all(".lora_" in n for n in names)
    assert ema.updates == reference[0].optimization_step == 3
    for name, expected in zip(names, reference[0].shadow_params):
        assert torch.equal(ema.shadow[name], expected), name
    assert all(t.device.type == "cpu" for t in ema.shadow.values())


def test_ema_weights_swap_in_and_back(run_dir: Path) -> None:
    engine = digits_engine(run_dir, model_sched={"ema": {"model": "model", "decay": 0.9, "evaluate": True, "save": True}}, max_steps=3)
    engine.run()
    plugin = engine.plugins["model_sched"]
    model = engine.state.models["model"]
    trained = weights(model)
    shadow = plugin.ema("model").shadow
    with plugin.ema_weights():
        for name, param in model.named_parameters():
            assert torch.equal(param, shadow[name])
    assert_equal_tensors(weights(model), trained)
    assert not torch.equal(shadow["0.weight"], trained["0.weight"])
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "ema" / "model.safetensors"))
    assert_equal_tensors(saved, {k: v for k, v in shadow.items()})
    # evaluate: true runs the evaluate slot with the EMA weights swapped in
    with_ema = engine.call("evaluate")["val_loss"]
    plugin.ema("model").spec.evaluate = False
    plain = engine.call("evaluate")["val_loss"]
    with plugin.ema_weights():
        by_hand = engine.call("evaluate")["val_loss"]
    assert with_ema == by_hand != plain
    assert_equal_tensors(weights(model), trained)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("stop", [2, 3])
def test_resume_across_the_phase_boundary_is_exact(run_dir: Path, tmp_path: Path, stop: int) -> None:
    sched = {"ema": {"model": "model", "decay": 0.9, "warmup": True}}
    reference = digits_engine(tmp_path / "reference", model_sched=sched, phases=PHASES)
    reference.run()

    first = digits_engine(run_dir, model_sched=sched, phases=PHASES)
    stop_at(first, stop)
    first.run()
    second = digits_engine(run_dir, model_sched=sched, phases=PHASES, checkpoint={"resume": "latest"})
    changes = track_changes(second)
    second.run()
    assert second.state.clock.step == 6
    if stop == 2:
        assert changes[0] == {"6.weight", "6.bias", "9.weight", "9.bias"}  # still the head phase
    assert_equal_tensors(weights(second.state.models["model"]), weights(reference.state.models["model"]))
    mine, theirs = second.plugins["model_sched"].ema("model"), reference.plugins["model_sched"].ema("model")
    assert mine.updates == theirs.updates == 6
    assert_equal_tensors(mine.shadow, theirs.shadow)
