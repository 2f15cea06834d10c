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

import importlib.util
import itertools
from typing import Any

from ..core.plan import Phase, plan_settings
from ..core.plugins import PluginError, closest
from ..core.points import BASE_PRIORITY

__all__ = ["TrainScheduler", "optimizer_class", "kernel_options"]


class TrainScheduler:
    """The run's plan: phases and what runs in each, the run's length, the default optimizer.

    Args:
        phases: the phases, in order (mappings with ``name, steps, epochs, data, routine,
            train, accumulation, precision, settings``); default: one phase ``train``.
        epochs: length of the default phase in epochs (when ``phases`` is not given).
        max_steps: optimizer steps of the default phase, and a cap on the whole run.
        gradient_accumulation_steps: batches per optimizer step (a phase may override it).
        optimizer: the default optimizer, a ``torch.optim`` class name, a bitsandbytes 8-bit
            optimizer name (``AdamW8bit``, ``Adam8bit``, ``PagedAdamW8bit``, ``Lion8bit``,
            ``SGD8bit``: needs the package ``bitsandbytes``), a schedule-free name
            (``AdamWScheduleFree``: needs ``schedulefree``) or ``module:attr``
            (``bitsandbytes.optim:AdamW8bit``).
        lr, weight_decay, optimizer_options: its arguments (optim_sched replaces it).
            ``optimizer_options`` pass through to the optimizer (``{fused: true}``,
            ``{foreach: false}``, ``betas``...); ``fused: auto`` or ``foreach: auto`` (the
            same rule) picks the fused kernels when the run's device is CUDA and every
            parameter is floating point (and none is kept on an offload device by
            ``block_swap``), and ``foreach`` otherwise; an explicit ``true``/``false`` of the
            other key is kept, and a key the optimizer does not take is left out.

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
        plan = self.engine.state.plan
        cls = optimizer_class(plan.optimizer)
        params = [p for m in models.values() if hasattr(m, "parameters") for p in m.parameters() if p.requires_grad]
        options = plan.optimizer_options
        if "auto" in (options.get("fused"), options.get("foreach")):
            options = kernel_options(cls, params, options, self.engine.runtime.device)
        return cls(params, lr=plan.lr, weight_decay=plan.weight_decay, **options)

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


def optimizer_class(name: str, where: str = "train_sched.optimizer") -> Any:
    """The optimizer class for a ``torch.optim`` name, a known extra's name (``AdamW8bit``: see
    ``optim_sched``'s ``EXTRA_OPTIMIZERS``) or a ``module:attr``; one line naming the package
    when an extra is not installed."""
    from .optim import optimizer_class as named

    module = name.partition(":")[0] if ":" in name else ""
    if module and importlib.util.find_spec(module.split(".")[0]) is None:
        raise ValueError(f"{where}: {name!r} needs the package {module.split('.')[0]!r}, which is not installed here")
    try:
        return named(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def kernel_options(cls: Any, params: list[Any], options: dict[str, Any], device: Any) -> dict[str, Any]:
    """``options`` with ``fused: auto`` / ``foreach: auto`` decided for these parameters.

    Fused kernels when ``device`` is CUDA and every parameter is floating point and not kept
    on an offload device (``block_swap`` marks those ``_hookengine_offloaded``); ``foreach``
    otherwise. An explicit ``true``/``false`` next to an ``auto`` is kept; keys the optimizer
    does not take are left out.

    >>> import torch
    >>> kernel_options(torch.optim.AdamW, [torch.zeros(2)], {"fused": "auto", "betas": (0.9, 0.99)}, torch.device("cpu"))
    {'betas': (0.9, 0.99), 'foreach': True}
    """
    fused, foreach = options.get("fused"), options.get("foreach")
    if "auto" not in (fused, foreach):
        return dict(options)
    import inspect

    out = {k: v for k, v in options.items() if k not in ("fused", "foreach")}
    accepted = inspect.signature(cls).parameters
    if not isinstance(fused, bool):  # auto (or unset next to foreach: auto)
        fused = "fused" in accepted and getattr(device, "type", str(device)) == "cuda" and all(
            p.is_floating_point() and not getattr(p, "_hookengine_offloaded", False) for p in params
        )
    elif "fused" in accepted:
        out["fused"] = fused
    if fused and "fused" in accepted:
        out["fused"] = True
    if isinstance(foreach, bool):
        out["foreach"] = foreach
    elif not fused and "foreach" in accepted:
        out["foreach"] = True
    return out
