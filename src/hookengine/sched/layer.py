"""The ``layer_sched`` plugin: freeze and unfreeze layers over time; layer-wise lr decay.

Which parameters are frozen is a pure function of the clock (step, phase), so a resume
recomputes it and continues bitwise: nothing about freezing needs checkpointing.

- **Gradual unfreezing** (ULMFiT): the top ``unfreeze_start`` units train first, one more
  unit (towards the input) every ``unfreeze_every`` steps or epochs.
- **Growing frozen fraction** (Composer's layer freezing): after ``freeze_start`` of the
  run, the first ``freeze_level × (progress - start) / (1 - start)`` of the units but the
  last (the output side never freezes, as in Composer) freeze.
  Unlike Composer's, it resumes exactly.
- **Patterns**: ``freeze`` (always), ``phases`` (per phase), ``steps`` (from a step on).
- **Layer-wise lr decay** (BEiT / ELECTRA): ``lr_scale = decay ** (max_depth - depth)``
  in timm's ``lr_scale`` key of the param groups.

Frozen parameters stay in the optimizer with ``grad = None`` (torch optimizers skip them,
weight decay included), so the optimizer's group layout never depends on the clock. The
plugin wraps the slot ``build_optimizer`` to include them and to split groups by depth.
Structural changes happen between optimizer steps (``step_end``) or at ``phase_start``;
after one, the slot ``rewrap_models`` re-prepares the models, so DDP sees the new set of
trainable parameters on every rank (docs/TRAPS.md: DDP and structural changes).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from ..core.plugins import closest
from . import groups as _groups
from .lr import resolve_length

__all__ = ["LayerScheduler"]

logger = logging.getLogger(__name__)


class LayerScheduler:
    """Plugin ``layer_sched``.

    Args:
        models: names in ``state.models`` to manage (default: all).
        units: patterns of the units, input side first, replacing the detected layers
            (each pattern is one unit; parameters matching none are not scheduled).
        unfreeze_every: gradual unfreezing: one more unit every N steps (int), a fraction of
            the run (float), or N epochs with ``interval="epoch"``.
        unfreeze_start: units trainable from the start (counted from the top).
        freeze_start: growing frozen fraction: start freezing at this fraction of the run.
        freeze_level: fraction of the units frozen at the end of the run.
        freeze: patterns frozen during the whole run.
        phases: ``{phase_name: [patterns]}`` frozen during that phase.
        steps: ``[[start_step, [patterns]], ...]``: patterns frozen from that step on.
        layer_decay: layer-wise lr decay factor (e.g. 0.75); None for no decay.
        decay_formula: ``beit`` (head = blocks + 1) or ``electra`` (pooler, then head + 1).
        interval: what ``unfreeze_every`` counts: ``step`` or ``epoch``.
        total_steps: the run length for fractions (default: the loop's).
    """

    name = "layer_sched"

    def __init__(
        self,
        models: list[str] | None = None,
        units: list[str] | None = None,
        unfreeze_every: int | float | None = None,
        unfreeze_start: int = 1,
        freeze_start: float | None = None,
        freeze_level: float = 1.0,
        freeze: list[str] | None = None,
        phases: dict[str, list[str]] | None = None,
        steps: list[tuple[int, list[str]]] | None = None,
        layer_decay: float | None = None,
        decay_formula: Literal["beit", "electra"] = "beit",
        interval: Literal["step", "epoch"] = "step",
        total_steps: int | None = None,
    ) -> None:
        if freeze_start is not None and not 0.0 <= freeze_start < 1.0:
            raise ValueError(f"layer_sched.freeze_start must lie in [0, 1), got {freeze_start}")
        if not 0.0 <= freeze_level <= 1.0:
            raise ValueError(f"layer_sched.freeze_level must lie in [0, 1], got {freeze_level}")
        if unfreeze_start < 0:
            raise ValueError("layer_sched.unfreeze_start must be >= 0")
        self.model_names = models
        self.unit_patterns = units
        self.unfreeze_every = unfreeze_every
        self.unfreeze_start = unfreeze_start
        self.freeze_start = freeze_start
        self.freeze_level = freeze_level
        self.always = _groups.compile_patterns(freeze) if freeze else None
        self.phase_patterns = {k: _groups.compile_patterns(v) for k, v in (phases or {}).items()}
        self.step_patterns = sorted((int(s), _groups.compile_patterns(p)) for s, p in (steps or []))
        self.layer_decay = layer_decay
        self.decay_formula = decay_formula
        self.interval = interval
        self.total_steps = total_steps
        # model name -> {param name -> param}, units, Keras variables; filled on first sight.
        self.params: dict[str, dict[str, Any]] = {}
        self.units: dict[str, list[_groups.Unit]] = {}
        self._keras_vars: dict[str, dict[str, Any]] = {}
        self._applied: frozenset[tuple[str, str]] | None = None
        self._total: int | None = None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        # After every built-in that builds models, adds adapters or sets trainable models.
        engine.on("setup", self._on_setup, priority="last")
        # Outermost: wraps whichever plugin builds the optimizer.
        engine.attach("build_optimizer", self._build, priority="first")
        engine.on("phase_start", self._on_boundary, priority="first")
        engine.on("step_end", self._on_boundary, priority="first")

    # ------------------------------------------------------------ discovery
    def _managed(self, models: dict[str, Any]) -> dict[str, Any]:
        if self.model_names is None:
            return {n: m for n, m in models.items() if hasattr(m, "parameters") or _groups.is_keras(m)}
        missing = [n for n in self.model_names if n not in models]
        if missing:
            raise KeyError(f"layer_sched.models: no model named {missing[0]!r}{closest(missing[0], models)}; models: {sorted(models)}")
        return {n: models[n] for n in self.model_names}

    def discover(self, models: dict[str, Any]) -> None:
        """Record the parameters and units of the managed models (once per model).

        Only parameters that are trainable when first seen are scheduled; ones the user
        froze stay frozen.
        """
        for name, model in self._managed(models).items():
            if name in self.params:
                continue
            model = _groups.unwrap(model)
            named = _groups.named_parameters(model)
            self.params[name] = {n: p for n, p in named if p.requires_grad}
            if _groups.is_keras(model):
                self._keras_vars[name] = {v.path: v for v in model.weights}
            self.units[name] = self._units_of(name, model, [n for n, _ in named])

    def _units_of(self, name: str, model: Any, params: list[str]) -> list[_groups.Unit]:
        if self.unit_patterns is None:
            units = _groups.layer_units(model)
        else:
            units = []
            taken: set[str] = set()
            for i, pattern in enumerate(self.unit_patterns):
                match = _groups.compile_patterns(pattern)
                selected = [p for p in params if p not in taken and match(p)]
                taken.update(selected)
                kind = "stem" if i == 0 else "head" if i == len(self.unit_patterns) - 1 else "block"
                units.append(_groups.Unit(pattern, selected, kind))
            empty = [u.name for u in units if not u.params]
            if empty:
                raise ValueError(f"layer_sched.units: pattern {empty[0]!r} selects no parameter of model {name!r}")
        if not units:
            raise ValueError(f"layer_sched: model {name!r} has no layers with parameters")
        return units

    def _on_setup(self, state: Any) -> None:
        self.discover(state.models)
        self._apply(rewrap=False)

    # ---------------------------------------------------------------- plan
    def _run_length(self) -> int | None:
        if self._total is not None:
            return self._total
        if self.total_steps is not None:
            self._total = self.total_steps
        else:
            self._total = self.engine.state.total_steps
        return self._total

    def _phase_name(self) -> str:
        return self.engine.state.phase.name

    def frozen_units(self, count: int) -> int:
        """How many units (from the input side) are frozen now, out of ``count``."""
        clock = self.engine.state.clock
        frozen = 0
        if self.unfreeze_every is not None:
            if self.interval == "epoch":
                every, t = int(self.unfreeze_every), clock.epoch
            else:
                every, t = resolve_length(self.unfreeze_every, self._run_length(), "layer_sched.unfreeze_every"), clock.step
            trainable = self.unfreeze_start + (t // max(1, every))
            frozen = max(frozen, count - min(count, trainable))
        if self.freeze_start is not None:
            total = self._run_length()
            if total is None:
                raise ValueError("layer_sched.freeze_start needs the run length: set total_steps")
            progress = min(1.0, clock.step / max(1, total))
            if progress > self.freeze_start:
                # Composer's order of float operations (it decides the count at the
                # boundaries), applied to all units but the last (the output side never
                # freezes): int(fraction × (count - 1)).
                fraction = self.freeze_level * ((progress - self.freeze_start) / (1.0 - self.freeze_start))
                frozen = max(frozen, int(fraction * max(0, count - 1)))
        return frozen

    def frozen(self) -> frozenset[tuple[str, str]]:
        """``(model, parameter)`` pairs that are frozen at the current clock."""
        clock = self.engine.state.clock
        phase = self._phase_name()
        out: set[tuple[str, str]] = set()
        patterns = [self.always] if self.always else []
        if phase in self.phase_patterns:
            patterns.append(self.phase_patterns[phase])
        patterns += [p for start, p in self.step_patterns if clock.step >= start]
        for model, params in self.params.items():
            units = self.units[model]
            for unit in units[: self.frozen_units(len(units))]:
                out.update((model, p) for p in unit.params if p in params)
            for name in params:
                if any(match(name) for match in patterns):
                    out.add((model, name))
        return frozenset(out)

    # --------------------------------------------------------------- apply
    def _apply(self, rewrap: bool) -> bool:
        """Set ``requires_grad`` to the plan; returns whether anything changed."""
        plan = self.frozen()
        if plan == self._applied:
            return False
        for model, params in self.params.items():
            variables = self._keras_vars.get(model, {})
            for name, param in params.items():
                train = (model, name) not in plan
                if name in variables:
                    variables[name].trainable = train  # keeps Keras' own flag in step
                param.requires_grad_(train)
                if not train:
                    param.grad = None  # torch optimizers skip parameters without a gradient
        self._applied = plan
        total = sum(len(p) for p in self.params.values())
        self.engine.state.metrics["frozen_fraction"] = len(plan) / total if total else 0.0
        if rewrap and self.engine.has("rewrap_models"):
            self.engine.call("rewrap_models")
        elif rewrap and self.engine.runtime.started and self.engine.runtime.distributed:
            raise RuntimeError(
                "layer_sched changed which parameters train, but no plugin implements the slot "
                "'rewrap_models': DDP ranks would drift apart (docs/TRAPS.md)"
            )
        return True

    def _on_boundary(self, state: Any) -> None:
        self.discover(state.models)
        self._apply(rewrap=True)

    # -------------------------------------------------------- optimizer
    def _build(self, next_impl: Any, models: dict[str, Any]) -> Any:
        """Build with every scheduled parameter included, then split groups by layer depth."""
        self.discover(models)
        frozen = [p for params in self.params.values() for p in params.values() if not p.requires_grad]
        for param in frozen:
            param.requires_grad_(True)
        try:
            optimizer = next_impl(models)
        finally:
            for param in frozen:
                param.requires_grad_(False)
        if self.layer_decay is not None:
            scales = self.layer_scales()
            _groups.split_param_groups(
                optimizer,
                key=lambda p: scales.get(id(p), 1.0),
                extra=lambda p: {"lr_scale": scales.get(id(p), 1.0)},
            )
        return optimizer

    def layer_scales(self) -> dict[int, float]:
        """``id(param) -> lr_scale`` from the layer-wise decay."""
        out: dict[int, float] = {}
        for model, units in self.units.items():
            scales = _groups.layer_decay_scales(units, self.layer_decay or 1.0, self.decay_formula)
            params = self.params[model]
            for name, scale in scales.items():
                if name in params:
                    out[id(params[name])] = scale
        return out

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        # The run length is recorded to say so when a resumed run is longer or shorter.
        return {"total": self._run_length() if hasattr(self, "engine") else self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The recipe's length wins (as lr_sched): fractions follow an extended run.
        saved, now = state.get("total"), self._run_length() if hasattr(self, "engine") else self.total_steps
        if saved is not None and now is not None and saved != now:
            logger.warning("layer_sched: run length changed on resume: %s → %s (the recipe wins over the checkpoint)", saved, now)
