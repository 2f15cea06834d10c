"""The ``optim_sched`` plugin: optimizers by name, param groups from patterns, hyper-parameters
over time, and optimizer swaps at phase boundaries.

It implements the slot ``build_optimizer(models)`` (replacing the loop's default), so any
plugin that wraps that slot (``layer_sched`` adds layer-wise lr scales there) sees the
optimizers it builds, at the start and after every swap.

Hyper-parameter schedules are pure functions of ``state.clock.step`` written in
``before_optimizer_step`` with override semantics. A swap at a phase boundary keeps each
parameter's optimizer state where the new optimizer uses the same state entries with the
same shapes (AdamW -> Adam keeps the moments; AdamW -> SGD starts SGD fresh).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ..core.plugins import closest, resolve
from . import groups as _groups

__all__ = ["OptimizerScheduler", "optimizer_class", "value_schedule", "transfer_state", "EXTRA_OPTIMIZERS"]

# Well-kept optional optimizers, by the names their users know.
EXTRA_OPTIMIZERS: dict[str, str] = {
    "AdamW8bit": "bitsandbytes.optim:AdamW8bit",
    "Adam8bit": "bitsandbytes.optim:Adam8bit",
    "PagedAdamW8bit": "bitsandbytes.optim:PagedAdamW8bit",
    "Lion8bit": "bitsandbytes.optim:Lion8bit",
    "SGD8bit": "bitsandbytes.optim:SGD8bit",
    "AdamWScheduleFree": "schedulefree:AdamWScheduleFree",
    "SGDScheduleFree": "schedulefree:SGDScheduleFree",
    "RAdamScheduleFree": "schedulefree:RAdamScheduleFree",
}
_SPEC_KEY = "optimizer_spec"  # marks each param group with the spec that built it


def _torch_optimizer_names() -> list[str]:
    import torch

    return [n for n in dir(torch.optim) if n[:1].isupper() and isinstance(getattr(torch.optim, n), type) and n != "Optimizer"]


def optimizer_class(name: str) -> type:
    """An optimizer class from a ``torch.optim`` name, an extra's name or ``module:attr``."""
    import torch

    if ":" in name:
        return resolve(name, "optimizer", "optimizer")
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and name != "Optimizer":
        return cls
    if name in EXTRA_OPTIMIZERS:
        module = EXTRA_OPTIMIZERS[name].split(":")[0]
        try:
            return resolve(EXTRA_OPTIMIZERS[name])
        except Exception as exc:
            raise ValueError(
                f"optimizer {name!r} needs the package {module.split('.')[0]!r}, which is not importable here "
                f"({type(exc).__name__}: {exc}); install it or pick a torch.optim optimizer"
            ) from None
    known = _torch_optimizer_names() + list(EXTRA_OPTIMIZERS)
    raise ValueError(f"unknown optimizer {name!r}{_groups.hint(name, known)}; known: {', '.join(known)} or module:attr")


# -------------------------------------------------------------- value schedules
def value_schedule(spec: Any, where: str) -> Callable[[int], Any]:
    """A schedule ``step -> value`` from a recipe value.

    A number (constant), a list (one schedule per element: betas), ``module:attr`` of a
    callable, a callable, or ``{"schedule": NAME, **arguments}`` with a name from
    :mod:`hookengine.core.schedule` (``linear``, ``cosine``, ``exponential``, ``warmup``...).
    """
    from ..core import schedule as schedules

    if isinstance(spec, (list, tuple)):
        parts = [value_schedule(s, f"{where}[{i}]") for i, s in enumerate(spec)]
        return lambda step: tuple(p(step) for p in parts)
    if isinstance(spec, str):
        target = resolve(spec)
        if not callable(target):
            raise ValueError(f"{where}: {spec!r} is not callable")
        return schedules.as_schedule(target)
    if isinstance(spec, Mapping):
        data = dict(spec)
        name = data.pop("schedule", None)
        names = [n for n in schedules.__all__ if n not in ("Schedule", "as_schedule")]
        if name not in names:
            raise ValueError(f"{where}.schedule: unknown schedule {name!r}{closest(str(name), names)}; known: {names}")
        try:
            return getattr(schedules, name)(**data)
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return schedules.as_schedule(spec)


