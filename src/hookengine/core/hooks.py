"""The hook registry: events (every listener runs) and slots (a wrapping chain).

All the work happens at attach time. Each point keeps a ready tuple of callables,
rebuilt when something is attached or detached, so firing an event is a dictionary
lookup and a loop, and calling a slot is one call into a prebuilt chain of partials.
Filters (``every``, ``once``, ``when``, ``start``, ``stop``) wrap only the listeners
that use them; tracing wraps everything, and only while it is switched on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["HookError", "Handle", "Registry", "TraceRecord"]

_counter = itertools.count()


class HookError(RuntimeError):
    """A hook raised, or the registry was asked for something impossible.

    The message names the hook point, the function and the plugin it came from.
    """


@dataclass
class TraceRecord:
    """One call seen while tracing is on."""

    point: str
    kind: str
    function: str
    plugin: str | None
    seconds: float


@dataclass(eq=False)
class _Entry:
    point: str
    kind: str  # "event" or "slot"
    fn: Callable[..., Any]
    plugin: str | None
    priority: int
    order: int = field(default_factory=lambda: next(_counter))
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    filters: dict[str, Any] = field(default_factory=dict)
    ready: Callable[..., Any] | None = None  # fn with adapters and filters applied

    @property
    def name(self) -> str:
        return _describe(self.fn)

    def describe(self, position: int) -> dict[str, Any]:
        return {
            "point": self.point,
            "kind": self.kind,
            "position": position,
            "function": self.name,
            "plugin": self.plugin,
            "priority": self.priority,
            "before": list(self.before),
            "after": list(self.after),
            "filters": {k: _describe(v) if callable(v) else v for k, v in self.filters.items()},
        }


class Handle:
    """Returned by ``on`` and ``attach``; ``detach()`` removes the hook again."""

    __slots__ = ("_registry", "_entry")

    def __init__(self, registry: "Registry", entry: _Entry) -> None:
        self._registry = registry
        self._entry = entry

    @property
    def attached(self) -> bool:
        return self._entry in self._registry._entries.get(self._entry.point, ())

    def detach(self) -> None:
        """Remove this hook; detaching twice is harmless."""
        self._registry._remove(self._entry)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        e = self._entry
        return f"<Handle {e.kind} {e.point!r} -> {e.name} ({e.plugin or 'user'})>"


def _describe(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return _describe(fn.func)
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}" if module else name


def _adapt_listener(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` callable as ``fn(state, **payload)``.

    A listener may take the state and any subset of the payload by name; one that takes
    ``**kwargs`` is used as it is (the fast path).
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return fn
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY) | frozenset(
        p.name for p in positional[1:]
    )
    if not positional:
        if not names:
            return lambda state, **payload: fn()
        return lambda state, **payload: fn(**{k: v for k, v in payload.items() if k in names})
    if not names:
        return lambda state, **payload: fn(state)
    return lambda state, **payload: fn(state, **{k: v for k, v in payload.items() if k in names})


def _apply_filters(fn: Callable[..., Any], filters: dict[str, Any], unit: str) -> Callable[..., Any]:
    """Wrap ``fn`` in the filters it asked for; listeners without filters stay unwrapped.

    ``every``, ``once``, ``start`` and ``stop`` read the progress clock (optimizer steps,
    or epochs for ``epoch_*`` events), not a private counter, so they agree after a resume.
    """
    every = filters.get("every")
    once = filters.get("once")
    start = filters.get("start")
    stop = filters.get("stop")
    when = filters.get("when")
    if every is None and once is None and start is None and stop is None and when is None:
        return fn
    fired = [False]

    by_epoch = unit == "epoch"

    def filtered(state: Any, **payload: Any) -> Any:
        t = state.clock.epoch if by_epoch else state.clock.step
        if start is not None and t < start:
            return None
        if stop is not None and t >= stop:
            return None
        if every is not None and t % every:
            return None
        if once is not None:
            if once is True:
                if fired[0]:
                    return None
                fired[0] = True
            elif t != once:
                return None
        if when is not None and not when(state):
            return None
        return fn(state, **payload)

    return filtered


def _missing_implementation(point: str) -> Callable[..., Any]:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise HookError(f"slot {point!r} has no implementation below this one; attach one first")

    missing.__qualname__ = "missing_implementation"
    return missing


class Registry:
    """Events and slots in one registry.

    ``state`` is passed as the first argument to every event listener.
    """

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self._entries: dict[str, list[_Entry]] = {}
        self._kinds: dict[str, str] = {}
        self._events: dict[str, tuple[Callable[..., Any], ...]] = {}
        self._slots: dict[str, Callable[..., Any]] = {}
        self._trace: list[TraceRecord] | None = None
        self._ready_cache: dict[int, Callable[..., Any]] = {}
        self.current_plugin: str | None = None

    # ------------------------------------------------------------------ events
    def on(
        self,
        point: str,
        fn: Callable[..., Any],
        *,
        priority: int = 0,
        every: int | None = None,
        once: bool | int | None = None,
        when: Callable[[Any], bool] | None = None,
        start: int | None = None,
        stop: int | None = None,
        before: str | tuple[str, ...] | list[str] = (),
        after: str | tuple[str, ...] | list[str] = (),
        unit: str | None = None,
        plugin: str | None = None,
    ) -> Handle:
        """Listen to event ``point``. Higher ``priority`` runs earlier; ties keep
        registration order; ``before``/``after`` name plugins this listener must precede
        or follow."""
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every= must be a positive integer, got {every!r} for event {point!r}")
        self._check_kind(point, "event")
        unit = unit or ("epoch" if point.startswith("epoch_") else "step")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit= must be 'step' or 'epoch', got {unit!r}")
        filters = {
            k: v
            for k, v in dict(every=every, once=once, when=when, start=start, stop=stop).items()
            if v is not None
        }
        entry = _Entry(
            point,
            "event",
            fn,
            plugin if plugin is not None else self.current_plugin,
            priority,
            before=_names(before),
            after=_names(after),
            filters=filters,
        )
        entry.ready = _apply_filters(_adapt_listener(fn), filters, unit)
        return self._add(entry)

    def fire(self, point: str, **payload: Any) -> None:
        """Run every listener of ``point`` with ``(state, **payload)``."""
        listeners = self._events.get(point)
        if listeners:
            state = self.state
            try:
                if payload:
                    for fn in listeners:
                        fn(state, **payload)
                else:  # no payload: skip building a keyword dict per listener
                    for fn in listeners:
                        fn(state)
            except Exception as exc:
                # Zero cost until something raises: then name the listener and plugin.
                self._annotate(exc, point, fn)
                raise

    # ------------------------------------------------------------------- slots
    def attach(
        self,
        point: str,
        fn: Callable[..., Any],
        *,
        priority: int = 0,
        plugin: str | None = None,
    ) -> Handle:
        """Attach an implementation of slot ``point``: ``fn(next_impl, *args, **kwargs)``.

        The newest implementation (highest priority first) is called by ``call`` and
        may delegate to the one it replaced through ``next_impl``.
        """
        self._check_kind(point, "slot")
        entry = _Entry(point, "slot", fn, plugin if plugin is not None else self.current_plugin, priority)
        return self._add(entry)

    def call(self, point: str, *args: Any, **kwargs: Any) -> Any:
        """Call the outermost implementation of slot ``point``."""
        try:
            chain = self._slots[point]
        except KeyError:
            raise HookError(
                f"slot {point!r} has no implementation; attached slots: {sorted(self._slots)}"
            ) from None
        try:
            return chain(*args, **kwargs)
        except Exception as exc:
            self._annotate(exc, point, None)
            raise

    def has(self, point: str) -> bool:
        """Whether ``point`` has at least one listener or implementation."""
        return bool(self._entries.get(point))

    # ---------------------------------------------------------- introspection
    def points(self) -> list[str]:
        return sorted(p for p, entries in self._entries.items() if entries)

    def describe(self, point: str | None = None) -> list[dict[str, Any]]:
        """Every attached hook, in the order it runs (slots: outermost first)."""
        rows: list[dict[str, Any]] = []
        for p in [point] if point else self.points():
            for i, entry in enumerate(self._ordered(p)):
                rows.append(entry.describe(i))
        return rows

    # ------------------------------------------------------------------ trace
    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[TraceRecord]]:
        """Record every hook call (point, function, plugin, seconds) while inside."""
        records: list[TraceRecord] = []
        previous = self._trace
        self._trace = records
        self._rebuild_all()
        try:
            yield records
        finally:
            self._trace = previous
            self._rebuild_all()

    # --------------------------------------------------------------- internals
    def _check_kind(self, point: str, kind: str) -> None:
        known = self._kinds.setdefault(point, kind)
        if known != kind:
            verb = "on()/fire()" if known == "event" else "attach()/call()"
            raise HookError(f"{point!r} is a {known}, not a {kind}; use {verb}")

    def _add(self, entry: _Entry) -> Handle:
        self._entries.setdefault(entry.point, []).append(entry)
        try:
            self._rebuild(entry.point)
        except Exception:
            self._entries[entry.point].remove(entry)
            self._rebuild(entry.point)
            raise
        return Handle(self, entry)

    def _remove(self, entry: _Entry) -> None:
        entries = self._entries.get(entry.point)
        if entries and entry in entries:
            entries.remove(entry)
            self._ready_cache.pop(id(entry), None)
            self._rebuild(entry.point)

    def _ordered(self, point: str) -> list[_Entry]:
        entries = self._entries.get(point, [])
        if self._kinds.get(point) == "slot":
            # Outermost first: highest priority, then newest.
            return sorted(entries, key=lambda e: (-e.priority, -e.order))
        ordered = sorted(entries, key=lambda e: (-e.priority, e.order))
        if any(e.before or e.after for e in ordered):
            ordered = _constrain(point, ordered)
        return ordered

    def _rebuild_all(self) -> None:
        for point in list(self._entries):
            self._rebuild(point)

    def _rebuild(self, point: str) -> None:
        ordered = self._ordered(point)
        if self._kinds[point] == "event":
            if ordered:
                ready = []
                for e in ordered:
                    r = self._wrap(e, e.ready)
                    self._ready_cache[id(e)] = r
                    ready.append(r)
                self._events[point] = tuple(ready)
            else:
                self._events.pop(point, None)
            return
        if not ordered:
            self._slots.pop(point, None)
            return
        chain: Callable[..., Any] = _missing_implementation(point)
        for entry in reversed(ordered):  # innermost first
            chain = self._wrap(entry, functools.partial(entry.fn, chain))
        self._slots[point] = chain

    def _annotate(self, exc: BaseException, point: str, ready: Callable[..., Any] | None) -> None:
        """Add a note naming the hook and plugin that raised, keeping the exception type."""
        entries = self._entries.get(point, [])
        culprit = None
        if ready is not None:
            culprit = next((e for e in entries if self._ready_of(e) is ready), None)
        if culprit is None:
            # Slots: the deepest traceback frame that belongs to one of the implementations.
            codes = {_code_of(e.fn): e for e in entries}
            tb = exc.__traceback__
            while tb is not None:
                culprit = codes.get(tb.tb_frame.f_code, culprit)
                tb = tb.tb_next
        where = f"{culprit.name} (plugin {culprit.plugin or 'user'})" if culprit else "an implementation"
        note = f"raised in {self._kinds.get(point, 'hook')} {point!r} by {where}"
        notes = getattr(exc, "__notes__", [])
        if note not in notes:
            exc.add_note(note)

    def _ready_of(self, entry: _Entry) -> Callable[..., Any] | None:
        return self._ready_cache.get(id(entry))

    def _wrap(self, entry: _Entry, call: Callable[..., Any]) -> Callable[..., Any]:
        records = self._trace
        if records is None:
            return call

        def traced(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                # Slot records are appended outermost-last (after their inner calls).
                records.append(
                    TraceRecord(entry.point, entry.kind, entry.name, entry.plugin, time.perf_counter() - t0)
                )

        return traced


def _code_of(fn: Any) -> Any:
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _constrain(point: str, entries: list[_Entry]) -> list[_Entry]:
    """Order ``entries`` so every ``before``/``after`` constraint holds.

    A stable topological sort: among the entries free to run next, the one earliest in
    priority-then-registration order goes first.
    """
    successors: dict[int, set[int]] = {i: set() for i in range(len(entries))}
    by_plugin: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.plugin:
            by_plugin.setdefault(e.plugin, []).append(i)
    for i, e in enumerate(entries):
        for name in e.before:
            for j in by_plugin.get(name, ()):
                if j != i:
                    successors[i].add(j)
        for name in e.after:
            for j in by_plugin.get(name, ()):
                if j != i:
                    successors[j].add(i)
    indegree = [0] * len(entries)
    for succ in successors.values():
        for j in succ:
            indegree[j] += 1
    result: list[_Entry] = []
    free = sorted(i for i in range(len(entries)) if indegree[i] == 0)
    while free:
        i = free.pop(0)
        result.append(entries[i])
        for j in successors[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                free.append(j)
                free.sort()
    if len(result) != len(entries):
        stuck = sorted({entries[i].plugin or "user" for i in range(len(entries)) if indegree[i] > 0})
        raise HookError(f"before/after constraints on event {point!r} form a cycle between plugins {stuck}")
    return result
