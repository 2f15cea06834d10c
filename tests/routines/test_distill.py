"""Distillation: KL/T² mixture of two teachers with scheduled weights, features, bad shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .conftest import quiet_engine

DISTILL = "hookengine.routines.distill:Distillation"
FEATURES, CLASSES = 12, 5


def mlp(classes: int = CLASSES, hidden: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def batches(count: int = 6, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn((size, FEATURES), generator=generator), torch.randint(0, CLASSES, (size,), generator=generator))
            for _ in range(count)]


def hinton(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook form: KL(p_teacher ‖ p_student) at temperature t, times t², batch mean."""
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1), reduction="batchmean") * t * t


def test_two_teachers_loss_is_the_scheduled_kl_mixture(run_dir: Path) -> None:
    from hookengine.models.cache import ModelCache

    teacher_a, teacher_b = mlp(seed=1), mlp(seed=2, hidden=32)
    before = {k: v.clone() for k, v in teacher_b.state_dict().items()}
    engine = quiet_engine(run_dir, max_steps=5, lr=1e-2)
    cache = engine.use(ModelCache, name="model_cache")
    cache.add("teacher_b", teacher_b)  # held by the cache only, not in state.models
    engine.state.models["teacher_a"] = teacher_a
    engine.state.models["student"] = mlp(seed=0)
    engine.use(
        DISTILL, name="distill",
        teachers={"teacher_a": {"schedule": "linear", "start": 1.0, "end": 0.0, "steps": 4}, "teacher_b": 0.5},
        temperature={"schedule": "linear", "start": 4.0, "end": 2.0, "steps": 4},
    )
    engine.on("setup", lambda state: state.dataloaders.update(train=batches()))
    checked: list[int] = []

    @engine.attach("compute_loss")
    def compare(next_impl, batch):
        loss = next_impl(batch)
        step = engine.state.clock.step
        t, weight_a = 4.0 - 0.5 * min(step, 4), 1.0 - min(step, 4) / 4
        x = batch[0]
        with torch.no_grad():
            student = engine.state.models["student"](x)
            expected = weight_a * hinton(student, teacher_a(x), t) + 0.5 * hinton(student, teacher_b(x), t)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        checked.append(step)
        return loss

    acquired: list[str] = []
    cache.subscribe(lambda event, **payload: acquired.append(event))
    engine.run()
    assert checked == [0, 1, 2, 3, 4]
    assert engine.state.metrics["distill_temperature"] == 2.0
    assert not teacher_a.training and not teacher_b.training
    assert all(not p.requires_grad for p in [*teacher_a.parameters(), *teacher_b.parameters()])
    assert all(torch.equal(v, teacher_b.state_dict()[k]) for k, v in before.items())
    assert cache.stats["hits"] + cache.stats["misses"] >= 5  # teacher_b came through acquire