# ---------------------------------------------------------------- state transfer
def _state_layout(cls: type, kwargs: dict[str, Any]) -> dict[str, bool]:
    """The per-parameter state entries ``cls`` keeps, and whether each is parameter-shaped."""
    import torch

    probe = torch.zeros(3, requires_grad=True)
    optimizer = cls([probe], **kwargs)
    probe.grad = torch.ones_like(probe)
    optimizer.step()
    return {k: torch.is_tensor(v) and v.shape == probe.shape for k, v in optimizer.state[probe].items()}


def transfer_state(old: Any, new: Any, cls: type, kwargs: dict[str, Any]) -> int:
    """Copy each parameter's state from ``old`` to ``new`` where entries and shapes match.

    Returns how many parameters kept their state.
    """
    import torch

    layout = _state_layout(cls, kwargs)
    kept = 0
    old_state = getattr(old, "optimizer", old).state
    for group in new.param_groups:
        for param in group["params"]:
            saved = old_state.get(param)
            if not saved or any(k not in saved for k in layout):
                continue
            if any(shaped and tuple(saved[k].shape) != tuple(param.shape) for k, shaped in layout.items()):
                continue
            new.state[param] = {k: saved[k].clone() if torch.is_tensor(saved[k]) else saved[k] for k in layout}
            kept += 1
    return kept


