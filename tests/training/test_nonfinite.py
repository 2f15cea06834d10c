"""Non-finite state is never written: NaN gradients with a finite loss, on a real model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from hookengine import Engine
from hookengine.training.checkpoint import checkpoints_in, latest_checkpoint, load_tree
from hookengine.training.trainer import NonFiniteLossError, NonFiniteStateError


def engine_for(run_dir: Path, max_steps: int, every: int = 2, resume: str | None = None, **trainer) -> Engine:
    from tests.training.signal_plugins import toy_data

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(toy_data)
    engine.use("supervised", model="tests.training.signal_plugins:TinyMLP", loss="mse_loss")
    engine.use_defaults({
        "trainer": {"max_steps": max_steps, "lr": 0.01, "stop_signals": [], **trainer},
        "checkpoint": {"every": every, "keep_last": 0, "resume": resume},
        "logging": {"every": 100, "plot": False},
        "progress": {"enabled": False},
    })
    return engine


def poison_gradients_at(engine: Engine, step: int) -> None:
    """At ``step`` the first layer's weight gradient is multiplied by inf; the loss stays finite."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if engine.state.clock.step == step else grad

    @engine.on("setup", priority="last")
    def register(state) -> None:
        state.models["model"].net[0].weight.register_hook(hook)


def assert_every_checkpoint_finite(folder: Path) -> list[int]:
    steps = []
    for path in checkpoints_in(folder):
        tree = load_tree(path)
        for name, tensor in tree["models"]["model"].items():
            assert torch.isfinite(tensor).all(), f"{path.name}: {name} is not finite"
        for value in _tensors(tree["optimizers"]):
            assert torch.isfinite(value).all(), f"{path.name}: optimizer state is not finite"
        steps.append(tree["clock"]["step"])
    return steps


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def test_nan_gradients_with_finite_loss_are_never_checkpointed_and_resume_works(run_dir: Path) -> None:
    engine = engine_for(run_dir, max_steps=12)
    poison_gradients_at(engine, 5)
    losses: list[float] = []
    engine.on("step_end", lambda state, loss: losses.append(float(loss)))
    with pytest.raises(NonFiniteStateError, match=r"not finite at step 6.*step-00000004 is kept"):
        engine.run()
    assert all(torch.isfinite(torch.tensor(losses[:6]))), "the loss of the poisoned step was finite"
    folder = run_dir / "checkpoints"
    assert assert_every_checkpoint_finite(folder) == [2, 4]
    # resume from the kept checkpoint, without the poison: it trains to the end, finite
    again = engine_for(run_dir, max_steps=12, resume="latest")
    again.run()
    assert again.state.clock.step == 12
    assert assert_every_checkpoint_finite(folder)[-1] == 12


def test_the_clipped_gradient_norm_names_the_poisoned_step(run_dir: Path) -> None:
    engine = engine_for(run_dir, max_steps=12, grad_clip=1.0)
    poison_gradients_at(engine, 5)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (nan|inf) at step 5 .*step-00000004 is kept"):
        engine.run()
    assert assert_every_checkpoint_finite(run_dir / "checkpoints") == [2, 4]


def test_ignore_warns_writes_no_nonfinite_checkpoint_and_fails_at_the_end(run_dir: Path) -> None:
    engine = engine_for(run_dir, max_steps=10, nonfinite="ignore", finite_check_every=1)
    poison_gradients_at(engine, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NonFiniteStateError, match="at the end of the run"):
            engine.run()
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # the loss is NaN from step 4 on: one warning for that occurrence, one per refused checkpoint
    assert sum("loss is nan at step 4" in t for t in texts) == 1, texts
    assert sum("loss is" in t for t in texts) == 1, texts
    assert sum("that checkpoint is not written" in t for t in texts) == 4, texts  # steps 4, 6, 8, 10
    assert assert_every_checkpoint_finite(run_dir / "checkpoints") == [2]
    assert engine.state.metrics["refused_checkpoints"] == 4


def test_skip_still_skips_nonfinite_losses_and_stops_on_a_nonfinite_state(run_dir: Path) -> None:
    engine = engine_for(run_dir, max_steps=6, nonfinite="skip")

    @engine.attach("compute_loss")
    def poisoned(next_impl, batch):
        loss = next_impl(batch)
        return loss * float("nan") if engine.state.clock.batch_in_epoch in (1, 3) else loss

    engine.run()
    assert engine.state.clock.step == 6 and engine.state.metrics["skipped_nonfinite"] == 2
    assert assert_every_checkpoint_finite(run_dir / "checkpoints") == [2, 4, 6]

    other = engine_for(run_dir / "other", max_steps=8, nonfinite="skip")
    poison_gradients_at(other, 3)
    with pytest.raises(NonFiniteStateError, match="not finite at step 4"):
        other.run()
    assert assert_every_checkpoint_finite(run_dir / "other" / "checkpoints") == [2]


def test_stop_reads_the_loss_only_at_read_points(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-step host read of the loss: a NaN loss is found at the next read point."""
    engine = engine_for(run_dir, max_steps=40, every=0, optimizer="SGD", finite_check_every=10)
    reads = {"steps": set(), "on": False}
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if reads["on"]:
                reads["steps"].add(engine.state.clock.step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    engine.on("step_end", lambda state: reads.update(on=True), once=1)
    engine.on("step_end", lambda state: reads.update(on=False), once=29)
    engine.run()
    # Only at the read points, steps 10 and 20 (was every step). CPU values are read one by
    # one there (no device to synchronise); device values are stacked and read once.
    assert reads["steps"] == {10, 20}, reads

    poisoned = engine_for(run_dir / "nan", max_steps=40, every=0, optimizer="SGD", finite_check_every=10)

    @poisoned.attach("compute_loss")
    def nan_at_13(next_impl, batch):
        loss = next_impl(batch)
        return loss * float("nan") if poisoned.state.clock.step == 13 else loss

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 13 .*no checkpoint was written"):
        poisoned.run()
    assert poisoned.state.clock.step == 20  # found at the read point, nothing written meanwhile
    assert latest_checkpoint(run_dir / "nan" / "checkpoints") is None
