"""train_sched: the training plan over time, which any loop executes.

It writes ``state.plan`` (phases, their lengths, data, routines, trained models, per-phase
gradient accumulation and precision; the run's length; the default optimizer) and owns
the slots that turn the plan into objects: ``prepare`` (after ``setup``: check the plan,
build the optimizer, place and wrap the models), ``build_optimizer``, ``rewrap_models``
and ``epoch_batches``. A loop (the built-in ``trainer``, or your own) only walks the plan:
``state.phase``, ``state.plan.phase_done(clock)``, ``state.plan.advance(clock)``.

In a recipe, the top-level ``phases:`` is the short form of ``train_sched.phases``::

    phases:
      - {name: base, steps: 1500}
      - {name: lora, steps: 250, routine: diffusion, train: [unet], accumulation: 2}
"""

from __future__ import annotations

import itertools
from typing import Any

from ..core.plan import Phase, plan_settings
from ..core.plugins import PluginError, closest, resolve
from ..core.points import BASE_PRIORITY

__all__ = ["TrainScheduler"]


class TrainScheduler:
    """The run's plan: phases and what runs in each, the run's length, the default optimizer.

    Args:
        phases: the phases, in order (mappings with ``name, steps, epochs, data, routine,
            train, accumulation, precision, settings``); default: one phase ``train``.
        epochs: length of the default phase in epochs (when ``phases`` is not given).
        max_steps: optimizer steps of the default phase, and a cap on the whole run.
        gradient_accumulation_steps: batches per optimizer step (a phase may override it).
        optimizer: the default optimizer, a ``torch.optim`` class name or ``module:attr``.
        lr, weight_decay, optimizer_options: its arguments (optim_sched replaces it).

    >>> from hookengine import Engine
    >>> engine = Engine()
    >>> _ = engine.use("train_sched", phases=[{"name": "warm", "steps": 10}, {"name": "main", "epochs": 2}])
    >>> engine.state.plan.phase_names
    ['warm', 'main']
    """

    name = "train_sched"

    def __init__(
        self,
        phases: list[dict[str, Any]] | None = None,
        epochs: int | None = None,
        max_steps: int | None = None,
        gradient_accumulation_steps: int | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
    ) -> None:
        self.options = plan_settings(locals())

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.state.plan.configure(getattr(self, "plugin_name", self.name), **self.options)
        for point, impl in (
            ("prepare", self._prepare),
            ("build_optimizer", self._build_optimizer),
            ("rewrap_models", self._rewrap_models),
            ("epoch_batches", self._epoch_batches),
        ):
            engine.attach(point, impl, priority=BASE_PRIORITY)
        engine.on("phase_start", self._check_phase, priority="first")

    # --------------------------------------------------------------- prepare
    def _prepare(self, next_impl: Any) -> None:
        """Check the plan against the plugins, build the optimizer, place and wrap models."""
        engine, state = self.engine, self.engine.state
        for phase in state.plan.phases:
            self._check_routine(phase)
        if not state.models:
            raise PluginError(
                "no model to train: use a routine or model plugin that registers one in state.models "
                "(e.g. supervised, diffusion, causal_lm or model_loader)"
            )
        if not state.optimizers and _trainable(state.models):
            state.optimizers["main"] = engine.call("build_optimizer", state.models)
        self._rewrap_models(None)  # the first placement; the slot is for later structural changes
        for name, optimizer in state.optimizers.items():
            state.optimizers[name] = engine.runtime.prepare_optimizer(optimizer)

    def _check_routine(self, phase: Phase) -> None:
        plugins = self.engine.plugin_names
        if phase.routine is not None and phase.routine not in plugins:
            raise PluginError(
                f"phase {phase.name!r}: unknown routine {phase.routine!r}"
                f"{closest(phase.routine, plugins)}; plugins in use: {sorted(plugins)}"
            )

    def _check_phase(self, state: Any, phase: Phase) -> None:
        if phase.data not in state.dataloaders:
            raise PluginError(
                f"phase {phase.name!r} reads data {phase.data!r}{closest(phase.data, state.dataloaders)}, but no "
                f"plugin registered it; data loaders: {sorted(state.dataloaders)}"
            )

    def _rewrap_models(self, next_impl: Any) -> None:
        """(Re)place every model; trainable ones get DDP when distributed.

        Call after a structural change (freezing, adapters) so DDP sees the new set of
        trainable parameters on every rank.
        """
        runtime = self.engine.runtime
        models = self.engine.state.models
        for name, model in list(models.items()):
            if not hasattr(model, "parameters"):
                continue
            model = runtime.unwrap(model)
            if any(p.requires_grad for p in model.parameters()):
                models[name] = runtime.prepare_model(model)
            else:
                models[name] = model.to(runtime.device)
        self.engine.module_hooks.refresh()  # module hooks follow re-wrapped models

    def _build_optimizer(self, next_impl: Any, models: dict[str, Any]) -> Any:
        """The plan's default optimizer over every trainable parameter."""
        import torch

        plan = self.engine.state.plan
        name = plan.optimizer
        cls = getattr(torch.optim, name, None) if ":" not in name else resolve(name, "optimizer", "train_sched.optimizer")
        if cls is None:
            names = [n for n in dir(torch.optim) if n[:1].isupper()]
            raise ValueError(f"train_sched.optimizer: unknown optimizer {name!r}{closest(name, names)}")
        params = [p for m in models.values() if hasattr(m, "parameters") for p in m.parameters() if p.requires_grad]
        return cls(params, lr=plan.lr, weight_decay=plan.weight_decay, **plan.optimizer_options)

    def _epoch_batches(self, next_impl: Any, loader: Any, epoch: int, start_batch: int) -> Any:
        """The batches of one epoch from ``start_batch`` on (resume mid-epoch)."""
        for holder in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None), loader):
            if holder is not None and hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_start"):
            batch_sampler.set_start(start_batch)
            return loader
        if hasattr(loader, "set_start"):
            loader.set_start(start_batch)
            return loader
        return itertools.islice(loader, start_batch, None)


def _trainable(models: dict[str, Any]) -> bool:
    return any(p.requires_grad for m in models.values() if hasattr(m, "parameters") for p in m.parameters())
