"""Schedules: pure functions from progress (an optimizer step) to a value.

A schedule is evaluated, never stepped, so it cannot be advanced twice: on N processes
the value at optimizer step ``k`` is the value on one process. Any plain callable
``f(step) -> value`` is a schedule; :func:`as_schedule` wraps it so it composes.

>>> s = warmup(10, cosine(1.0, 0.0, 90))
>>> round(s(5), 3), round(s(10), 3), round(s(100), 3)
(0.5, 1.0, 0.0)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "Schedule",
    "as_schedule",
    "constant",
    "linear",
    "cosine",
    "exponential",
    "warmup",
    "piecewise",
    "sequence",
    "clamp",
]


class Schedule:
    """Base of composable schedules; subclasses implement ``__call__(step)``."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # Algebra: schedules combine with numbers and with each other.
    def __mul__(self, other: Any) -> "Schedule":
        return _Combined(self, as_schedule(other), lambda a, b: a * b, "*")

    __rmul__ = __mul__

    def __add__(self, other: Any) -> "Schedule":
        return _Combined(self, as_schedule(other), lambda a, b: a + b, "+")

    __radd__ = __add__

    def shift(self, offset: int) -> "Schedule":
        """This schedule started ``offset`` steps later (its step 0 is ``offset``)."""
        return _Shifted(self, offset)

    def clamp(self, low: float | None = None, high: float | None = None) -> "Schedule":
        return clamp(self, low, high)


def as_schedule(value: Any) -> Schedule:
    """A schedule from a schedule, a number (constant) or a plain callable."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)):
        return constant(float(value))
    if callable(value):
        return _Callable(value)
    raise TypeError(f"cannot make a schedule from {value!r}; give a number or a callable of the step")


@dataclass(frozen=True)
class _Callable(Schedule):
    fn: Callable[[int], float]

    def __call__(self, step: int) -> float:
        return self.fn(step)


@dataclass(frozen=True)
class _Combined(Schedule):
    left: Schedule
    right: Schedule
    op: Callable[[float, float], float]
    symbol: str

    def __call__(self, step: int) -> float:
        return self.op(self.left(step), self.right(step))


@dataclass(frozen=True)
class _Shifted(Schedule):
    inner: Schedule
    offset: int

    def __call__(self, step: int) -> float:
        return self.inner(step - self.offset)


@dataclass(frozen=True)
class constant(Schedule):
    """The same value at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class linear(Schedule):
    """From ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        if step <= 0:
            return self.start
        if step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.steps


@dataclass(frozen=True)
class cosine(Schedule):
    """Half a cosine from ``start`` to ``end`` over ``steps`` steps, then holds ``end``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.steps) / max(self.steps, 1)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class exponential(Schedule):
    """``start * gamma ** step``."""

    start: float
    gamma: float

    def __call__(self, step: int) -> float:
        return self.start * self.gamma ** max(step, 0)


@dataclass(frozen=True)
class warmup(Schedule):
    """Linear warmup from 0 over ``steps`` steps, then ``then`` started at step ``steps``.

    During warmup the value is ``step / steps`` times ``then``'s first value, as in
    transformers' and diffusers' warmup schedulers.
    """

    steps: int
    then: Any = 1.0

    def __call__(self, step: int) -> float:
        after = as_schedule(self.then)
        if step < self.steps:
            return after(0) * step / max(1, self.steps)
        return after(step - self.steps)


@dataclass(frozen=True)
class piecewise(Schedule):
    """Constant pieces: ``value`` from each boundary step on; ``first`` before them."""

    first: float
    boundaries: Sequence[tuple[int, float]]

    def __call__(self, step: int) -> float:
        steps = [b for b, _ in self.boundaries]
        i = bisect.bisect_right(steps, step)
        return self.first if i == 0 else self.boundaries[i - 1][1]


@dataclass(frozen=True)
class sequence(Schedule):
    """Schedules one after another: ``[(schedule, length), ...]``; each starts at 0.

    The last one runs forever (its length may be ``None``).
    """

    parts: Sequence[tuple[Any, int | None]]

    def __call__(self, step: int) -> float:
        offset = 0
        for i, (part, length) in enumerate(self.parts):
            last = i == len(self.parts) - 1
            if last or length is None or step < offset + length:
                return as_schedule(part)(step - offset)
            offset += length
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class clamp(Schedule):
    """``inner`` limited to ``[low, high]``."""

    inner: Any
    low: float | None = None
    high: float | None = None

    def __call__(self, step: int) -> float:
        value = as_schedule(self.inner)(step)
        if self.low is not None:
            value = max(self.low, value)
        if self.high is not None:
            value = min(self.high, value)
        return value
