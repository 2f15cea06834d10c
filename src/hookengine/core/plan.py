"""The run's plan: its phases, their lengths and settings, and the run's length.

The plan lives in :class:`~hookengine.core.state.State` (``state.plan``), not in a plugin,
so every plugin reads the same plan whichever loop executes it. ``train_sched`` writes it
from a recipe; any loop (the built-in trainer or a user's own) walks it with
:meth:`Plan.phase_done`, :meth:`Plan.run_done` and :meth:`Plan.advance`.

>>> plan = Plan(phases=[Phase("base", steps=100), Phase("lora", steps=20, routine="diffusion")])
>>> plan.phase_names, plan.total_steps({})
(['base', 'lora'], 120)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Phase", "Plan", "PlanError", "PLAN_OPTIONS", "plan_settings"]

# The plan's options as plugins take them (train_sched, and the trainer's short forms).
PLAN_OPTIONS = ("phases", "epochs", "max_steps", "gradient_accumulation_steps", "optimizer", "lr",
                "weight_decay", "optimizer_options")


class PlanError(ValueError):
    """A phase or plan setting is invalid; the message names the phase and key."""


def plan_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The plan keys for :meth:`Plan.configure` from the option names in ``options``.

    >>> plan_settings({"lr": 0.1, "gradient_accumulation_steps": 2, "grad_clip": 1.0})["accumulation"]
    2
    """
    settings = {name: options.get(name) for name in PLAN_OPTIONS}
    settings["accumulation"] = settings.pop("gradient_accumulation_steps")
    return settings