def test_feature_and_hard_losses(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    student, teacher = mlp(seed=0), mlp(seed=3)
    engine.state.models.update(student=student, teacher=teacher)
    engine.use(DISTILL, name="distill", teachers=["teacher"], temperature=2.0, logit_weight=0.7,
               features={"0": "0", "1": "1"}, feature_weight=0.3, hard_weight=0.2)
    engine.fire("setup")
    x, y = batches(1)[0]
    loss = engine.call("compute_loss", (x, y))
    with torch.no_grad():
        s0, t0 = student[0](x), teacher[0](x)
        s2, t2 = student(x), teacher(x)
        expected = (0.7 * hinton(s2, t2, 2.0) + 0.3 * (F.mse_loss(s0, t0) + F.mse_loss(s0.relu(), t0.relu()))
                    + 0.2 * F.cross_entropy(s2, y))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student[0].weight.grad is not None and teacher[0].weight.grad is None


def test_teacher_with_other_output_shape_is_a_clear_error(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.state.models.update(student=mlp(), good=mlp(seed=1), wide=mlp(classes=7, seed=2))
    engine.use(DISTILL, name="distill", teachers=["good", "wide"])
    engine.fire("setup")
    with pytest.raises(ValueError, match=r"teacher 'wide' gives logits of shape \(8, 7\), but the student 'student' gives \(8, 5\)"):
        engine.call("compute_loss", batches(1)[0])


def test_feature_shape_mismatch_and_missing_teacher_are_clear_errors(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.state.models.update(student=mlp(hidden=16), teacher=mlp(hidden=32, seed=1))
    engine.use(DISTILL, name="distill", teachers=["teacher"], features={"0": "0"})
    engine.fire("setup")
    with pytest.raises(ValueError, match=r"teacher 'teacher' gives feature '0' \(student '0'\) of shape \(8, 32\), but .* \(8, 16\)"):
        engine.call("compute_loss", batches(1)[0])

    other = Engine(seed=0, run_dir=run_dir)
    other.state.models["student"] = mlp()
    other.use(DISTILL, name="distill", teachers=["nobody"])
    with pytest.raises(KeyError, match="no teacher 'nobody' in state.models"):
        other.fire("setup")


def test_accuracy_and_teacher_agreement_equal_a_plain_argmax(run_dir: Path) -> None:
    teacher_a, teacher_b = mlp(seed=1), mlp(seed=2, hidden=32)
    student = mlp(seed=0)
    val = batches(count=3, size=8)
    val[0][1][:3] = -100  # unlabelled positions count in neither the numerator nor the denominator
    engine = quiet_engine(run_dir, max_steps=4, lr=1e-2)
    engine.state.models.update(student=student, teacher_a=teacher_a, teacher_b=teacher_b)
    engine.use(DISTILL, name="distill", teachers=["teacher_a", "teacher_b"])
    engine.on("setup", lambda state: state.dataloaders.update(train=batches(), val=val))
    seen: list[int] = []

    @engine.attach("compute_loss")
    def compare(next_impl, batch):
        x, y = batch
        with torch.no_grad():  # the student before this step's update, as the routine sees it
            predicted = student(x).argmax(dim=-1)
            expected = {"accuracy": (predicted == y).float().mean(),
                        "agreement/teacher_a": (predicted == teacher_a(x).argmax(dim=-1)).float().mean(),
                        "agreement/teacher_b": (predicted == teacher_b(x).argmax(dim=-1)).float().mean()}
        loss = next_impl(batch)
        for key, value in expected.items():
            torch.testing.assert_close(engine.state.metrics[key], value)
        seen.append(engine.state.clock.step)
        return loss

    evaluations: list[dict] = []
    engine.on("evaluate_end", lambda metrics: evaluations.append(dict(metrics)))
    engine.run()
    assert seen == [0, 1, 2, 3]

    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        predicted = student(x).argmax(dim=-1)
        agree_a = (predicted == teacher_a(x).argmax(dim=-1)).float().mean().item()
    labelled = y != -100
    # The loop averages per-batch values weighted by batch size; batch 0 has 5 labels of 8.
    per_batch = [((predicted[i * 8:(i + 1) * 8] == y[i * 8:(i + 1) * 8]) & labelled[i * 8:(i + 1) * 8]).sum().item()
                 / labelled[i * 8:(i + 1) * 8].sum().item() for i in range(3)]
    final = evaluations[-1]
    assert final["val_accuracy"] == pytest.approx(sum(per_batch) / 3, abs=1e-6)
    assert final["val_agreement/teacher_a"] == pytest.approx(agree_a, abs=1e-6)
    assert "val_agreement/teacher_b" in final and 0.0 <= final["val_agreement/teacher_b"] <= 1.0


def test_no_accuracy_without_labels(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.state.models.update(student=mlp(), teacher=mlp(seed=1))
    engine.use(DISTILL, name="distill", teachers=["teacher"], inputs="x", targets="y")
    engine.fire("setup")
    engine.call("compute_loss", {"x": batches(1)[0][0]})  # a batch without labels
    assert "accuracy" not in engine.state.metrics and "agreement/teacher" in engine.state.metrics


@pytest.mark.parametrize(("options", "message"), [
    ({"ray": {"address": "auto"}}, "distill.ray is set but distill.teachers_on is 'local'"),
    ({"teachers_on": "ray", "ray": {"modls": {}}}, r"distill.ray: unknown key\(s\) \['modls'\]; known: \['models'"),
    ({"teachers_on": "ray", "ray": {"models": {"a": "x"}}}, r"distill.ray.models: no spec for teacher\(s\) \['b'\]"),
    ({"teachers_on": "ray", "ray": {"models": {"a": "x", "b": "y"}, "teachers_per_worker": 0}},
     "teachers_per_worker must be at least 1"),
    ({"teachers_on": "ray", "ray": {"models": {"a": "x", "b": "y"}, "timeout": 0}}, "distill.ray.timeout must be a positive"),
])
def test_bad_ray_teacher_options_are_one_line_errors(options: dict, message: str) -> None:
    """Checked when the plugin is used, before Ray starts (the cluster tests are in tests/test_ray_cluster.py)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'hookengine[scale]')")
    from hookengine import Engine

    with pytest.raises(ValueError, match=message):
        Engine().use(DISTILL, name="distill", teachers=["a", "b"], **options)
