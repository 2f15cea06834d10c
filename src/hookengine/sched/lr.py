"""The ``lr_sched`` plugin: the learning rate of every optimizer group from a named schedule.

The schedules themselves (every name of transformers', diffusers' and torch's, evaluated
at the progress clock, never stepped) are in :mod:`hookengine.sched.lr_schedules`.

Write-back (override semantics, see :mod:`hookengine.sched.groups`): each param group
gets ``group["scheduled_lr"] = schedule.lr(k, group["base_lr"])`` and then
``lr = scheduled_lr * lr_scale * lr_mult``, so several plugins never compound.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

from ..core.plugins import closest
from . import groups as _groups
from .lr_schedules import (  # resolve_length is also imported from here by sched/layer.py
    _METRIC_NAMES,
    LambdaSchedule,
    LRSchedule,
    _unknown,
    all_names,
    make_schedule,
    resolve_length,
)

__all__ = ["LRScheduler"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- plugin
class LRScheduler:
    """Plugin ``lr_sched``: the learning rate of every optimizer group from a named schedule.

    Writes in ``before_optimizer_step`` the lr of the step about to be taken,
    ``base_lr × schedule(t) × lr_scale × lr_mult`` (t: optimizer steps done, or epochs with
    ``interval="epoch"``), overriding whatever the group held.

    Args:
        schedule: a name (transformers', diffusers', torch's class names, ``cosine_cycles``)
            or a callable ``step -> factor``.
        lr: base lr of every group; default: the lr each group was built with.
        warmup: warmup length: steps (int) or a fraction of the run (float in [0, 1]).
        decay: decay length of ``warmup_stable_decay``: steps or a fraction.
        total_steps: the run length (steps, or epochs with ``interval="epoch"``); default:
            the loop's ``total_steps`` (or its total epochs).
        interval: ``"step"`` (evaluate at optimizer steps) or ``"epoch"`` (at epochs).
        options: the schedule's own arguments (``num_cycles``, ``power``, ``min_lr``,
            ``step_rules``, torch class arguments...).
        metric: the metric that metric-driven schedules (plateau, greedy) watch.
        optimizers: names in ``state.optimizers`` to drive; default all.
    """

    name = "lr_sched"

    def __init__(
        self,
        schedule: str | Callable[[int], float] = "constant",
        lr: float | None = None,
        warmup: int | float = 0,
        decay: int | float | None = None,
        total_steps: int | None = None,
        interval: Literal["step", "epoch"] = "step",
        options: dict[str, Any] | None = None,
        metric: str = "val_loss",
        optimizers: list[str] | None = None,
    ) -> None:
        if isinstance(schedule, str) and schedule not in all_names():
            raise _unknown(schedule)
        if decay is not None and schedule != "warmup_stable_decay":
            raise ValueError(f"lr_sched.decay is the decay length of 'warmup_stable_decay', not of {schedule!r}; use options")
        self.schedule_name = schedule
        self.base_lr = lr
        self.warmup = warmup
        self.decay = decay
        self.total_steps = total_steps
        self.interval = interval
        self.options = dict(options or {})
        self.metric = metric
        self.optimizer_names = optimizers
        self.schedule: LRSchedule | None = None
        self._resolved: dict[str, Any] = {}
        self._pending_state: dict[str, Any] | None = None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        # Late: runs after plugins that change groups' scale/multiplier keys.
        engine.on("before_optimizer_step", self._write, priority="late")
        engine.on("evaluate_end", self._observe)

    # ------------------------------------------------------------ building
    def _run_length(self) -> int | None:
        if self.total_steps is not None:
            return self.total_steps
        state = self.engine.state
        return state.plan.total_epochs() if self.interval == "epoch" else state.total_steps

    def _reference_group(self) -> dict[str, Any]:
        for optimizer in self._optimizers():
            if optimizer.param_groups:
                return optimizer.param_groups[0]
        raise RuntimeError("lr_sched: no optimizer with parameter groups in state.optimizers")

    def build(self) -> LRSchedule:
        """Resolve lengths (fractions need the run length) and build the schedule.

        Lengths come from the options and the run as it is now, also on resume: a run
        extended with a higher ``max_steps`` / ``total_steps`` follows the schedule of the
        new length from the resume point on.
        """
        if self.schedule is not None:
            return self.schedule
        total = self._run_length()
        warmup = resolve_length(self.warmup, total, "lr_sched.warmup")
        options = dict(self.options)
        if self.decay is not None:
            options["num_decay_steps"] = resolve_length(self.decay, total, "lr_sched.decay")
        group = self._reference_group()
        base = self.base_lr if self.base_lr is not None else _groups.base_lr_of(group)
        resolved = {"total": total, "warmup": warmup, "base_lr": base, **({"decay": options["num_decay_steps"]} if self.decay is not None else {})}
        self._report_changes(self._resolved, resolved)
        self._resolved = resolved
        self.schedule = make_schedule(
            self.schedule_name, base_lr=base, warmup_steps=warmup, total_steps=total, options=options, hyper=dict(group)
        )
        if self._pending_state is not None:
            self.schedule.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.schedule

    def _report_changes(self, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """One log line per length (or this plugin's own lr) that differs from the checkpoint's run."""
        for key, value in now.items():
            if key == "base_lr" and self.base_lr is None:
                continue  # the group's lr: reported where the optimizer is loaded (core/optimizer_state.py)
            if key in saved and saved[key] != value:
                what = "lr" if key == "base_lr" else f"lr_sched.{key}"
                logger.warning("%s changed on resume: %s → %s (the recipe wins over the checkpoint)", what, saved[key], value)

    # ------------------------------------------------------------- writing
    def _optimizers(self) -> list[Any]:
        optimizers = self.engine.state.optimizers
        if self.optimizer_names is None:
            return list(optimizers.values())
        missing = [n for n in self.optimizer_names if n not in optimizers]
        if missing:
            raise KeyError(f"lr_sched.optimizers: no optimizer named {missing[0]!r}{closest(missing[0], optimizers)}; have {sorted(optimizers)}")
        return [optimizers[n] for n in self.optimizer_names]

    def progress(self) -> int:
        """Where the schedule is read: optimizer steps done, or epochs."""
        clock = self.engine.state.clock
        return clock.epoch if self.interval == "epoch" else clock.step

    def _write(self, state: Any) -> None:
        schedule = self.build()
        t = self.progress()
        total = self._resolved.get("total")
        if total is not None and isinstance(schedule, LambdaSchedule):
            # Past the end a curve holds its last value (transformers' cosine would climb
            # back up): an extended or overlong run never returns to the peak.
            t = min(t, total)
        extras = schedule.extras(t)
        optimizers = self._optimizers()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if self.base_lr is not None:
                    group["base_lr"] = self.base_lr
                group["scheduled_lr"] = schedule.lr(t, _groups.base_lr_of(group))
                if extras:
                    _write_extras(group, extras)
                _groups.refresh_lr(group)
        if optimizers and optimizers[0].param_groups:
            state.metrics["lr"] = optimizers[0].param_groups[0]["lr"]

    def _observe(self, state: Any, metrics: dict[str, Any] | None = None) -> None:
        if self.schedule_name not in _METRIC_NAMES:
            return
        metrics = metrics or state.metrics
        if self.metric not in metrics:
            raise KeyError(f"lr_sched.metric: {self.metric!r} is not among the evaluation metrics {sorted(metrics)}{closest(self.metric, metrics)}")
        self.build().observe(float(metrics[self.metric]))

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "resolved": dict(self._resolved),
            "schedule": self.schedule.state_dict() if self.schedule is not None else self._pending_state or {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The lengths of the checkpoint's run are only compared with the new ones (build
        # logs a change): the recipe's lengths and options win, so a run can be extended.
        self._resolved = dict(state.get("resolved", {}))
        self.schedule = None
        self._pending_state = state.get("schedule") or None


def _write_extras(group: dict[str, Any], extras: dict[str, Any]) -> None:
    """Momentum values from a torch cycler, mapped onto what the real group has."""
    if "momentum" in extras:
        if "betas" in group:
            group["betas"] = (extras["momentum"], *tuple(group["betas"])[1:])
        elif "momentum" in group:
            group["momentum"] = extras["momentum"]
    if "betas" in extras:
        if "betas" in group:
            group["betas"] = (extras["betas"][0], *tuple(group["betas"])[1:])
        elif "momentum" in group:
            group["momentum"] = extras["betas"][0]