@dataclass
class Phase:
    """One stretch of training: its length, its data, and what runs in it.

    Args:
        name: how schedules, adapters and rules refer to the phase.
        steps: its length in optimizer steps (wins over ``epochs``).
        epochs: its length in epochs of its data (1 when neither is given).
        data: the data loader it reads (a key of ``state.dataloaders``).
        routine: the routine plugin that computes the loss (``None``: any).
        train: the models (or ``model.prefix`` parts) that train in it (``None``: all).
        accumulation: batches per optimizer step in this phase (default: the plan's).
        precision: ``"no"``, ``"bf16"`` or ``"fp16"`` autocast in this phase (default: the runtime's).
        settings: free-form settings for plugins.
    """

    name: str = "train"
    steps: int | None = None
    epochs: int | None = None
    data: str = "train"
    routine: str | None = None
    train: list[str] | None = None
    accumulation: int | None = None
    precision: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"phases.{self.name}"
        for key in ("steps", "epochs", "accumulation"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PlanError(f"{where}.{key}: expected a positive integer, got {value!r}")
        if self.precision not in (None, "no", "bf16", "fp16"):
            raise PlanError(f"{where}.precision: expected no, bf16 or fp16, got {self.precision!r}")
        if self.steps is None and self.epochs is None:
            self.epochs = 1

    @classmethod
    def coerce(cls, value: "Phase | Mapping[str, Any]", index: int = 0) -> "Phase":
        """A phase from a mapping (a recipe's entry); unknown keys name the closest valid one."""
        if isinstance(value, Phase):
            return value
        if hasattr(value, "model_dump"):  # a pydantic model with the same fields
            value = value.model_dump()
        if not isinstance(value, Mapping):
            raise PlanError(f"phases.{index}: expected a mapping of phase settings, got {value!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in fields:
                from .plugins import closest

                raise PlanError(f"phases.{index}.{key}: unknown phase setting{closest(key, fields)}; valid: {sorted(fields)}")
        return cls(**value)


@dataclass
class Plan:
    """The phases of a run, in order, and run-wide settings.

    Args:
        phases: the phases (one ``train`` phase of one epoch by default).
        max_steps: a cap on the optimizer steps of the whole run.
        epochs: the length of the single default phase when ``phases`` is not given
            (without ``epochs``, the default phase runs ``max_steps`` steps, or 1 epoch).
        accumulation: batches per optimizer step (a phase may override it).
        optimizer, lr, weight_decay, optimizer_options: the default optimizer
            (``build_optimizer``'s base implementation; optim_sched replaces it).
    """

    phases: list[Phase] = field(default_factory=lambda: [Phase()])
    max_steps: int | None = None
    epochs: int | None = None
    accumulation: int = 1
    optimizer: str = "AdamW"
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    # Which plugin set each key: two plugins setting the same key differently is an error.
    _sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def configure(self, source: str, **values: Any) -> None:
        """Set plan keys on behalf of ``source`` (a plugin name); ``None`` values are skipped.

        >>> plan = Plan()
        >>> plan.configure("train_sched", max_steps=10, phases=[{"name": "warm", "steps": 4}, {"name": "main"}])
        >>> plan.phase_names, plan.max_steps
        (['warm', 'main'], 10)
        """
        names = {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        for key, value in values.items():
            if value is None:
                continue
            if key not in names:
                from .plugins import closest

                raise PlanError(f"{source}.{key}: not a plan setting{closest(key, names)}; plan settings: {sorted(names)}")
            if key == "phases":
                value = [Phase.coerce(p, i) for i, p in enumerate(value)]
                seen = [p.name for p in value]
                if not value or len(set(seen)) != len(seen):
                    raise PlanError(f"{source}.phases: needs at least one phase, each with its own name; got {seen}")
            owner = self._sources.get(key)
            if owner is not None and owner != source and getattr(self, key) != value:
                raise PlanError(f"{source}.{key} and {owner}.{key} both set the plan's {key!r}; set it in one place")
            if key == "accumulation" and (not isinstance(value, int) or value < 1):
                raise PlanError(f"{source}.gradient_accumulation_steps: expected a positive integer, got {value!r}")
            setattr(self, key, value)
            self._sources[key] = source
        if "phases" not in self._sources:  # the default phase follows epochs / max_steps
            by_steps = self.epochs is None and self.max_steps is not None
            self.phases = [Phase("train", steps=self.max_steps if by_steps else None, epochs=None if by_steps else self.epochs)]

    @property
    def phase_names(self) -> list[str]:
        return [p.name for p in self.phases]

    def phase(self, name: str) -> Phase:
        """The phase called ``name``; a clear error with the closest name otherwise."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        from .plugins import closest

        raise PlanError(f"no phase named {name!r}{closest(name, self.phase_names)}; phases: {self.phase_names}")

    def accumulation_of(self, phase: Phase) -> int:
        """Batches per optimizer step in ``phase``."""
        return phase.accumulation or self.accumulation

    def total_steps(self, dataloaders: Mapping[str, Any]) -> int | None:
        """Optimizer steps of the whole run, or ``None`` when a phase's length is unknown
        (epochs of a loader without a length, and no ``max_steps``)."""
        total = 0
        for phase in self.phases:
            if phase.steps is not None:
                total += phase.steps
                continue
            try:
                batches = len(dataloaders[phase.data])
            except (KeyError, TypeError):
                return self.max_steps
            total += phase.epochs * (batches // self.accumulation_of(phase))  # type: ignore[operator]
        return min(total, self.max_steps) if self.max_steps else total

    def total_epochs(self) -> int | None:
        """Epochs of the whole run, when every phase is measured in epochs."""
        epochs = [p.epochs for p in self.phases]
        return sum(epochs) if epochs and all(p.steps is None for p in self.phases) else None  # type: ignore[arg-type]

    # ---- walking the plan (any loop uses these, so every loop agrees on lengths)
    def current(self, clock: Any) -> Phase:
        """The phase the clock is in (the last one once the run has finished)."""
        return self.phases[min(clock.phase_index, len(self.phases) - 1)]

    def phase_done(self, clock: Any) -> bool:
        """Whether the current phase has reached its length."""
        phase = self.current(clock)
        if phase.steps is not None:
            return clock.phase_step >= phase.steps
        return clock.phase_epoch >= phase.epochs  # type: ignore[operator]

    def run_done(self, clock: Any) -> bool:
        """Whether ``max_steps`` is reached."""
        return bool(self.max_steps) and clock.step >= self.max_steps  # type: ignore[operator]

    def advance(self, clock: Any) -> bool:
        """Move the clock to the next phase; ``False`` when there is none."""
        if clock.phase_index + 1 >= len(self.phases):
            return False
        current = self.phases[clock.phase_index]
        clock.phase_index += 1
        clock.phase_step = 0
        clock.phase_epoch = 0
        if self.phases[clock.phase_index].data != current.data:
            clock.batch_in_epoch = 0
        clock.phase = self.phases[clock.phase_index].name
        return True
