"""The supervised routine: one model, one loss, batches of (inputs, targets)."""

from __future__ import annotations

from typing import Any

from ..core.plugins import resolve
from .base import Routine, built_by

__all__ = ["Supervised"]


class Supervised(Routine):
    """Train ``model`` on ``loss(model(inputs), targets)``.

    Args:
        model: ``module:attr`` of an ``nn.Module`` (or keras Model) class, or of a function
            marked ``@model_factory`` (or whose return annotation is such a class).
        model_options: keyword arguments for it.
        model_name: the name under which the model is registered in ``state.models``.
        loss: a ``torch.nn.functional`` name (``cross_entropy``, ``mse_loss``...) or ``module:attr``
            of a loss class, or of a function marked ``@recipe_callable("loss")``.
        inputs, targets: keys (dict batches) or positions (tuple batches) of the two parts.
        accuracy: also report ``val_accuracy`` (classification) in evaluation.
    """

    name = "supervised"

    def __init__(
        self,
        model: str,
        model_options: dict[str, Any] | None = None,
        model_name: str = "model",
        loss: str = "cross_entropy",
        inputs: str | int = 0,
        targets: str | int = 1,
        accuracy: bool = False,
    ) -> None:
        self.model_ref = model
        self.model_options = model_options or {}
        self.model_name = model_name
        self.loss_ref = loss
        self.inputs, self.targets = inputs, targets
        self.accuracy = accuracy

    def setup(self, engine: Any) -> None:
        # Resolve and check the references now (the recipe is being applied), so a wrong
        # kind of reference fails before anything is called or trained.
        where = f"plugins.{getattr(self, 'plugin_name', self.name)}"
        self.factory = resolve(self.model_ref, "model", f"{where}.model")
        self.loss_target = resolve(self.loss_ref, "loss", f"{where}.loss") if ":" in self.loss_ref else None
        super().setup(engine)
        # The batch keys read, declared so the dataset checks them at setup (not a KeyError at step 1).
        keys = {key: f"{where}.{role}" for role, key in (("inputs", self.inputs), ("targets", self.targets))
                if isinstance(key, str)}
        if keys:
            engine.declare("required_keys", kind="slot", payload=("split",))
            engine.attach("required_keys", lambda next_impl, split: {**next_impl(split), **keys})

    def build(self, state: Any) -> None:
        import torch

        state.models[self.model_name] = built_by(self.factory(**self.model_options), self.model_ref, self.model_options)
        if self.loss_target is not None:
            self.loss_fn = self.loss_target
        else:
            self.loss_fn = getattr(torch.nn.functional, self.loss_ref, None)
            if self.loss_fn is None:
                from ..core.plugins import closest

                names = [n for n in dir(torch.nn.functional) if n.endswith("loss") or "entropy" in n]
                raise ValueError(
                    f"plugins.{self.plugin_name}.loss: unknown loss {self.loss_ref!r}{closest(self.loss_ref, names)}"
                )
        self.device = self.engine.runtime.device

    def _split(self, batch: Any) -> tuple[Any, Any]:
        x, y = batch[self.inputs], batch[self.targets]
        if self.device.type != "cpu":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def loss(self, batch: Any) -> Any:
        x, y = self._split(batch)
        return self.loss_fn(self.engine.state.models[self.model_name](x), y)

    def metrics(self, batch: Any) -> dict[str, float]:
        x, y = self._split(batch)
        output = self.engine.state.models[self.model_name](x)
        metrics = {"val_loss": float(self.loss_fn(output, y))}
        if self.accuracy:
            metrics["val_accuracy"] = float((output.argmax(-1) == y).float().mean())
        return metrics
