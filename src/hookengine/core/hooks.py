"""The hook registry: events (every listener runs) and slots (a wrapping chain).

All the work happens at attach time: the point must be declared (see :mod:`.points`),
a listener's arguments are bound by name, and each event gets one generated function
that calls its listeners in order, rebuilt when something is attached or detached.
Firing an event is then a dictionary lookup and one call; calling a slot is one call
into a prebuilt chain of partials. Filters (``every``, ``once``, ``when``, ``start``,
``stop``) guard only the listeners that use them; tracing times every call, and only
while it is switched on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .points import POINTS, Point, band_priority

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
    plugin_kind: str | None = None  # the plugin's entry-point name, matched by before=/after= too
    args: tuple[str, ...] | None = None  # events: the bound argument expressions
    keep: Callable[[Any], bool] | None = None  # events: the filters as one predicate

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


def _bind(fn: Callable[..., Any], point: Point) -> tuple[str, ...] | None:
    """The arguments ``fn`` asks for, by name: ``state`` or payload names of ``point``.

    Returns the call's argument expressions, in order, or ``None`` when ``fn`` has no
    inspectable signature (then it gets the state alone). Checked here, at attach time,
    so firing never inspects anything.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return None
    provided = set(point.payload)
    args: list[str] = []
    keywords = False  # once a parameter is skipped, the rest go by keyword
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            args.append("**payload")
            continue
        if p.name == "state":
            value = "state"
        elif p.name in provided:
            value = f"payload[{p.name!r}]"
        elif p.default is not p.empty:
            keywords = True
            continue
        else:
            from .plugins import closest

            offered = ", ".join(("state", *point.payload))
            raise HookError(
                f"listener {_describe(fn)} of event {point.name!r} asks for {p.name!r}"
                f"{closest(p.name, ('state', *point.payload))}, which the event does not provide; "
                f"it provides: {offered} (or take **payload)"
            )
        if p.kind is p.KEYWORD_ONLY or keywords:
            if p.kind is p.POSITIONAL_ONLY:
                raise HookError(f"listener {_describe(fn)}: positional-only {p.name!r} follows a skipped parameter")
            value = f"{p.name}={value}"
        args.append(value)
    return tuple(args)


def _filter_predicate(filters: dict[str, Any], unit: str) -> Callable[[Any], bool] | None:
    """``keep(state)`` for the filters a listener asked for, or ``None`` without filters.

    ``every``, ``once``, ``start`` and ``stop`` read the progress clock (optimizer steps,
    or epochs for ``epoch_*`` events), not a private counter, so they agree after a resume.
    """
    every, once, start, stop, when = (filters.get(k) for k in ("every", "once", "start", "stop", "when"))
    if every is None and once is None and start is None and stop is None and when is None:
        return None
    fired = [False]
    by_epoch = unit == "epoch"

    def keep(state: Any) -> bool:
        t = state.clock.epoch if by_epoch else state.clock.step
        if start is not None and t < start:
            return False
        if stop is not None and t >= stop:
            return False
        if every is not None and t % every:
            return False
        if once is not None:
            if once is True:
                if fired[0]:
                    return False
                fired[0] = True
            elif t != once:
                return False
        return when is None or bool(when(state))

    return keep


