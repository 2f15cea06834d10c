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
        model: the Keras model: ``module:attr`` of a function (or class) that returns one;
            a ``.keras`` file to fine-tune (``keras.saving.load_model``); or the model's
            Keras config as data (``{"class_name": "Sequential", "config": {"layers":
            [...]}}``, what ``model.get_config()`` / ``keras.saving.serialize_keras_object``
            give), so a recipe describes a model without a line of Python. Files and
            configs load in Keras' ``safe_mode`` (no lambdas: no code from data).
        model_options: keyword arguments for the function.
        model_name: the model's name in ``state.models``.
        loss: a Keras loss (a name, or ``{"class_name": ..., "config": {...}}``); the model is
            compiled with it. Without it the factory must return a compiled model.
        compile_options: more keyword arguments for ``model.compile`` (not ``optimizer``:
            the engine's optimizer trains the model). Its ``metrics`` are honoured as
            ``metrics`` below.
        metrics: Keras metrics (names such as ``accuracy``, or ``{"class_name": ...,
            "config": {...}}``) compiled into the model. As in Keras' ``fit``: in training
            they are running means over the epoch (reset at each epoch start; after a
            resume, from the resume on) under their Keras names (``accuracy``); evaluation
            reports them over the whole validation data as ``val_NAME``, as Keras'
            ``evaluate`` would. A model the factory compiled with metrics keeps them.
        input_shape: build the model for inputs of this shape (without the batch axis)
            when the factory returns an unbuilt model.
        inputs, targets: keys (dict batches) or positions (tuple batches).
        seed: ``keras.utils.set_random_seed`` before building (weights and dropout seeds;
            it also seeds Python, NumPy and torch).
    """

    name = "keras"

    def __init__(
        self,
        model: str | dict[str, Any],
        model_options: dict[str, Any] | None = None,
        model_name: str = "model",
        loss: str | dict[str, Any] | None = None,
        compile_options: dict[str, Any] | None = None,
        input_shape: list[int] | None = None,
        inputs: str | int = 0,
        targets: str | int = 1,
        seed: int | None = None,
        metrics: list[str | dict[str, Any]] | None = None,
    ) -> None:
        if compile_options and "optimizer" in compile_options:
            raise ValueError("keras.compile_options.optimizer: the engine's optimizer trains the model; use trainer.optimizer")
        if metrics is not None and compile_options and "metrics" in compile_options:
            raise ValueError("keras.metrics and keras.compile_options.metrics: give the metrics once")
        self.model_ref = model
        self.model_options = dict(model_options or {})
        self.model_name = model_name
        self.loss_spec = loss
        self.compile_options = dict(compile_options or {})
        self.input_shape = input_shape
        self.inputs, self.targets = inputs, targets
        self.seed = seed
        self.metric_specs = metrics
        self.tracks_metrics = False  # the model has compiled metrics (known once it is built)
        self._evaluating = False

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        engine.on("epoch_start", self._reset_metrics)
        engine.attach("evaluate", self._evaluate)

    def build(self, state: Any) -> None:
        model = state.models[self.model_name] = self.make_model()
        self.device = self.engine.runtime.device
        self.tracks_metrics = any(m.name != "loss" for m in model.metrics)

    def make_model(self) -> Any:
        """Build (and compile, when a loss is given) the Keras model."""
        keras = import_keras()
        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
        model = self._load_or_build(keras)
        if not isinstance(model, keras.Model):
            raise TypeError(f"keras.model: {self.model_ref!r} returned {type(model).__name__}, not a keras.Model")
        if self.input_shape is not None and not model.built:
            model.build((None, *self.input_shape))
        options = dict(self.compile_options)
        specs = self.metric_specs if self.metric_specs is not None else options.pop("metrics", None)
        if specs is not None:
            # Names stay names: Keras picks the accuracy that fits the targets when compiling;
            # {"class_name", "config"} mappings become metric objects.
            options["metrics"] = [keras.metrics.get(m) if isinstance(m, dict) else m for m in specs]
        if self.loss_spec is not None:
            model.compile(loss=keras.losses.get(self.loss_spec), **options)
        elif specs is not None and getattr(model, "compiled", False):
            model.compile(loss=model.loss, **options)  # the factory's loss, with these metrics
        if not getattr(model, "compiled", False):
            raise ValueError(f"keras: the model from {self.model_ref!r} is not compiled; give keras.loss")
        if not model.built:
            raise ValueError(f"keras: the model from {self.model_ref!r} is not built; give keras.input_shape")
        return model

    def _load_or_build(self, keras: Any) -> Any:
        """The model from a config mapping, a ``.keras`` file or a ``module:attr`` factory."""
        from ..core.plugins import resolve

        source = self.model_ref
        if isinstance(source, dict):
            try:
                # Keras' own configs name the module; hand-written ones may leave it out.
                models = {"Sequential": keras.Sequential, "Functional": keras.Model, "Model": keras.Model}
                return keras.saving.deserialize_keras_object(source, custom_objects=models, safe_mode=True)
            except Exception as exc:  # Keras raises many types for a bad config
                raise ValueError(f"keras.model: the config does not describe a Keras model: {type(exc).__name__}: {exc}") from exc
        if str(source).endswith(".keras"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"keras.model: no file {source!r}")
            return keras.saving.load_model(source, safe_mode=True)
        return resolve(source, "model", "keras.model")(**self.model_options)

    def _split(self, batch: Any) -> tuple[Any, Any]:
        x, y = batch[self.inputs], batch[self.targets]
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def _model_loss(self, batch: Any, training: bool) -> Any:
        import torch

        x, y = self._split(batch)
        model = self.engine.state.models[self.model_name]
        keras_model = self.engine.runtime.unwrap(model)
        y_pred = model(x, training=training)
        loss = keras_model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
        if self.tracks_metrics and (training or self._evaluating):
            with torch.no_grad():  # as Keras' train_step/test_step: metrics of this forward's predictions
                results = keras_model.compute_metrics(x, y, y_pred.detach())
            if training:  # 0-d tensors: read (synced) only when they are logged
                self.engine.state.metrics.update((k, v) for k, v in results.items() if k != "loss")
        return loss

    def loss(self, batch: Any) -> Any:
        return self._model_loss(batch, training=True)

    def metrics(self, batch: Any) -> dict[str, float]:
        return {"val_loss": float(self._model_loss(batch, training=False))}

    # ------------------------------------------------------------ metrics
    def _keras_model(self) -> Any:
        return self.engine.runtime.unwrap(self.engine.state.models[self.model_name])

    def _reset_metrics(self, state: Any) -> None:
        if self.tracks_metrics and self.active():
            self._keras_model().reset_metrics()  # Keras' fit resets them at every epoch start

    def _evaluate(self, next_impl: Any, data: str = "val") -> dict[str, float]:
        """The loop's evaluation, plus the compiled metrics over all of ``data`` (``val_NAME``),
        accumulated by the metrics themselves as in Keras' ``evaluate``; the training
        metrics' running state is kept aside and put back."""
        if not self.tracks_metrics or not self.active():
            return next_impl(data)
        model = self._keras_model()
        variables = list(model.metrics_variables)
        training_state = [v.value.clone() for v in variables]
        model.reset_metrics()
        self._evaluating = True
        try:
            results = next_impl(data)
            if results:
                if self.engine.runtime.distributed:
                    import torch.distributed as dist

                    for v in variables:  # sums (totals, counts, confusion counts) over processes
                        dist.all_reduce(v.value)
                results = dict(results)
                for key, value in model.get_metrics_result().items():
                    if key != "loss":  # the loop's val_loss is the loss (weighted by batch size)
                        results[f"val_{key}"] = float(value)
        finally:
            self._evaluating = False
            for v, value in zip(variables, training_state):
                v.assign(value)
        return results


class KerasCallbacks:
    """Plugin ``keras_callbacks``: Keras callbacks driven by the engine's events.

    ``on_train_begin`` (at ``setup``, after the models exist), ``on_epoch_begin/end``,
    ``on_train_batch_begin/end`` (logs: ``loss``), ``on_train_end`` (at ``run_end``).
    Epoch-end logs are the engine's metrics (``loss``, ``val_loss``, the compiled metrics...).
    A callback that sets ``model.stop_training`` (``EarlyStopping``) stops the run; the
    stop reason (``state.control.stop_requested``, shown in the end-of-run summary) names
    the callback. Batch-end logs are built (a host sync for the loss) only when a
    callback overrides ``on_train_batch_end``.

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
        self._batch_listeners: list[Any] = []  # callbacks that override on_train_batch_end

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
            target = resolve(spec, "callback", "keras_callbacks.callbacks")
            return target() if isinstance(target, type) else target
        if isinstance(spec, dict):
            options = dict(spec)
            return resolve(options.pop("callback"), "callback", "keras_callbacks.callbacks")(**options)
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
        self._batch_listeners = [c for c in self.callbacks.callbacks if _overrides_batch_end(c, keras)]
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
        if not self._batch_listeners:
            return  # nobody reads batch logs: no host sync for the loss
        # As fit's batch logs: the training metrics (the compiled ones are running means), the loss.
        logs = {k: v for k, v in self._logs().items() if not k.startswith("val_")}
        logs["loss"] = float(loss)
        # One by one (not through the CallbackList), so the one that stops the run is known.
        for callback in self._batch_listeners:
            callback.on_train_batch_end(self._batch, logs)
            if self._maybe_stop(state, callback, f"batch {self._batch} of epoch {state.clock.epoch}"):
                break

    def _epoch_end(self, state: Any) -> None:
        # The loop counts the epoch as done before it fires epoch_end.
        epoch, logs = state.clock.epoch - 1, self._logs()
        for callback in self.callbacks.callbacks:
            callback.on_epoch_end(epoch, logs)
            if self._maybe_stop(state, callback, f"epoch {epoch}"):
                break

    def _train_end(self, state: Any) -> None:
        self.callbacks.on_train_end(self._logs())

    def _maybe_stop(self, state: Any, callback: Any, when: str) -> bool:
        model = self.engine.runtime.unwrap(state.models[self.model_name])
        if not getattr(model, "stop_training", False):
            return False
        if state.control.stop_requested is None:
            state.control.stop(_stop_reason(callback, when))
        return True


def _overrides_batch_end(callback: Any, keras: Any) -> bool:
    """Whether ``callback`` does anything at a training batch's end (its own
    ``on_train_batch_end``, or the older ``on_batch_end`` the default one calls)."""
    base = keras.callbacks.Callback
    return any(getattr(type(callback), name) is not getattr(base, name) for name in ("on_train_batch_end", "on_batch_end"))


def _stop_reason(callback: Any, when: str) -> str:
    """``Keras callback EarlyStopping stopped training after epoch 3 (val_loss ...)``."""
    reason = f"Keras callback {type(callback).__name__} set model.stop_training after {when}"
    monitor = getattr(callback, "monitor", None)
    if monitor is not None and hasattr(callback, "best") and hasattr(callback, "patience"):
        best = callback.best
        best_text = f"{float(best):.4g}" if isinstance(best, (int, float)) or hasattr(best, "item") else str(best)
        reason += f" ({monitor} did not improve for {callback.patience} epoch(s); best {best_text})"
    return reason
