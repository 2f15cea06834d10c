"""Keras 3 (torch backend): trained by the engine exactly as by hand; callbacks as listeners."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine.core.plugins import model_factory

from .conftest import quiet_engine, record_losses

keras = pytest.importorskip("keras")  # conftest set KERAS_BACKEND=torch before this import

KERAS = "hookengine.routines.keras:KerasRoutine"
LOSS = {"class_name": "SparseCategoricalCrossentropy", "config": {"from_logits": True}}


@model_factory
def small_classifier(hidden: int = 16, dropout: float = 0.2) -> Any:
    """A Keras MLP for 12 features and 5 classes, with dropout (so the seed handling matters)."""
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(hidden, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3)),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(5),
    ])


def batches(count: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((count * size, 12), generator=generator)
    y = (x[:, :5].argmax(dim=1))  # a learnable rule
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(count)]


def use_keras(engine: Any, data: list, **options: Any) -> Any:
    routine = engine.use(KERAS, name="keras", model=f"{__name__}:small_classifier", loss=LOSS, seed=0, **options)
    engine.on("setup", lambda state: state.dataloaders.update(train=data, val=data[:1]))
    return routine


def test_engine_training_equals_hand_written_torch_loop(run_dir: Path) -> None:
    data = batches()
    engine = quiet_engine(run_dir, epochs=3, lr=1e-2)
    use_keras(engine, data)
    losses = record_losses(engine)
    engine.run()
    trained = engine.state.models["model"]
    assert isinstance(trained, torch.nn.Module) and isinstance(trained, keras.Model)

    keras.utils.set_random_seed(0)
    model = small_classifier()
    model.compile(loss=keras.losses.get(LOSS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    expected = []
    for _ in range(3):
        for x, y in data:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            expected.append(loss.item())
    assert losses == expected
    assert expected[-1] < expected[0]
    for mine, theirs in zip(trained.trainable_weights, model.trainable_weights):
        assert torch.equal(mine.value, theirs.value), mine.path


class Recorder(keras.callbacks.Callback):
    """A Keras callback that writes down what it was told, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(("batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, sorted(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, "val_loss" in logs and "loss" in logs))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end",))


def test_keras_callbacks_are_called_in_order(run_dir: Path) -> None:
    data = batches(count=2)
    engine = quiet_engine(run_dir, epochs=2, eval_every=2)
    use_keras(engine, data)
    recorder = Recorder()
    engine.use("hookengine.routines.keras:KerasCallbacks", name="keras_callbacks", callbacks=[recorder])
    engine.run()
    epoch = lambda e: [("epoch_begin", e), ("batch_begin", 0), ("batch_end", 0, ["loss"]),  # noqa: E731
                       ("batch_begin", 1), ("batch_end", 1, ["loss"]), ("epoch_end", e, True)]
    assert recorder.calls == [("train_begin",), *epoch(0), *epoch(1), ("train_end",)]
    assert recorder.model is engine.state.models["model"]
    assert recorder.params["epochs"] == 2 and recorder.params["steps"] == 2


def test_early_stopping_callback_stops_the_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = batches(count=2)
    engine = quiet_engine(run_dir, epochs=6, eval_every=2)
    use_keras(engine, data)
    # No improvement can reach min_delta: EarlyStopping stops after its second epoch.
    engine.use("hookengine.routines.keras:KerasCallbacks", name="keras_callbacks",
               callbacks=[{"callback": "keras.callbacks:EarlyStopping", "monitor": "val_loss", "min_delta": 100.0, "patience": 1}])
    engine.run()
    assert engine.state.clock.epoch == 2
    reason = engine.state.control.stop_requested
    assert reason.startswith("Keras callback EarlyStopping set model.stop_training after epoch 1 (val_loss did not improve for 1 epoch(s); best ")
    assert f"stopped early: {reason}" in capsys.readouterr().out  # the end-of-run summary says why


def hand_loop_epoch_accuracy(data: list, epochs: int) -> list[float]:
    """The hand-written loop of the first test, with Keras' own accuracy metric reset at each
    epoch start and updated with each training batch's predictions (as Keras' fit does)."""
    keras.utils.set_random_seed(0)
    model = small_classifier()
    model.compile(loss=keras.losses.get(LOSS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    metric = keras.metrics.SparseCategoricalAccuracy()
    at_epoch_end = []
    for _ in range(epochs):
        metric.reset_state()
        for x, y in data:
            y_pred = model(x, training=True)
            model.compute_loss(x=x, y=y, y_pred=y_pred, training=True).backward()
            metric.update_state(y, y_pred.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        at_epoch_end.append(float(metric.result()))
    return at_epoch_end


def test_compiled_metrics_as_keras_fit_and_evaluate_compute_them(run_dir: Path) -> None:
    data, val = batches(), batches(count=3, size=10)
    engine = quiet_engine(run_dir, epochs=3, lr=1e-2, eval_every=2)  # evaluations inside epochs too
    engine.use(KERAS, name="keras", model=f"{__name__}:small_classifier", loss=LOSS, seed=0,
               metrics=["accuracy", {"class_name": "SparseTopKCategoricalAccuracy", "config": {"k": 2, "name": "top2"}}])
    engine.on("setup", lambda state: state.dataloaders.update(train=data, val=val))
    recorder = Recorder()
    engine.use("hookengine.routines.keras:KerasCallbacks", name="keras_callbacks", callbacks=[recorder])
    at_epoch_end: list[float] = []
    engine.on("epoch_end", lambda state: at_epoch_end.append(state.metric("accuracy")))
    evaluations: list[dict] = []
    engine.on("evaluate_end", lambda metrics: evaluations.append(dict(metrics)))
    engine.run()

    # Training: running means over each epoch, not disturbed by the evaluations in between.
    assert at_epoch_end == pytest.approx(hand_loop_epoch_accuracy(data, 3), abs=1e-7)
    # Evaluation: Keras' own evaluate on the same weights and data.
    model = engine.state.models["model"]
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    reference = model.evaluate(x, y, batch_size=10, verbose=0, return_dict=True)
    assert evaluations[-1]["val_accuracy"] == pytest.approx(reference["accuracy"], abs=1e-7)
    assert evaluations[-1]["val_top2"] == pytest.approx(reference["top2"], abs=1e-7)
    assert evaluations[-1]["val_loss"] == pytest.approx(reference["loss"], rel=1e-5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" in r and "top2" in r for r in records if r["kind"] == "train")
    assert all("val_accuracy" in r for r in records if r["kind"] == "eval") and len(evaluations) == 7
    # Callbacks see them as fit shows them: batch logs with the training metrics.
    assert {tuple(c[2]) for c in recorder.calls if c[0] == "batch_end"} == {("accuracy", "loss", "top2")}


def test_metrics_option_and_compile_options_metrics_are_exclusive() -> None:
    from hookengine.routines.keras import KerasRoutine

    with pytest.raises(ValueError, match="give the metrics once"):
        KerasRoutine(model="x:y", metrics=["accuracy"], compile_options={"metrics": ["mae"]})


def test_uncompiled_model_without_loss_is_a_clear_error(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(KERAS, name="keras", model=f"{__name__}:small_classifier")
    with pytest.raises(ValueError, match="is not compiled; give keras.loss"):
        engine.fire("setup")