def _compile_dispatch(point: str, entries: list["_Entry"], trace: list[TraceRecord] | None) -> tuple[Callable[..., Any], dict[int, "_Entry"]]:
    """One function that calls every listener of ``point`` in order: ``dispatch(state, payload)``.

    Generated once per change of the listener list, so firing is one call for all
    listeners with each argument already bound by name: no per-listener adapter, no
    ``**payload`` re-expansion. Returns the function and a map from its source line to
    the listener on it (to name the one that raised).
    """
    namespace: dict[str, Any] = {}
    lines = ["def dispatch(state, payload):"]
    where: dict[int, _Entry] = {}
    for i, entry in enumerate(entries):
        namespace[f"f{i}"] = entry.fn
        args = "state" if entry.args is None else ", ".join(entry.args)
        call = f"f{i}({args})"
        indent = "    "
        if entry.keep is not None:
            namespace[f"keep{i}"] = entry.keep
            lines.append(f"    if keep{i}(state):")
            indent = "        "
        if trace is None:
            lines.append(indent + call)
            where[len(lines)] = entry
        else:
            namespace[f"e{i}"] = entry
            lines += [indent + "t0 = perf_counter()", indent + "try:"]
            lines.append(indent + "    " + call)
            where[len(lines)] = entry
            lines += [indent + "finally:", indent + f"    record(e{i}, perf_counter() - t0)"]
    if not entries:
        lines.append("    pass")
    if trace is not None:
        namespace["perf_counter"] = time.perf_counter
        namespace["record"] = lambda e, seconds: trace.append(TraceRecord(e.point, e.kind, e.name, e.plugin, seconds))
    exec(compile("\n".join(lines), f"<hookengine dispatch of {point!r}>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace["dispatch"], where


def _missing_implementation(point: str) -> Callable[..., Any]:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise HookError(f"slot {point!r} has no implementation below this one; attach one first")

    missing.__qualname__ = "missing_implementation"
    return missing


class Registry:
    """Events and slots in one registry, over a table of declared points.

    Listeners are called with the arguments they ask for by name: ``state`` (the
    registry's state) and any of the event's payload names, or ``**payload``.
    """

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.declared: dict[str, Point] = dict(POINTS)
        self._entries: dict[str, list[_Entry]] = {}
        self._events: dict[str, Callable[..., Any]] = {}
        self._dispatch_lines: dict[Any, dict[int, _Entry]] = {}  # dispatch code -> line -> listener
        self._slots: dict[str, Callable[..., Any]] = {}
        self._trace: list[TraceRecord] | None = None
        self.current_plugin: str | None = None
        self.current_kind: str | None = None

    # ------------------------------------------------------------ declaring
    def declare(
        self,
        name: str,
        kind: str = "event",
        payload: tuple[str, ...] | list[str] = (),
        doc: str = "",
        owner: str | None = None,
        unit: str = "step",
    ) -> Point:
        """Declare a hook point so that ``on``/``attach`` accept it.

        Declaring the same point again with the same kind and payload is harmless;
        anything else is an error, so two plugins cannot disagree about a point.

        >>> r = Registry()
        >>> r.declare("sample_ready", payload=("image",), doc="a sample image was drawn").kind
        'event'
        """
        if kind not in ("event", "slot"):
            raise ValueError(f"declare({name!r}): kind must be 'event' or 'slot', got {kind!r}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"declare({name!r}): unit must be 'step' or 'epoch', got {unit!r}")
        point = Point(name, kind, tuple(payload), doc, owner or self.current_plugin or "user", unit)  # type: ignore[arg-type]
        known = self.declared.get(name)
        if known is not None:
            if (known.kind, known.payload) != (point.kind, point.payload):
                raise HookError(
                    f"{name!r} is already declared as a {known.kind} with payload {known.payload} "
                    f"(by {known.owner}); cannot redeclare it as a {kind} with payload {point.payload}"
                )
            return known
        self.declared[name] = point
        return point

    def point(self, name: str, kind: str | None = None) -> Point:
        """The declared point ``name``; a clear error with the closest names otherwise."""
        point = self.declared.get(name)
        if point is None:
            from .plugins import closest

            same = [p for p, d in self.declared.items() if kind is None or d.kind == kind]
            raise HookError(
                f"no hook point named {name!r}{closest(name, same)}; declare it first with "
                f"engine.declare({name!r}, kind={kind or 'event'!r}, payload=(...)) "
                f"(`hookengine hooks` lists every point)"
            )
        if kind is not None and point.kind != kind:
            verb = "on()/fire()" if point.kind == "event" else "attach()/call()"
            raise HookError(f"{name!r} is a {point.kind}, not a {kind}; use {verb}")
        return point

    # ------------------------------------------------------------------ events
    def on(
        self,
        point: str,
        fn: Callable[..., Any],
        *,
        priority: int | str = 0,
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
        """Listen to event ``point``; see :meth:`hookengine.Engine.on` for the options."""
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every= must be a positive integer, got {every!r} for event {point!r}")
        declared = self.point(point, "event")
        unit = unit or declared.unit
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
            band_priority(priority),
            before=_names(before),
            after=_names(after),
            filters=filters,
            plugin_kind=self.current_kind if plugin is None else None,
            args=_bind(fn, declared),
            keep=_filter_predicate(filters, unit),
        )
        return self._add(entry)

    def fire(self, point: str, **payload: Any) -> None:
        """Run every listener of ``point``, each with the arguments it asked for."""
        dispatch = self._events.get(point)
        if dispatch is not None:
            try:
                dispatch(self.state, payload)
            except Exception as exc:
                # Zero cost until something raises: then name the listener and plugin.
                self._annotate(exc, point)
                raise

    # ------------------------------------------------------------------- slots
    def attach(
        self,
        point: str,
        fn: Callable[..., Any],
        *,
        priority: int | str = 0,
        plugin: str | None = None,
    ) -> Handle:
        """Attach an implementation of slot ``point``: ``fn(next_impl, *args, **kwargs)``.

        The newest implementation (highest priority first) is called by ``call`` and
        may delegate to the one it replaced through ``next_impl``.
        """
        self.point(point, "slot")
        entry = _Entry(
            point,
            "slot",
            fn,
            plugin if plugin is not None else self.current_plugin,
            band_priority(priority),
            plugin_kind=self.current_kind if plugin is None else None,
        )
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
            self._annotate(exc, point)
            raise

    def has(self, point: str) -> bool:
        """Whether ``point`` has at least one listener or implementation."""
        return bool(self._entries.get(point))

    # ---------------------------------------------------------- introspection
    def points(self) -> list[str]:
        """The points that have something attached, sorted."""
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
            self._rebuild(entry.point)

    def _ordered(self, point: str) -> list[_Entry]:
        entries = self._entries.get(point, [])
        if self.declared[point].kind == "slot":
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
        if self.declared[point].kind == "event":
            old = self._events.pop(point, None)
            if old is not None:
                self._dispatch_lines.pop(old.__code__, None)
            if ordered:
                dispatch, lines = _compile_dispatch(point, ordered, self._trace)
                self._events[point] = dispatch
                self._dispatch_lines[dispatch.__code__] = lines
            return
        if not ordered:
            self._slots.pop(point, None)
            return
        chain: Callable[..., Any] = _missing_implementation(point)
        for entry in reversed(ordered):  # innermost first
            chain = self._wrap(entry, functools.partial(entry.fn, chain))
        self._slots[point] = chain

    def _annotate(self, exc: BaseException, point: str) -> None:
        """Add a note naming the hook and plugin that raised, keeping the exception type."""
        codes = {_code_of(e.fn): e for e in self._entries.get(point, [])}
        culprit = None
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            lines = self._dispatch_lines.get(code)
            if lines is not None:  # the generated dispatch: its line names the listener
                culprit = lines.get(tb.tb_lineno, culprit)
            else:  # slots: the deepest frame that belongs to one of the implementations
                culprit = codes.get(code, culprit)
            tb = tb.tb_next
        where = f"{culprit.name} (plugin {culprit.plugin or 'user'})" if culprit else "an implementation"
        kind = self.declared[point].kind if point in self.declared else "hook"
        note = f"raised in {kind} {point!r} by {where}"
        notes = getattr(exc, "__notes__", [])
        if note not in notes:
            exc.add_note(note)

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
        # A plugin is named by its instance name ("lora") or its kind ("lora_sched").
        for name in {e.plugin, e.plugin_kind} - {None}:
            by_plugin.setdefault(name, []).append(i)  # type: ignore[arg-type]
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
