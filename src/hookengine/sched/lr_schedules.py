"""Learning-rate schedules by name: every transformers / diffusers / torch schedule name
and the function or object that computes it (the ``lr_sched`` plugin that writes them is
:class:`hookengine.sched.lr.LRScheduler`).

Every schedule is evaluated at the progress clock, never stepped: the learning rate of
optimizer step ``k`` (0-based, the ``k``-th update) is ``schedule.lr(k, base_lr)``. On N
processes it is the one-process value, and a resume lands on the same value.

Three kinds of schedule, all behind one interface (:class:`LRSchedule`):

- **closed form** (:class:`LambdaSchedule`): every name of transformers' and diffusers'
  ``get_scheduler`` that is a ``LambdaLR`` (linear, cosine, cosine_with_restarts,
  polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr,
  cosine_warmup_with_min_lr, warmup_stable_decay, piecewise_constant) and the timm-style
  ``cosine_cycles``. ``lr = base_lr * factor(k)``, the same float operations as
  ``LambdaLR``, so the values are bitwise those of the libraries.
- **replayed** (:class:`ReplaySchedule`): torch's scheduler classes by name (``StepLR``,
  ``CosineAnnealingLR``, ``OneCycleLR``...). Most of them are recursive (each value is
  computed from the previous one), so the real torch object is driven on a one-parameter
  stand-in optimizer: forward from where it is, or rebuilt and replayed from step 0 when
  asked for an earlier step (after a resume). Values are bitwise torch's.
- **metric driven** (:class:`MetricSchedule`): ``reduce_lr_on_plateau`` /
  ``ReduceLROnPlateau`` and transformers' ``greedy``: the torch object is stepped once per
  evaluation with a metric, and its state is checkpointed with the plugin.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from ..core.plugins import closest, resolve
from . import groups as _groups

__all__ = [
    "TRANSFORMERS_NAMES",
    "DIFFUSERS_NAMES",
    "TORCH_NAMES",
    "EXTRA_NAMES",
    "all_names",
    "lr_lambda",
    "make_schedule",
    "resolve_length",
    "LRSchedule",
    "LambdaSchedule",
    "ReplaySchedule",
    "MetricSchedule",
]

TRANSFORMERS_NAMES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
DIFFUSERS_NAMES = ("piecewise_constant",)
TORCH_NAMES = (
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "OneCycleLR",
    "PolynomialLR",
)
EXTRA_NAMES = ("cosine_cycles",)
_METRIC_NAMES = ("reduce_lr_on_plateau", "greedy", "ReduceLROnPlateau")
# torch classes that also cycle momentum (or Adam's beta1) unless cycle_momentum=False.
_MOMENTUM_CYCLERS = ("CyclicLR", "OneCycleLR")


def all_names() -> list[str]:
    """Every schedule name this module knows."""
    return [*TRANSFORMERS_NAMES, *DIFFUSERS_NAMES, *TORCH_NAMES, *EXTRA_NAMES]


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown learning-rate schedule {name!r}{_groups.hint(name, all_names())}; "
        f"known: {', '.join(all_names())} (or a callable step -> factor)"
    )


# --------------------------------------------------------------------------- lengths
def resolve_length(value: int | float | None, total: int | None, what: str) -> int:
    """Steps from an int (steps) or a float in [0, 1] (a fraction of ``total``).

    Fractions round up, as transformers' ``warmup_ratio`` does.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected steps (int) or a fraction (float), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: must be >= 0, got {value}")
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: a float is a fraction of the run and must lie in [0, 1], got {value}")
    if total is None:
        raise ValueError(f"{what}: {value} is a fraction of the run, but the run length is unknown; set total_steps")
    return math.ceil(total * value)


# ------------------------------------------------------------------ closed-form lambdas
# Each function below is written with the same float operations, in the same order, as
# the library function it mirrors, so base_lr * factor(k) is bitwise the library's value.


def _ramp(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int) -> float:
    return 1


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def _linear(step: int, *, warmup: int, total: int, f_min: float = 0.0, f_max: float = 1.0) -> float:
    # diffusers' form (f_min/f_max); with the defaults it equals transformers' exactly.
    if step < warmup:
        return f_max * float(step) / float(max(1, warmup))
    progress = float(total - step) / float(max(1, total - warmup))
    return f_min + (f_max - f_min) * max(0.0, progress)


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int = 1) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7, power: float = 1.0) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    if step > total:
        return lr_end / lr_init
    lr_range = lr_init - lr_end
    decay_steps = total - warmup
    pct_remaining = 1 - (step - warmup) / decay_steps
    decay = lr_range * pct_remaining**power + lr_end
    return decay / lr_init


