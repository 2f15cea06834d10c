"""Keras 3 models (torch backend) trained by the engine, and Keras callbacks as listeners.

With the torch backend a Keras model is an ``nn.Module``: its trainable variables are
torch parameters, so the engine's optimizer, checkpoints and DDP see it as any other
model. Keras must be imported with ``KERAS_BACKEND=torch``; this module sets that default
before it imports keras, and refuses a keras already running on another backend.
Keras writes ``~/.keras/keras.json`` unless ``KERAS_HOME`` is set (see docs/TRAPS.md).
"""

from __future__ import annotations

import os
from typing import Any

from .base import Routine

__all__ = ["KerasRoutine", "KerasCallbacks", "import_keras"]


def import_keras() -> Any:
    """``keras``, on the torch backend (an error names the backend when it is another)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    backend = keras.backend.backend()
    if backend != "torch":
        raise RuntimeError(
            f"keras runs on the {backend!r} backend; set KERAS_BACKEND=torch before anything imports keras"
        )
    return keras


class KerasRoutine(Routine):
    """Train a Keras model with its own loss (``model.compute_loss``: compiled loss plus
    regularisation losses) on batches of (inputs, targets).

    Args:
        model: ``module:attr`` of a function (or class) that returns a Keras model.
        model_options: keyword arguments for it.
        model_name: the model's name in ``state.models``.
        loss: a Keras loss (a name, or ``{"class_name": ..., "config": {...}}``); the model is
            compiled with it. Without it the factory must return a compiled model.
        compile_options: more keyword arguments for ``model.compile`` (not ``optimizer``:
            the engine's optimizer trains the model).
        input_shape: build the model for inputs of this shape (without the batch axis)
            when the factory returns an unbuilt model.
        inputs, targets: keys (dict batches) or positions (tuple batches).
        seed: ``keras.utils.set_random_seed`` before building (weights and dropout seeds;
            it also seeds Python, NumPy and torch).
    """

    name = "keras"

    def __init__(
        self,
        model: str,
        model_options: dict[str, Any] | None = None,
        model_name: str = "model",
        loss: str | dict[str, Any] | None = None,
        compile_options: dict[str, Any] | None = None,
        input_shape: list[int] | None = None,
        inputs: str | int = 0,
        targets: str | int = 1,
        seed: int | None = None,
    ) -> None:
        if compile_options and "optimizer" in compile_options:
            raise ValueError("keras.compile_options.optimizer: the engine's optimizer trains the model; use trainer.optimizer")
        self.model_ref = model
        self.model_options = dict(model_options or {})
        self.model_name = model_name
        self.loss_spec = loss
        self.compile_options = dict(compile_options or {})
        self.input_shape = input_shape
        self.inputs, self.targets = inputs, targets
        self.seed = seed

    def build(self, state: Any) -> None:
        state.models[self.model_name] = self.make_model()
        self.device = self.engine.runtime.device

    def make_model(self) -> Any:
        """Build (and compile, when a loss is given) the Keras model."""
        from ..core.plugins import resolve

        keras = import_keras()
        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
        model = resolve(self.model_ref)(**self.model_options)
        if not isinstance(model, keras.Model):
            raise TypeError(f"keras.model: {self.model_ref!r} returned {type(model).__name__}, not a keras.Model")
        if self.input_shape is not None and not model.built:
            model.build((None, *self.input_shape))
        if self.loss_spec is not None:
            model.compile(loss=keras.losses.get(self.loss_spec), **self.compile_options)
        if not getattr(model, "compiled", False):
            raise ValueError(f"keras: the model from {self.model_ref!r} is not compiled; give keras.loss")
        if not model.built:
            raise ValueError(f"keras: the model from {self.model_ref!r} is not built; give keras.input_shape")
        return model

    def _split(self, batch: Any) -> tuple[Any, Any]:
        x, y = batch[self.inputs], batch[self.targets]
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def _model_loss(self, batch: Any, training: bool) -> Any:
        x, y = self._split(batch)
        model = self.engine.state.models[self.model_name]
        keras_model = self.engine.runtime.unwrap(model)
        y_pred = model(x, training=training)
        return keras_model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)

    def loss(self, batch: Any) -> Any:
        return self._model_loss(batch, training=True)

    def metrics(self, batch: Any) -> dict[str, float]:
        return {"val_loss": float(self._model_loss(batch, training=False))}


class KerasCallbacks:
    """Plugin ``keras_callbacks``: Keras callbacks driven by the engine's events.

    ``on_train_begin`` (at ``setup``, after the models exist), ``on_epoch_begin/end``,
    ``on_train_batch_begin/end`` (logs: ``loss``), ``on_train_end`` (at ``run_end``).
    Epoch-end logs are the engine's metrics (``loss``, ``val_loss``...). A callback that
    sets ``model.stop_training`` (``EarlyStopping``) stops the run.

    Args:
        callbacks: Keras callbacks: instances, ``module:attr`` references, or
            ``{"callback": "module:attr", **arguments}``.
        model: the name in ``state.models`` of the model the callbacks see.
    """

    name = "keras_callbacks"

    def __init__(self, callbacks: list[Any] | None = None, model: str = "model") -> None:
        self.specs = list(callbacks or [])
        self.model_name = model
        self.callbacks: Any = None
        self._batch = 0

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._train_begin, priority="last")  # after the routines built the models
        engine.on("epoch_start", self._epoch_begin)
        engine.on("batch_start", self._batch_begin)
        engine.on("batch_end", self._batch_end)
        engine.on("epoch_end", self._epoch_end)
        engine.on("run_end", self._train_end)

    def _make(self, spec: Any) -> Any:
        from ..core.plugins import resolve

        if isinstance(spec, str):
            target = resolve(spec)
            return target() if isinstance(target, type) else target
        if isinstance(spec, dict):
            options = dict(spec)
            return resolve(options.pop("callback"))(**options)
        return spec

    def _logs(self) -> dict[str, float]:
        logs = {}
        for key, value in self.engine.state.metrics.items():
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, (int, float)):
                logs[key] = float(value)
        return logs

    def _train_begin(self, state: Any) -> None:
        keras = import_keras()
        model = self.engine.runtime.unwrap(state.models[self.model_name])
        callbacks = [self._make(spec) for spec in self.specs]
        self.callbacks = keras.callbacks.CallbackList(callbacks, model=model, **self._params(state))
        model.stop_training = False
        self.callbacks.on_train_begin(self._logs())

    def _params(self, state: Any) -> dict[str, Any]:
        """What ``model.fit`` would tell its callbacks: verbosity, epochs, steps per epoch."""
        params: dict[str, Any] = {"verbose": 0}
        phases = state.plan.phases
        params["epochs"] = sum(p.epochs or 0 for p in phases) or None
        loader = state.dataloaders.get(phases[0].data)
        if hasattr(loader, "__len__"):
            params["steps"] = len(loader)
        return params

    def _epoch_begin(self, state: Any) -> None:
        self.callbacks.on_epoch_begin(state.clock.epoch, {})

    def _batch_begin(self, state: Any) -> None:
        self._batch = state.clock.batch_in_epoch
        self.callbacks.on_train_batch_begin(self._batch, {})

    def _batch_end(self, state: Any, loss: Any) -> None:
        self.callbacks.on_train_batch_end(self._batch, {"loss": float(loss)})
        self._maybe_stop(state)

    def _epoch_end(self, state: Any) -> None:
        # The loop counts the epoch as done before it fires epoch_end.
        self.callbacks.on_epoch_end(state.clock.epoch - 1, self._logs())
        self._maybe_stop(state)

    def _train_end(self, state: Any) -> None:
        self.callbacks.on_train_end(self._logs())

    def _maybe_stop(self, state: Any) -> None:
        model = self.engine.runtime.unwrap(state.models[self.model_name])
        if getattr(model, "stop_training", False):
            state.control.stop("a Keras callback set model.stop_training")