# ------------------------------------------------------------------------ plugin
class OptimizerScheduler:
    """Plugin ``optim_sched``: the optimizer, its param groups and hyper-parameters over time.

    Args:
        optimizer: ``torch.optim`` name, an extra (``AdamW8bit``, ``AdamWScheduleFree``...)
            or ``module:attr``.
        lr: base lr (default: the trainer's ``lr``).
        weight_decay: base weight decay (default: the trainer's).
        options: more optimizer arguments (``betas``, ``eps``, ``momentum``...).
        groups: param groups: ``[{name, model, params: [patterns], lr, lr_mult,
            weight_decay, wd_mult, train, ...optimizer options}]``; first match wins.
        no_decay: no weight decay on biases, 1-d tensors and norm layers (True), or on
            parameters matching these patterns.
        loraplus_ratio: LoRA+: the lr of LoRA B matrices is multiplied by this.
        loraplus_lr_embedding: LoRA+: the lr of both matrices of an embedding LoRA (PEFT's
            ``create_loraplus_optimizer`` default, 1e-6).
        block_weights: UNet block lr weights: ``{model, down, mid, up, zero_threshold}``
            with kohya's presets (``cosine``, ``sine``, ``linear``, ``reverse_linear``,
            ``zeros``, each ``+offset``) or lists.
        schedules: hyper-parameters over time: ``{weight_decay: SPEC, betas: [SPEC, SPEC],
            momentum: SPEC, lr_mult: SPEC, ...}``; a SPEC is a number, a callable,
            ``module:attr`` or ``{schedule: linear, start:, end:, steps:}``; to restrict one to
            groups: ``{value: SPEC, groups: [group-name patterns]}``. ``weight_decay`` is the
            base value (each group's ``wd_mult`` applies; no-decay groups stay 0).
        phases: per-phase overrides of the above (``{phase_name: {optimizer:, lr:, ...}}``);
            entering such a phase swaps the optimizer.
        keep_state: on a swap, keep optimizer state where entries and shapes match.
    """

    name = "optim_sched"

    def __init__(
        self,
        optimizer: str = "AdamW",
        lr: float | None = None,
        weight_decay: float | None = None,
        options: dict[str, Any] | None = None,
        groups: list[dict[str, Any]] | None = None,
        no_decay: bool | list[str] = True,
        loraplus_ratio: float | None = None,
        loraplus_lr_embedding: float = 1e-6,
        block_weights: dict[str, Any] | None = None,
        schedules: dict[str, Any] | None = None,
        phases: dict[str, dict[str, Any]] | None = None,
        keep_state: bool = True,
    ) -> None:
        self.base = {
            "optimizer": optimizer,
            "lr": lr,
            "weight_decay": weight_decay,
            "options": dict(options or {}),
            "groups": list(groups or []),
            "no_decay": no_decay,
            "loraplus_ratio": loraplus_ratio,
            "loraplus_lr_embedding": loraplus_lr_embedding,
            "block_weights": block_weights,
            "schedules": dict(schedules or {}),
        }
        self.phases = dict(phases or {})
        for phase, overrides in self.phases.items():
            unknown = [k for k in overrides if k not in self.base]
            if unknown:
                raise ValueError(f"optim_sched.phases.{phase}.{unknown[0]}: unknown key{closest(unknown[0], self.base)}; keys: {sorted(self.base)}")
        self.keep_state = keep_state
        optimizer_class(optimizer)  # fail at setup, not at the first step
        for overrides in self.phases.values():
            if "optimizer" in overrides:
                optimizer_class(overrides["optimizer"])
        self.param_names: dict[int, str] = {}
        self._compiled: dict[str, list[tuple[str, Callable[[int], Any], Callable[[str], bool]]]] = {}

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("build_optimizer", self._build)
        engine.on("phase_start", self._phase_start, priority="early", after=("lora_sched", "model_sched"))
        engine.on("before_optimizer_step", self._write)

    # --------------------------------------------------------------- specs
    def spec_key(self) -> str:
        """Which spec applies now: the current phase's name if it has overrides, else ``default``."""
        phase = self._phase_name()
        return phase if phase in self.phases else "default"

    def _phase_name(self) -> str:
        return self.engine.state.phase.name

    def spec(self, key: str | None = None) -> dict[str, Any]:
        """The settings for spec ``key`` (default: the current one)."""
        key = key or self.spec_key()
        return {**self.base, **self.phases.get(key, {})}

    def _defaults(self, spec: dict[str, Any]) -> tuple[float, float]:
        plan = self.engine.state.plan
        lr = spec["lr"] if spec["lr"] is not None else plan.lr
        wd = spec["weight_decay"] if spec["weight_decay"] is not None else plan.weight_decay
        return float(lr), float(wd)

    def _kwargs(self, cls: type, spec: dict[str, Any]) -> dict[str, Any]:
        lr, wd = self._defaults(spec)
        kwargs: dict[str, Any] = {"lr": lr, **spec["options"]}
        if "weight_decay" in inspect.signature(cls).parameters:
            kwargs["weight_decay"] = wd
        return kwargs

    # --------------------------------------------------------------- build
    def _build(self, next_impl: Any, models: dict[str, Any]) -> Any:
        key = self.spec_key()
        spec = self.spec(key)
        cls = optimizer_class(spec["optimizer"])
        lr, wd = self._defaults(spec)
        models = {name: _groups.unwrap(m) for name, m in models.items()}
        param_groups, self.param_names = _groups.build_param_groups(
            models,
            spec["groups"],
            lr=lr,
            weight_decay=wd,
            no_decay=spec["no_decay"],
            loraplus_ratio=spec["loraplus_ratio"],
            loraplus_lr_embedding=spec["loraplus_lr_embedding"],
            param_mults=self._block_mults(models, spec["block_weights"]),
            where=f"optim_sched.groups" if key == "default" else f"optim_sched.phases.{key}.groups",
        )
        if not param_groups:
            raise ValueError("optim_sched: no trainable parameter in the models " + str(sorted(models)))
        for group in param_groups:
            group[_SPEC_KEY] = key
            group["built_lr_mult"] = group["lr_mult"]  # LoRA+ / block weights; lr_mult schedules scale it
            group["wd_mult"] = 0.0 if group["weight_decay"] == 0.0 and wd else (group["weight_decay"] / wd if wd else 1.0)
        optimizer = cls(param_groups, **self._kwargs(cls, spec))
        self._patch_load(optimizer)
        self._compiled.pop(key, None)
        return optimizer

    def _block_mults(self, models: dict[str, Any], block: dict[str, Any] | None) -> dict[str, dict[str, float]]:
        if not block:
            return {}
        block = dict(block)
        model_name = block.pop("model", None)
        if model_name is None:
            unets = [n for n, m in models.items() if hasattr(m, "down_blocks")]
            if len(unets) != 1:
                raise ValueError(f"optim_sched.block_weights: set model (UNets among the models: {unets})")
            model_name = unets[0]
        if model_name not in models:
            raise ValueError(f"optim_sched.block_weights.model: no model {model_name!r}{closest(model_name, models)}")
        unknown = [k for k in block if k not in ("down", "mid", "up", "zero_threshold")]
        if unknown:
            raise ValueError(f"optim_sched.block_weights.{unknown[0]}: unknown key{closest(unknown[0], ['down', 'mid', 'up', 'zero_threshold'])}")
        return {model_name: _groups.block_weights(models[model_name], **block)}

    # ---------------------------------------------------------------- swap
    def _current(self) -> tuple[str, Any] | None:
        for name, optimizer in self.engine.state.optimizers.items():
            groups = getattr(optimizer, "param_groups", [])
            if groups and _SPEC_KEY in groups[0]:
                return name, optimizer
        return None

    def _phase_start(self, state: Any) -> None:
        current = self._current()
        if current is None:
            return
        name, optimizer = current
        if optimizer.param_groups[0][_SPEC_KEY] != self.spec_key():
            self.swap(name, optimizer)

    def swap(self, name: str, old: Any) -> Any:
        """Build the optimizer of the current spec in place of ``old`` (same slot chain)."""
        engine = self.engine
        new = engine.call("build_optimizer", engine.state.models)
        if self.keep_state:
            spec = self.spec()
            cls = optimizer_class(spec["optimizer"])
            transfer_state(old, getattr(new, "optimizer", new), cls, self._kwargs(cls, spec))
        engine.state.optimizers[name] = engine.runtime.prepare_optimizer(new)
        return engine.state.optimizers[name]

    def _patch_load(self, optimizer: Any) -> None:
        """Resume after a swap: the checkpoint's optimizer may be another spec's.

        The clock is restored before optimizers load (State.load_state_dict), so when the
        saved groups name another spec, the optimizer of the restored phase is built and
        takes the saved state instead.
        """
        original = optimizer.load_state_dict

        def load_state_dict(state_dict: dict[str, Any]) -> None:
            groups = state_dict.get("param_groups") or [{}]
            saved_key = groups[0].get(_SPEC_KEY)
            if saved_key is None or saved_key == optimizer.param_groups[0].get(_SPEC_KEY):
                return original(state_dict)
            if saved_key != self.spec_key():
                raise RuntimeError(
                    f"optim_sched: the checkpoint's optimizer was built for {saved_key!r}, but the restored "
                    f"clock is in {self.spec_key()!r}"
                )
            optimizers = self.engine.state.optimizers
            name = next(n for n, o in optimizers.items() if o is optimizer or getattr(o, "optimizer", None) is optimizer)
            new = self.engine.call("build_optimizer", self.engine.state.models)
            new.load_state_dict(state_dict)
            optimizers[name] = self.engine.runtime.prepare_optimizer(new)
            return None

        optimizer.load_state_dict = load_state_dict

    # -------------------------------------------------------- hyper-params
    def _schedules(self, key: str) -> list[tuple[str, Callable[[int], Any], Callable[[str], bool]]]:
        if key not in self._compiled:
            compiled = []
            where = "optim_sched.schedules" if key == "default" else f"optim_sched.phases.{key}.schedules"
            for hyper, spec in self.spec(key)["schedules"].items():
                select: Callable[[str], bool] = lambda name: True
                if isinstance(spec, Mapping) and "value" in spec:
                    if spec.get("groups") is not None:
                        select = _groups.compile_patterns(spec["groups"])
                    spec = spec["value"]
                compiled.append((hyper, value_schedule(spec, f"{where}.{hyper}"), select))
            self._compiled[key] = compiled
        return self._compiled[key]

    def _write(self, state: Any) -> None:
        current = self._current()
        if current is None:
            return
        _, optimizer = current
        key = optimizer.param_groups[0][_SPEC_KEY]
        compiled = self._schedules(key)
        if not compiled:
            return
        step = state.clock.step
        values = [(hyper, fn(step), select) for hyper, fn, select in compiled]
        for group in optimizer.param_groups:
            name = group.get("name", "")
            for hyper, value, select in values:
                if not select(name):
                    continue
                if hyper == "weight_decay":
                    group["weight_decay"] = value * group.get("wd_mult", 1.0)
                elif hyper == "lr_mult":
                    group["lr_mult"] = group.get("built_lr_mult", 1.0) * value
                    _groups.refresh_lr(group)
                else:
                    if hyper not in group:
                        raise KeyError(f"optim_sched.schedules.{hyper}: the optimizer has no hyper-parameter {hyper!r}{closest(hyper, group)}")
                    group[hyper] = value