def _inverse_sqrt(step: int, *, warmup: int, timescale: int | None = None) -> float:
    timescale = timescale if timescale is not None else (warmup or 10_000)
    if step < warmup:
        return _ramp(step, warmup)
    shift = timescale - warmup
    return 1.0 / math.sqrt((step + shift) / timescale)


def _cosine_with_min_lr(step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _cosine_warmup_with_min_lr(
    step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float, warmup_lr_rate: float | None = None
) -> float:
    # One step ahead of the others: its warmup starts at 1/warmup, not 0 (see docs/TRAPS.md).
    s, w, t = float(step), float(warmup), float(total)
    if s < w:
        if warmup_lr_rate is None:
            return (s + 1.0) / max(1.0, w)
        rate = float(warmup_lr_rate)
        return rate + (1.0 - rate) * s / max(1, w - 1)
    progress = (s - w + 1.0) / max(1.0, t - w)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _wsd(
    step: int,
    *,
    warmup: int,
    stable: int,
    decay: int,
    warmup_type: str,
    decay_type: str,
    min_lr_ratio: float,
    num_cycles: float,
) -> float:
    if step < warmup:
        progress = float(step) / float(max(1, warmup))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(1.0 - progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _piecewise_rules(step_rules: Any) -> tuple[list[tuple[int, float]], float]:
    """``"1:10,0.1:20,0.005"`` (diffusers) or ``{"rules": [[1, 10], ...], "last": 0.005}``."""
    if isinstance(step_rules, str):
        parts = step_rules.split(",")
        rules = []
        for part in parts[:-1]:
            value, until = part.split(":")
            rules.append((int(until), float(value)))
        return sorted(rules), float(parts[-1])
    if isinstance(step_rules, (list, tuple)):
        *pairs, last = step_rules
        return sorted((int(until), float(value)) for value, until in pairs), float(last)
    raise TypeError(f"step_rules: expected 'value:until,...,last' or [[value, until], ..., last], got {step_rules!r}")


def _piecewise_constant(step: int, *, rules: list[tuple[int, float]], last: float) -> float:
    for until, value in rules:
        if step < until:
            return value
    return last


def _cosine_cycles(
    step: int,
    *,
    warmup: int,
    cycle_steps: int,
    min_lr_ratio: float = 0.0,
    cycle_mul: float = 1.0,
    cycle_decay: float = 1.0,
    cycle_limit: int | None = 1,
    k_decay: float = 1.0,
    warmup_init_ratio: float = 0.0,
    warmup_prefix: bool = False,
) -> float:
    """timm-style cosine with restarts: cycles grow by ``cycle_mul``, peaks shrink by
    ``cycle_decay``, ``cycle_limit`` cycles then ``min_lr_ratio``; k-decay bends the curve
    (``cos(pi * t**k / T**k)``, arXiv:2004.05909). Without ``warmup_prefix`` the warmup
    overlaps the first cycle, as in timm."""
    if step < warmup:
        return warmup_init_ratio + step * (1.0 - warmup_init_ratio) / warmup
    t = step - warmup if warmup_prefix else step
    cycle, start, length = 0, 0.0, float(cycle_steps)
    if cycle_mul == 1.0:
        cycle = int(t // cycle_steps)
        start = float(cycle * cycle_steps)
    else:
        # Walk the cycles instead of timm's log(): exact at cycle boundaries.
        while t >= start + length and (cycle_limit is None or cycle < cycle_limit):
            start += length
            length *= cycle_mul
            cycle += 1
    if cycle_limit is not None and cycle >= cycle_limit:
        return min_lr_ratio
    peak = cycle_decay**cycle
    t_cur = t - start
    return min_lr_ratio + 0.5 * (peak - min_lr_ratio) * (1 + math.cos(math.pi * t_cur**k_decay / length**k_decay))


def lr_lambda(
    name: str,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    lr_init: float | None = None,
    **options: Any,
) -> Callable[[int], float]:
    """The multiplier ``step -> factor`` of a closed-form schedule (``LambdaLR``'s lambda).

    ``options`` are the library's scheduler-specific arguments (``num_cycles``, ``power``,
    ``lr_end``, ``min_lr``, ``min_lr_rate``, ``warmup_lr_rate``, ``timescale``,
    ``num_decay_steps``, ``num_stable_steps``, ``warmup_type``, ``decay_type``,
    ``min_lr_ratio``, ``step_rules``, ``f_min``, ``f_max``; for ``cosine_cycles``:
    ``cycle_steps``, ``cycle_mul``, ``cycle_decay``, ``cycle_limit``, ``k_decay``,
    ``min_lr_ratio``, ``warmup_init_ratio``, ``warmup_prefix``). ``lr_init`` is the
    optimizer's lr, needed where the library divides by it (polynomial, min_lr).
    """
    from functools import partial

    w = warmup_steps

    def need_total() -> int:
        if total_steps is None:
            raise ValueError(f"schedule {name!r} needs the run length: set total_steps (or use it inside a loop)")
        return total_steps

    def need_lr() -> float:
        if lr_init is None:
            raise ValueError(f"schedule {name!r} needs the optimizer's initial lr (lr_init)")
        return lr_init

    def take(*allowed: str) -> dict[str, Any]:
        unknown = [k for k in options if k not in allowed]
        if unknown:
            hint = closest(unknown[0], allowed)
            raise ValueError(f"schedule {name!r}: unknown option {unknown[0]!r}{hint}; it accepts {list(allowed)}")
        return dict(options)

    if name == "constant":
        take()
        return _constant
    if name == "constant_with_warmup":
        take()
        return partial(_constant_with_warmup, warmup=w)
    if name == "linear":
        return partial(_linear, warmup=w, total=need_total(), **take("f_min", "f_max"))
    if name == "cosine":
        return partial(_cosine, warmup=w, total=need_total(), **take("num_cycles"))
    if name == "cosine_with_restarts":
        return partial(_cosine_with_restarts, warmup=w, total=need_total(), **take("num_cycles"))
    if name == "polynomial":
        opts = take("lr_end", "power")
        lr0 = need_lr()
        if not lr0 > opts.get("lr_end", 1e-7):
            raise ValueError(f"schedule 'polynomial': lr_end ({opts.get('lr_end', 1e-7)}) must be smaller than the initial lr ({lr0})")
        return partial(_polynomial, warmup=w, total=need_total(), lr_init=lr0, **opts)
    if name == "inverse_sqrt":
        return partial(_inverse_sqrt, warmup=w, **take("timescale"))
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        extra = ("warmup_lr_rate",) if name == "cosine_warmup_with_min_lr" else ()
        opts = take("num_cycles", "min_lr", "min_lr_rate", *extra)
        min_lr, rate = opts.pop("min_lr", None), opts.pop("min_lr_rate", None)
        if min_lr is not None and rate is not None:
            raise ValueError(f"schedule {name!r}: set only one of min_lr and min_lr_rate")
        if min_lr is not None:
            rate = min_lr / need_lr()
        if rate is None:
            raise ValueError(f"schedule {name!r}: set min_lr or min_lr_rate")
        fn = _cosine_with_min_lr if name == "cosine_with_min_lr" else _cosine_warmup_with_min_lr
        return partial(fn, warmup=w, total=need_total(), min_lr_rate=rate, **opts)
    if name == "warmup_stable_decay":
        return _wsd_lambda(w, total_steps, take("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"))
    if name == "piecewise_constant":
        opts = take("step_rules")
        if "step_rules" not in opts:
            raise ValueError("schedule 'piecewise_constant': set step_rules, e.g. '1:10,0.1:20,0.01'")
        rules, last = _piecewise_rules(opts["step_rules"])
        return partial(_piecewise_constant, rules=rules, last=last)
    if name == "cosine_cycles":
        opts = take("cycle_steps", "min_lr_ratio", "min_lr", "cycle_mul", "cycle_decay", "cycle_limit", "k_decay", "warmup_init_ratio", "warmup_prefix")
        if "min_lr" in opts:
            opts["min_lr_ratio"] = opts.pop("min_lr") / need_lr()
        cycle_steps = opts.pop("cycle_steps", None) or need_total()
        if opts.get("cycle_mul", 1.0) < 1.0:
            raise ValueError("schedule 'cosine_cycles': cycle_mul must be >= 1")
        return partial(_cosine_cycles, warmup=w, cycle_steps=int(cycle_steps), **opts)
    raise _unknown(name)


def _wsd_lambda(warmup: int, total: int | None, opts: dict[str, Any]) -> Callable[[int], float]:
    from functools import partial

    decay = opts.pop("num_decay_steps", None)
    stable = opts.pop("num_stable_steps", None)
    if decay is None:
        raise ValueError("schedule 'warmup_stable_decay': set num_decay_steps (or the plugin's decay=)")
    if stable is None:
        if total is None:
            raise ValueError("schedule 'warmup_stable_decay': set num_stable_steps or total_steps")
        stable = total - warmup - decay
    for key in ("warmup_type", "decay_type"):
        if opts.get(key, "linear" if key == "warmup_type" else "cosine") not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"schedule 'warmup_stable_decay': {key} must be 'linear', 'cosine' or '1-sqrt', got {opts[key]!r}")
    return partial(
        _wsd,
        warmup=warmup,
        stable=stable,
        decay=decay,
        warmup_type=opts.get("warmup_type", "linear"),
        decay_type=opts.get("decay_type", "cosine"),
        min_lr_ratio=opts.get("min_lr_ratio", 0),
        num_cycles=opts.get("num_cycles", 0.5),
    )


# ------------------------------------------------------------------------ schedules
class LRSchedule:
    """The interface every schedule has: the lr of a group at an optimizer step."""

    def lr(self, step: int, base_lr: float) -> float:  # pragma: no cover - abstract
        """The learning rate at optimizer step ``step`` for a group whose base lr is ``base_lr``."""
        raise NotImplementedError

    def extras(self, step: int) -> dict[str, Any]:
        """Other hyper-parameters the schedule sets (momentum, betas); absolute values."""
        return {}

    def observe(self, metric: float) -> None:
        """A new evaluation metric (only metric-driven schedules use it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LambdaSchedule(LRSchedule):
    """``lr = base_lr * factor(step)``: a pure function of the step."""

    def __init__(self, factor: Callable[[int], float]) -> None:
        self.factor = factor

    def lr(self, step: int, base_lr: float) -> float:
        return base_lr * self.factor(step)


def _stand_in_optimizer(lr: float, hyper: dict[str, Any]) -> Any:
    """A one-parameter optimizer that torch schedulers can drive (never really steps)."""
    import torch

    class _StandIn(torch.optim.Optimizer):
        def step(self, closure: Any = None) -> None:  # marks "optimizer stepped" for torch's warning
            return None

    return _StandIn([torch.zeros(1, requires_grad=True)], {"lr": lr, **hyper})


def _torch_scheduler(name: str, optimizer: Any, options: dict[str, Any]) -> Any:
    """Build torch scheduler ``name`` on ``optimizer``; nested specs for Sequential/Chained."""
    import inspect

    import torch.optim.lr_scheduler as torch_lr

    cls = getattr(torch_lr, name)
    opts = dict(options)
    for key in ("lr_lambda", "scale_fn"):
        if isinstance(opts.get(key), str):
            opts[key] = resolve(opts[key])  # recipes reference code as module:attr
    if name in ("SequentialLR", "ChainedScheduler"):
        specs = opts.pop("schedulers", None)
        if not specs:
            raise ValueError(f"schedule {name!r}: set schedulers: [{{name: ..., ...options}}, ...]")
        inner = []
        for spec in specs:
            spec = dict(spec)
            inner_name = spec.pop("name")
            if inner_name not in TORCH_NAMES:
                raise ValueError(f"schedule {name!r}: inner scheduler {inner_name!r} is not a torch class{closest(inner_name, TORCH_NAMES)}")
            inner.append(_torch_scheduler(inner_name, optimizer, spec))
        opts["schedulers"] = inner
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("optimizer", "last_epoch")]
    unknown = [k for k in opts if k not in accepted]
    if unknown:
        raise ValueError(f"schedule {name!r}: unknown option {unknown[0]!r}{closest(unknown[0], accepted)}; it accepts {accepted}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's construction-time step warnings
        if name == "ChainedScheduler":
            return cls(optimizer=optimizer, **opts)
        return cls(optimizer, **opts)


def _momentum_keys(hyper: dict[str, Any]) -> dict[str, Any]:
    return {k: hyper[k] for k in ("momentum", "betas") if k in hyper}


class ReplaySchedule(LRSchedule):
    """A torch scheduler class, driven on a stand-in optimizer.

    The value at step ``k`` is the stand-in's lr after ``k`` calls of ``scheduler.step()``.
    Going forward steps the object; going back (a resume) rebuilds and replays it, so the
    value is a pure function of ``k`` and nothing needs checkpointing.

    Args:
        name: the torch class name.
        base_lr: the lr the stand-in starts from (the reference group's base lr).
        options: the class's arguments.
        hyper: momentum / betas of the real optimizer, for the classes that cycle them.
    """

    def __init__(self, name: str, base_lr: float, options: dict[str, Any], hyper: dict[str, Any] | None = None) -> None:
        self.name = name
        self.base_lr = float(base_lr)
        self.options = dict(options)
        self.hyper = _momentum_keys(hyper or {})
        if name in _MOMENTUM_CYCLERS and self.options.get("cycle_momentum", True) and not self.hyper:
            self.hyper = {"momentum": 0.0}  # so torch accepts it; the values are then unused
        self.cycles_momentum = name in _MOMENTUM_CYCLERS and self.options.get("cycle_momentum", True)
        self._rebuild()

    def _rebuild(self) -> None:
        self._optimizer = _stand_in_optimizer(self.base_lr, self.hyper)
        self._scheduler = _torch_scheduler(self.name, self._optimizer, self.options)
        self._at = 0

    def _seek(self, step: int) -> dict[str, Any]:
        step = max(0, int(step))
        if step < self._at:
            self._rebuild()
        while self._at < step:
            self._optimizer.step()
            self._scheduler.step()
            self._at += 1
        return self._optimizer.param_groups[0]

    def lr(self, step: int, base_lr: float) -> float:
        value = float(self._seek(step)["lr"])
        # Exact for the reference group; other groups scale proportionally.
        return value if base_lr == self.base_lr else value * (base_lr / self.base_lr)

    def extras(self, step: int) -> dict[str, Any]:
        if not self.cycles_momentum:
            return {}
        group = self._seek(step)
        return {k: group[k] for k in self.hyper}


class MetricSchedule(LRSchedule):
    """``ReduceLROnPlateau`` (torch / transformers) or transformers' ``GreedyLR``.

    Stepped once per :meth:`observe` (the plugin calls it at ``evaluate_end``; the loop's
    metrics are already averaged over processes, so every rank takes the same decision).
    The scheduler's state and its current lr are checkpointed.
    """

    def __init__(self, name: str, base_lr: float, options: dict[str, Any]) -> None:
        self.name = name
        self.base_lr = float(base_lr)
        self.options = dict(options)
        self._optimizer = _stand_in_optimizer(self.base_lr, {})
        if name == "greedy":
            from transformers.optimization import GreedyLR

            self._scheduler = GreedyLR(self._optimizer, **self.options)
        else:
            self._scheduler = _torch_scheduler("ReduceLROnPlateau", self._optimizer, self.options)

    def observe(self, metric: float) -> None:
        self._scheduler.step(float(metric))

    def lr(self, step: int, base_lr: float) -> float:
        value = float(self._optimizer.param_groups[0]["lr"])
        return value if base_lr == self.base_lr else value * (base_lr / self.base_lr)

    def state_dict(self) -> dict[str, Any]:
        # torch's load_state_dict does not restore the lr itself (docs/TRAPS.md): keep it here.
        return {"scheduler": self._scheduler.state_dict(), "lr": float(self._optimizer.param_groups[0]["lr"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scheduler.load_state_dict(state["scheduler"])
        self._optimizer.param_groups[0]["lr"] = state["lr"]


def make_schedule(
    name: str | Callable[[int], float],
    *,
    base_lr: float,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    options: dict[str, Any] | None = None,
    hyper: dict[str, Any] | None = None,
) -> LRSchedule:
    """A schedule by name (see :func:`all_names`) or from a callable ``step -> factor``.

    ``base_lr`` is the reference lr (the optimizer's initial lr); ``hyper`` holds the real
    optimizer's momentum/betas for torch classes that cycle them.
    """
    options = dict(options or {})
    if callable(name):
        return LambdaSchedule(name)
    if name in _METRIC_NAMES:
        return MetricSchedule(name, base_lr, options)
    if name in TORCH_NAMES:
        if warmup_steps:
            raise ValueError(f"schedule {name!r}: torch classes have no warmup; use SequentialLR with a LinearLR")
        return ReplaySchedule(name, base_lr, options, hyper)
    if name in all_names():
        return LambdaSchedule(lr_lambda(name, warmup_steps=warmup_steps, total_steps=total_steps, lr_init=base_lr, **options))
    raise _unknown(name)

