"""Keep many models on limited hardware: named models, a byte budget per device, tiers.

Tiers, fastest first: on a compute device (``"cuda:0"``, or ``"cpu"`` on a CPU-only
machine), on the host (``"cpu"``, pinned when the device is CUDA), on ``"disk"`` (a
safetensors file read memory-mapped), ``"unloaded"`` (re-created by a factory). A model
moves up when acquired; when room is needed, the least recently used model that nobody is
using moves one tier down (device -> cpu -> disk). Resident bytes never exceed a device's
budget: space is reserved before a move starts.

A model larger than the whole budget loads partially: as many whole modules as fit stay
resident and the rest are read from the disk file per forward by accelerate's offloading
hooks (``dispatch_model``).

Weights move by swapping ``tensor.data``, so ``Parameter`` objects (and optimizer
references, and tied weights) survive every round trip; a model on disk keeps empty
placeholders.

Events (to ``subscribe``-d callbacks, and on the engine as ``model_cache_<event>``):
``loaded`` (moved up to a device), ``offloaded`` (moved down a tier), ``evicted`` (moved
down to make room for another model), ``partial`` (loaded partially). Counters in
``stats``: hits, misses, bytes_moved, seconds, loads, offloads, evictions.

Threads: a model off the requested device is loaded by one thread (the loader; the entry is
``moving``) while the others asking for it wait on the cache's one Condition with a
*reservation* (a pin): pinned models are not evicted, so a model just loaded stays put until
its waiters wake up and hold it. Holders count only once the model is on their device. Every
wait (for a move, for a holder on another device, for room) ends at ``wait_timeout`` with a
:class:`CacheTimeoutError` naming the model, its holders and the timeout.

    cache = ModelCache(budgets={"cuda:0": "auto"})
    cache.add("teacher", teacher)
    with cache.acquire("teacher") as model:
        cache.prefetch("vae")      # moves the VAE in the background meanwhile
        out = model(x)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["ModelCache", "CacheError", "CacheFullError", "CacheTimeoutError", "parse_bytes"]

DISK = "disk"
UNLOADED = "unloaded"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class CacheError(RuntimeError):
    """A model cache request that cannot be served; the message names the model and device."""


class CacheFullError(CacheError):
    """Not enough room on a device, now or ever, for the requested model.

    ``blockers`` are the cache entries in use that stood in the way (empty when waiting
    cannot help).
    """

    def __init__(self, message: str, blockers: Any = ()) -> None:
        super().__init__(message)
        self.blockers = tuple(blockers)


class CacheTimeoutError(CacheFullError):
    """Waited ``wait_timeout`` seconds and the model, or room for it, stayed taken by other threads.

    The message names the model, what held it (threads by name) and the timeout; a
    ``CacheFullError`` too, since waiting longer is the only thing that could have helped.
    """


def _thread_names(idents: Any) -> list[str]:
    """Thread names for thread ids (for error messages)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return sorted(names.get(i, f"thread {i}") for i in set(idents))


def parse_bytes(value: int | float | str) -> int:
    """``1024``, ``"512MB"``, ``"1.5GiB"`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise CacheError(f"cannot read {value!r} as a size in bytes (e.g. 1000000, '512MB', '2GiB', 'auto')")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _device_key(device: Any) -> str:
    """Canonical device name: ``"cuda"`` -> ``"cuda:0"``, ``torch.device`` -> str."""
    text = str(device)
    if text == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cuda:0"
    return text


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


# --------------------------------------------------------------------- tensors
def _modules_of(model: Any) -> dict[str, Any]:
    """The ``nn.Module``s holding a model's weights: itself, or a pipeline's components."""
    from torch import nn

    if isinstance(model, nn.Module):
        return {"": model}
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        return {name: m for name, m in components.items() if isinstance(m, nn.Module)}
    raise CacheError(f"cannot cache a {type(model).__name__}: it is no nn.Module and has no components")


@dataclass
class _Slot:
    """One place a tensor lives: ``owner._parameters[leaf]`` or ``owner._buffers[leaf]``."""

    key: str  # canonical key in the disk file
    name: str  # this place's dotted name (differs from key for tied aliases)
    owner: Any
    leaf: str
    kind: str  # "_parameters" or "_buffers"
    tensor: Any  # the original object (identity kept across moves)


def _slots(model: Any) -> list[_Slot]:
    """Every parameter and buffer place, aliases included; aliases share the first key."""
    slots: list[_Slot] = []
    first_key: dict[int, str] = {}
    for prefix, module in _modules_of(model).items():
        for mod_name, sub in module.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for leaf, tensor in getattr(sub, kind).items():
                    if tensor is None:
                        continue
                    name = ".".join(p for p in (prefix, mod_name, leaf) if p)
                    key = first_key.setdefault(id(tensor), name)
                    slots.append(_Slot(key, name, sub, leaf, kind, tensor))
    return slots


def _unique(slots: list[_Slot]) -> list[_Slot]:
    seen: set[str] = set()
    out = []
    for slot in slots:
        if slot.key not in seen:
            seen.add(slot.key)
            out.append(slot)
    return out


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    import math

    return math.prod(shape) * dtype.itemsize


@dataclass(eq=False)  # entries compare by identity (they hold models)
class _Entry:
    name: str
    model: Any
    factory: Callable[[], Any] | None
    frozen: bool
    tier: str = "cpu"
    nbytes: int = 0
    resident: int = 0  # bytes counted against the device budget (partial: less than nbytes)
    shapes: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict)
    disk_path: Path | None = None
    disk_current: bool = False
    holders: Counter = field(default_factory=Counter)  # thread id -> acquire depth (model ready there)
    pins: Counter = field(default_factory=Counter)  # (thread id, device) -> waiting acquires (reservations)
    last_used: int = 0
    moving: bool = False  # a loader thread owns the entry (loading, reserving room, moving up)
    loader: int | None = None  # that thread's id
    partial: dict[str, Any] | None = None  # what undoes a partial load

    @property
    def in_use(self) -> bool:
        return sum(self.holders.values()) > 0

    @property
    def pinned(self) -> bool:
        """Someone waits to use it where it is now: evicting it would undo their load."""
        return any(device == self.tier for _, device in self.pins)

    @property
    def busy(self) -> bool:
        """It cannot be moved down now (in use, about to be, or moving)."""
        return self.moving or self.in_use or self.pinned

    def others(self, me: int) -> bool:
        """Another thread holds it, waits for it, or loads it: waiting for them can help."""
        return bool(set(self.holders) - {me}) or self.moving or any(t != me for t, _ in self.pins)

    def users(self) -> str:
        """Who keeps it, for error messages: holders, the loader, waiting threads."""
        bits = []
        if self.holders:
            bits.append(f"held by {_thread_names(self.holders)}")
        if self.loader is not None:
            bits.append(f"being loaded by {_thread_names([self.loader])}")
        if self.pins:
            bits.append(f"wanted by {_thread_names(t for t, _ in self.pins)}")
        return f"{self.name!r} on {self.tier}: " + (", ".join(bits) or "idle")


# ----------------------------------------------------------------------- cache
class ModelCache:
    """Named models under a byte budget per device; LRU eviction; prefetch; thread-safe.

    Also the plugin ``model_cache``.

    Args:
        budgets: device -> bytes, a size string (``"8GiB"``) or ``"auto"`` (free memory minus
            ``reserve``); a device without a budget is unlimited.
        offload_dir: folder of the disk tier; a temporary folder by default.
        reserve: memory left free on a device whose budget is ``"auto"``.
        pin_memory: pin the host copies of models offloaded from a CUDA device.
        wait_timeout: seconds one acquire or prefetch waits in all for other threads (a model
            they load or hold elsewhere, room they hold); then ``CacheTimeoutError``.
        device: default compute device (the engine's device when used as a plugin).
        models: names in ``engine.state.models`` to manage, or name -> ``{"frozen": bool}``.
    """

    def __init__(
        self,
        budgets: dict[str, int | str] | None = None,
        offload_dir: str | None = None,
        reserve: int | str = "1GiB",
        pin_memory: bool = True,
        wait_timeout: float = 60.0,
        device: str | None = None,
        models: list[str] | dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self._budget_specs = {_device_key(k): v for k, v in (budgets or {}).items()}
        self._budgets: dict[str, int] = {}
        self.reserve = parse_bytes(reserve)
        for key, value in self._budget_specs.items():
            if value != "auto":
                self._budgets[key] = parse_bytes(value)
        self._own_dir = offload_dir is None
        self.offload_dir = Path(offload_dir) if offload_dir else None
        self.pin_memory = pin_memory
        self.wait_timeout = wait_timeout
        self.device = _device_key(device) if device else None
        self.models_option = models
        self._entries: dict[str, _Entry] = {}
        self._reserved: Counter = Counter()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._clock = itertools.count(1)
        self._listeners: list[Callable[..., Any]] = []
        self._executor: ThreadPoolExecutor | None = None
        self.stats: dict[str, float] = {
            "hits": 0, "misses": 0, "bytes_moved": 0, "seconds": 0.0, "loads": 0, "offloads": 0, "evictions": 0,
        }
        self.engine: Any = None

    # ------------------------------------------------------------- plugin
    def setup(self, engine: Any) -> None:
        """Fire cache events on the engine; manage the named models; attach the cache slots."""
        self.engine = engine
        if self.device is None:
            self.device = _device_key(engine.runtime.device) if hasattr(engine, "runtime") else None
        self.subscribe(lambda event, **payload: engine.fire(f"model_cache_{event}", **payload))
        engine.attach("acquire_model", lambda next_impl, name, device=None: self.acquire(name, device))
        engine.attach("prefetch_model", lambda next_impl, name, device=None: self.prefetch(name, device))
        engine.attach("cached_model", lambda next_impl, name: self.model(name) if name in self._entries else next_impl(name))
        wanted = self._wanted()
        for name in wanted:
            if name in engine.state.models:
                self.add(name, engine.state.models[name], **wanted[name])

        def adopt(name: str, model: Any) -> None:  # models loaded later (load_on="setup")
            if name in wanted and name not in self._entries:
                self.add(name, model, **wanted[name])

        engine.on("model_loaded", adopt)
        engine.on("teardown", lambda: self.close())

    def _wanted(self) -> dict[str, dict[str, Any]]:
        option = self.models_option or {}
        if isinstance(option, dict):
            return {name: dict(opts or {}) for name, opts in option.items()}
        return {name: {} for name in option}

    def subscribe(self, fn: Callable[..., Any]) -> Callable[[], None]:
        """Call ``fn(event, **payload)`` on every cache event; returns an unsubscribe function."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, event: str, **payload: Any) -> None:
        for fn in list(self._listeners):
            fn(event, **payload)

    # ------------------------------------------------------------ budgets
    def budget(self, device: str) -> int | None:
        """The byte budget of ``device`` (``None``: unlimited)."""
        device = _device_key(device)
        if device not in self._budgets and self._budget_specs.get(device) == "auto":
            self._budgets[device] = max(0, _free_memory(device) - self.reserve)
        return self._budgets.get(device)

    def resident_bytes(self, device: str) -> int:
        """Bytes counted on ``device``: resident models plus space reserved for moves in flight."""
        device = _device_key(device)
        with self._lock:
            return sum(e.resident for e in self._entries.values() if e.tier == device) + self._reserved[device]

    def tier(self, name: str) -> str:
        """Where a model is: a device name, ``"disk"`` or ``"unloaded"``."""
        return self._entry(name).tier

    def names(self) -> list[str]:
        return list(self._entries)

    def lru_order(self, device: str | None = None) -> list[str]:
        """Names, least recently used first (only those on ``device`` when given)."""
        with self._lock:
            entries = [e for e in self._entries.values() if device is None or e.tier == _device_key(device)]
            return [e.name for e in sorted(entries, key=lambda e: e.last_used)]

    def model(self, name: str) -> Any:
        """The model object (wherever its weights are)."""
        return self._entry(name).model

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CacheError(f"no model named {name!r} in the cache; it has {sorted(self._entries)}") from None

    # --------------------------------------------------------------- add
    def add(self, name: str, model: Any = None, factory: Callable[[], Any] | None = None, frozen: bool = False) -> None:
        """Manage a model. ``factory`` re-creates it when unloaded (and loads it lazily when
        ``model`` is None). ``frozen=True`` promises the weights do not change, so a disk copy
        is written once and reused."""
        if model is None and factory is None:
            raise CacheError(f"model {name!r}: give the model, a factory, or both")
        with self._lock:
            if name in self._entries:
                raise CacheError(f"a model named {name!r} is already in the cache")
            entry = _Entry(name, model, factory, frozen, tier=UNLOADED)
            self._entries[name] = entry
            entry.last_used = next(self._clock)
            if model is not None:
                self._adopt(entry)

    def _adopt(self, entry: _Entry) -> None:
        """Account a model where its weights are; if they cannot stay there, write them to disk (lock held)."""
        self._describe(entry)
        device = self._current_device(entry)
        try:
            self._make_room(device, entry.nbytes, exclude=entry)
            entry.tier = device
        except CacheFullError:
            self._write_disk(entry)
            entry.tier, entry.resident = DISK, 0
            self._emit("offloaded", name=entry.name, source=device, target=DISK, nbytes=entry.nbytes, seconds=0.0)

    def _describe(self, entry: _Entry) -> None:
        slots = _unique(_slots(entry.model))
        entry.shapes = {s.key: (tuple(s.tensor.shape), s.tensor.dtype) for s in slots}
        entry.nbytes = sum(_nbytes(shape, dtype) for shape, dtype in entry.shapes.values())
        entry.resident = entry.nbytes

    @staticmethod
    def _current_device(entry: _Entry) -> str:
        for slot in _slots(entry.model):
            return _device_key(slot.tensor.device)
        return "cpu"

    def remove(self, name: str) -> Any:
        """Stop managing a model; returns it with its weights in memory (read back from disk if needed)."""
        with self._lock:
            entry = self._entry(name)
            self._wait_still(entry, "remove it")
            if entry.in_use or entry.pinned:
                raise CacheError(f"model {name!r} is in use ({entry.users()}); release it before removing it")
            if entry.partial is not None:
                self._undo_partial(entry)
            if entry.tier == DISK:
                self._read_disk(entry, "cpu")
            del self._entries[name]
            self._changed.notify_all()
            return entry.model

    # ------------------------------------------------------------ acquire
    @contextlib.contextmanager
    def acquire(self, name: str, device: str | None = None) -> Iterator[Any]:
        """Make sure ``name`` is on ``device`` and keep it there while the block runs.

        Waits at most ``wait_timeout`` seconds in all for other threads (``CacheTimeoutError``).
        """
        device = self._target(device)
        me = threading.get_ident()
        with self._lock:
            entry = self._entry(name)
        self._ensure(entry, device, time.monotonic() + self.wait_timeout, hold=True)
        try:
            yield entry.model
        finally:
            self._release(entry, me)

    def _release(self, entry: _Entry, me: int) -> None:
        with self._lock:
            entry.holders[me] -= 1
            if entry.holders[me] <= 0:
                del entry.holders[me]
            entry.last_used = next(self._clock)
            self._changed.notify_all()

    def prefetch(self, name: str, device: str | None = None) -> Future:
        """Move ``name`` to ``device`` in a background thread; returns a Future of the model."""
        device = self._target(device)
        entry = self._entry(name)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookengine-prefetch")

        def run() -> Any:
            self._ensure(entry, device, time.monotonic() + self.wait_timeout, hold=False)
            return entry.model

        return self._executor.submit(run)

    def _target(self, device: str | None) -> str:
        if device is not None:
            return _device_key(device)
        if self.device is None:
            import torch

            self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        return self.device

    def _ensure(self, entry: _Entry, device: str, deadline: float, hold: bool) -> None:
        """Bring ``entry`` to ``device`` (and hold it when ``hold``): a hit, a wait for another
        thread's load, or this thread loads it. Raises ``CacheTimeoutError`` at ``deadline``."""
        started = time.perf_counter()
        me = threading.get_ident()
        pin = (me, device)
        with self._lock:
            pinned = False
            try:
                while True:
                    if self._entries.get(entry.name) is not entry:
                        raise CacheError(f"model {entry.name!r} was removed from the cache while waiting for it")
                    if not entry.moving:
                        if entry.tier == device:  # ready: holding it and leaving the pin is one step
                            self.stats["hits"] += 1
                            self._ready(entry, hold, me)
                            return
                        if me in entry.holders:  # moving it would pull it from under this thread
                            raise CacheError(
                                f"model {entry.name!r} is in use on {entry.tier} by this thread; "
                                f"release it before acquiring it on {device}"
                            )
                        if not entry.holders:
                            break  # this thread loads it
                    # Another thread moves it, or uses it on another device: wait, pinned.
                    if not pinned:
                        entry.pins[pin] += 1
                        pinned = True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CacheTimeoutError(
                            f"model {entry.name!r}: waited {self.wait_timeout:g} s (wait_timeout) to use it on "
                            f"{device}; {entry.users()}",
                            [entry],
                        )
                    self._changed.wait(left)
            finally:
                if pinned:
                    entry.pins[pin] -= 1
                    if entry.pins[pin] <= 0:
                        del entry.pins[pin]
                    self._changed.notify_all()
            self.stats["misses"] += 1
            entry.moving, entry.loader = True, me
        loaded: dict[str, Any] | None = None
        try:
            loaded = self._load(entry, device, deadline, hold, started)
        finally:
            with self._lock:
                entry.moving, entry.loader = False, None
                self._changed.notify_all()
        if loaded is not None:
            try:
                self._emit("loaded", **loaded)
            except BaseException:
                if hold:  # the caller never gets the model, so it cannot release it
                    self._release(entry, me)
                raise

    def _ready(self, entry: _Entry, hold: bool, me: int) -> None:
        """``entry`` is on its device: count this thread as a holder (lock held)."""
        entry.last_used = next(self._clock)
        if hold:
            entry.holders[me] += 1

    def _load(self, entry: _Entry, device: str, deadline: float, hold: bool, started: float) -> dict[str, Any] | None:
        """The loader's part (``entry.moving`` is this thread's): create, reserve room, move up.

        Returns the ``loaded`` event's payload for a whole move, None otherwise."""
        me = threading.get_ident()
        if entry.tier == UNLOADED:
            model = entry.factory()  # type: ignore[misc]  # outside the lock: other models stay usable
            with self._lock:
                entry.model, entry.disk_current = model, False
                self._adopt(entry)
                if entry.tier == device:
                    self._ready(entry, hold, me)
                    return None
        with self._lock:
            if entry.partial is not None:
                self._undo_partial(entry)
            budget = self.budget(device)
            if budget is not None and entry.nbytes > budget:
                self._load_partial(entry, device, budget)
                self.stats["seconds"] += time.perf_counter() - started
                self._ready(entry, hold, me)
                return None
            self._reserve(entry, device, deadline)
        done = False
        try:
            self._move_up(entry, device)
            done = True
        finally:
            with self._lock:
                self._reserved[device] -= entry.nbytes
                if done:  # tier and reservation change together, so nothing is counted twice
                    entry.tier, entry.resident = device, entry.nbytes
                    self.stats["bytes_moved"] += entry.nbytes
                    self.stats["loads"] += 1
                    self._ready(entry, hold, me)
                self.stats["seconds"] += time.perf_counter() - started
        return {"name": entry.name, "device": device, "nbytes": entry.nbytes, "seconds": time.perf_counter() - started}

    def _reserve(self, entry: _Entry, device: str, deadline: float) -> None:
        """Reserve ``entry.nbytes`` on ``device`` (lock held), evicting or waiting until ``deadline`` for room."""
        me = threading.get_ident()
        while True:
            try:
                self._make_room(device, entry.nbytes, exclude=entry)
                break
            except CacheFullError as exc:
                # Waiting only helps if another thread holds, wants or moves a blocking model.
                others = [e for e in exc.blockers if e is not entry and e.others(me)]
                if not others:
                    raise CacheFullError(f"model {entry.name!r}: {exc}", exc.blockers) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CacheTimeoutError(
                        f"model {entry.name!r}: {exc}; waited {self.wait_timeout:g} s (wait_timeout) for "
                        + "; ".join(e.users() for e in others),
                        exc.blockers,
                    ) from None
                self._changed.wait(left)
        self._reserved[device] += entry.nbytes

    def _wait_still(self, entry: _Entry, action: str) -> None:
        """Wait (lock held) until no thread moves ``entry``, at most ``wait_timeout`` seconds."""
        deadline = time.monotonic() + self.wait_timeout
        while entry.moving:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CacheTimeoutError(
                    f"model {entry.name!r}: waited {self.wait_timeout:g} s (wait_timeout) to {action}; {entry.users()}",
                    [entry],
                )
            self._changed.wait(left)

    def _make_room(self, device: str, need: int, exclude: _Entry | None = None) -> None:
        """Evict least recently used idle models from ``device`` until ``need`` bytes fit (lock held)."""
        budget = self.budget(device)
        if budget is None:
            return
        if need > budget:
            raise CacheFullError(f"{need} bytes can never fit the {budget}-byte budget of {device}")
        while self.resident_bytes(device) + need > budget:
            victims = [e for e in self._entries.values() if e.tier == device and e is not exclude]
            idle = [e for e in victims if not e.busy]
            if not idle:
                busy = sorted(e.name for e in victims)
                raise CacheFullError(
                    f"no room for {need} bytes on {device} (budget {budget}, used {self.resident_bytes(device)}): "
                    f"models in use there: {busy}",
                    # Moves in flight hold reservations: waiting for them can help too.
                    victims + [e for e in self._entries.values() if e.moving and e is not exclude and e not in victims],
                )
            victim = min(idle, key=lambda e: e.last_used)
            self._move_down(victim, event="evicted")

    # -------------------------------------------------------------- moves
    def _move_up(self, entry: _Entry, device: str) -> None:
        """Move weights to ``device`` from the disk file or another device (lock not held)."""
        if entry.tier == DISK:
            self._read_disk(entry, device)
        else:
            self._to_device(entry, device)

    def _lower_tier(self, device: str) -> str:
        return "cpu" if device not in ("cpu", DISK, UNLOADED) else DISK

    def _move_down(self, entry: _Entry, event: str) -> None:
        """Move an idle model one tier down (device -> cpu -> disk), making room there (lock held)."""
        started = time.perf_counter()
        source = entry.tier
        moved = 0  # a partial model's weights, or a frozen model's, are already on disk
        if entry.partial is not None:
            self._undo_partial(entry)
            target = DISK
        else:
            target = self._lower_tier(source)
            if target == "cpu":
                try:
                    self._make_room("cpu", entry.nbytes, exclude=entry)
                except CacheFullError:
                    target = DISK
            if target == "cpu":
                self._to_device(entry, "cpu", pin=_is_cuda(source) and self.pin_memory)
                moved = entry.nbytes
            else:
                moved = self._write_disk(entry)
            entry.tier = target
        entry.resident = entry.nbytes if target != DISK else 0
        seconds = time.perf_counter() - started
        self.stats["bytes_moved"] += moved
        self.stats["seconds"] += seconds
        self.stats["offloads"] += 1
        if event == "evicted":
            self.stats["evictions"] += 1
        self._changed.notify_all()
        self._emit(event, name=entry.name, source=source, target=target, nbytes=moved, seconds=seconds)

    def offload(self, name: str, tier: str = DISK) -> None:
        """Move an idle model down to ``"cpu"`` or ``"disk"`` now (frees its device memory)."""
        with self._lock:
            if tier not in ("cpu", DISK):
                raise CacheError(f"offload tier must be 'cpu' or 'disk', got {tier!r}")
            entry = self._entry(name)
            self._wait_still(entry, "offload it")
            if entry.in_use or entry.pinned:
                raise CacheError(f"model {name!r} is in use ({entry.users()}); it cannot be offloaded")
            while entry.tier not in (tier, DISK, UNLOADED):
                self._move_down(entry, event="offloaded")

    def unload(self, name: str) -> None:
        """Drop a model's weights entirely (it needs a factory to come back)."""
        with self._lock:
            entry = self._entry(name)
            if entry.factory is None:
                raise CacheError(f"model {name!r} has no factory to re-create it; offload it to disk instead")
            self._wait_still(entry, "unload it")
            if entry.in_use or entry.pinned:
                raise CacheError(f"model {name!r} is in use ({entry.users()}); it cannot be unloaded")
            if entry.partial is not None:
                self._undo_partial(entry)
            source = entry.tier
            entry.model, entry.tier, entry.resident = None, UNLOADED, 0
            entry.disk_current = False
            self._changed.notify_all()
            self._emit("offloaded", name=name, source=source, target=UNLOADED, nbytes=0, seconds=0.0)

    def _to_device(self, entry: _Entry, device: str, pin: bool = False) -> None:
        """Swap every tensor's ``.data`` for a copy on ``device`` (identity and ties kept)."""
        for slot in _unique(_slots(entry.model)):
            data = slot.tensor.data.to(device)
            if pin and device == "cpu":
                data = data.pin_memory()
            slot.tensor.data = data
        if not entry.frozen:
            entry.disk_current = False

    # --------------------------------------------------------------- disk
    def _disk_path(self, entry: _Entry) -> Path:
        if self.offload_dir is None:
            self.offload_dir = Path(tempfile.mkdtemp(prefix="hookengine-cache-"))
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.-]", "_", entry.name)
        return self.offload_dir / f"{safe}.safetensors"

    def _write_disk(self, entry: _Entry) -> int:
        """Write the weights (unless a current frozen copy exists), leave empty placeholders;
        returns the bytes written."""
        import torch
        from safetensors.torch import save_file

        slots = _unique(_slots(entry.model))
        written = 0
        if not (entry.frozen and entry.disk_current and entry.disk_path and entry.disk_path.exists()):
            written = entry.nbytes
            path = self._disk_path(entry)
            tensors: dict[str, Any] = {}
            storages: set[tuple[str, int]] = set()
            for slot in slots:
                data = slot.tensor.data.detach().to("cpu").contiguous()
                storage = (str(data.device), data.untyped_storage().data_ptr())
                if storage in storages:  # safetensors refuses tensors that share memory
                    data = data.clone()
                storages.add(storage)
                tensors[slot.key] = data
            temporary = path.with_suffix(".tmp")
            save_file(tensors, str(temporary))
            os.replace(temporary, path)  # a crash never leaves half a file under the real name
            entry.disk_path = path
            entry.disk_current = True
        for slot in slots:
            slot.tensor.data = torch.empty(0, dtype=slot.tensor.dtype)
        return written

    def _read_disk(self, entry: _Entry, device: str, keys: set[str] | None = None) -> None:
        """Fill the placeholders from the disk file (memory-mapped), straight onto ``device``."""
        from safetensors import safe_open

        assert entry.disk_path is not None
        with safe_open(str(entry.disk_path), framework="pt", device=device) as handle:
            for slot in _unique(_slots(entry.model)):
                if keys is None or slot.key in keys:
                    slot.tensor.data = handle.get_tensor(slot.key)

    # ------------------------------------------------------------ partial
    def _load_partial(self, entry: _Entry, device: str, budget: int) -> None:
        """Keep as many whole modules on ``device`` as fit; the rest come from disk per forward (lock held)."""
        import torch
        from accelerate import dispatch_model

        modules = _modules_of(entry.model)
        if list(modules) != [""]:
            raise CacheFullError(
                f"model {entry.name!r} ({entry.nbytes} bytes) is larger than the {budget}-byte budget of {device}; "
                "partial loading needs a single nn.Module (add a pipeline's components separately)"
            )
        model = entry.model
        slots = _slots(model)
        places = {s.name: entry.shapes[s.key] for s in slots}
        units = _units(model, places)
        largest_name = max(units, key=units.__getitem__)
        largest = units[largest_name]
        self._evict_all_idle(device, exclude=entry)
        available = budget - self.resident_bytes(device)
        if largest > available:
            raise CacheFullError(
                f"budget too small for model {entry.name!r} on {device}: its largest module "
                f"{largest_name or '(root)'!r} needs {largest} bytes, {available} of the {budget}-byte budget are free"
            )
        if entry.tier != DISK:
            source = entry.tier
            self._write_disk(entry)
            entry.tier, entry.resident = DISK, 0
            self._emit("offloaded", name=entry.name, source=source, target=DISK, nbytes=entry.nbytes, seconds=0.0)
        # Room for the largest module that is moved in per forward stays free.
        plan, kept = _plan(model, places, available - largest)
        device_map = {module: (device if where == "resident" else "disk") for module, where in plan.items()}
        self._read_disk(entry, device, keys={s.key for s in slots if s.name in kept})
        originals = [(s.owner, s.kind, s.leaf, s.tensor) for s in slots]
        index: dict[str, dict[str, Any]] = {}
        for slot in slots:
            if slot.name in kept:
                continue
            # Real shape on meta, so accelerate's hooks accept the weights they read in.
            shape, dtype = entry.shapes[slot.key]
            meta = torch.empty(shape, dtype=dtype, device="meta")
            table = getattr(slot.owner, slot.kind)
            table[slot.leaf] = torch.nn.Parameter(meta, requires_grad=slot.tensor.requires_grad) if slot.kind == "_parameters" else meta
            index[slot.name] = {"safetensors_file": str(entry.disk_path), "weight_name": slot.key, "dtype": str(dtype).replace("torch.", "")}
        dispatch_model(model, device_map, main_device=device, offload_index=index, offload_buffers=True)
        resident = sum(_nbytes(*places[name]) for name in kept)
        entry.partial = {"originals": originals, "device_map": device_map}
        entry.tier, entry.resident = device, resident + largest
        self.stats["loads"] += 1
        self.stats["bytes_moved"] += resident
        self._emit("partial", name=entry.name, device=device, nbytes=entry.resident, device_map=dict(device_map))

    def _undo_partial(self, entry: _Entry) -> None:
        """Remove the offloading hooks, put the original tensors back as placeholders (on disk)."""
        import torch
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(entry.model)
        if hasattr(entry.model, "hf_device_map"):
            del entry.model.hf_device_map
        for owner, kind, leaf, tensor in entry.partial["originals"]:  # type: ignore[index]
            tensor.data = torch.empty(0, dtype=tensor.dtype)
            getattr(owner, kind)[leaf] = tensor
        entry.partial = None
        entry.tier, entry.resident = DISK, 0

    def _evict_all_idle(self, device: str, exclude: _Entry) -> None:
        for other in sorted(self._entries.values(), key=lambda e: e.last_used):
            if other is not exclude and other.tier == device and not other.busy:
                self._move_down(other, event="evicted")

    # ------------------------------------------------------------- close
    def close(self) -> None:
        """Stop the prefetch thread and delete a temporary offload folder."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._own_dir and self.offload_dir is not None:
            import shutil

            # Models still on disk would lose their weights: bring them back to the CPU first.
            with self._lock:
                for entry in self._entries.values():
                    if entry.tier == DISK and entry.partial is None and not entry.busy:
                        self._read_disk(entry, "cpu")
                        entry.tier, entry.resident = "cpu", entry.nbytes
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            self.offload_dir = None

    def state_dict(self) -> dict[str, Any]:
        """Counters only: the models themselves are checkpointed by the engine state."""
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.update(state.get("stats", {}))


# ------------------------------------------------------------------- helpers
def _direct_bytes(module: Any, places: dict[str, tuple[tuple[int, ...], Any]], prefix: str) -> int:
    """Bytes of the tensors a module holds itself (not in its children)."""
    total = 0
    for kind in ("_parameters", "_buffers"):
        for leaf, tensor in getattr(module, kind).items():
            key = f"{prefix}.{leaf}" if prefix else leaf
            if tensor is not None and key in places:
                total += _nbytes(*places[key])
    return total


def _module_bytes(module: Any, places: dict[str, tuple[tuple[int, ...], Any]], prefix: str) -> int:
    return sum(_direct_bytes(sub, places, name) for name, sub in module.named_modules(prefix=prefix, remove_duplicate=False))


def _splittable(module: Any, places: dict[str, tuple[tuple[int, ...], Any]], prefix: str) -> bool:
    # A module with weights of its own is placed whole (accelerate maps modules, not loose tensors).
    return bool(list(module.children())) and not _direct_bytes(module, places, prefix)


def _units(model: Any, places: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, int]:
    """Sizes of the modules that are never split: leaves, and modules with weights of their own."""
    units: dict[str, int] = {}

    def walk(module: Any, prefix: str) -> None:
        if not _splittable(module, places, prefix):
            units[prefix] = _module_bytes(module, places, prefix)
            return
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return units


def _plan(model: Any, places: dict[str, tuple[tuple[int, ...], Any]], capacity: int) -> tuple[dict[str, str], set[str]]:
    """Greedy plan: whole modules, in order, stay ``"resident"`` while they fit ``capacity``;
    the others go to ``"disk"``. Returns the plan and the tensor places that stay resident."""
    plan: dict[str, str] = {}
    kept: set[str] = set()
    left = capacity

    def walk(module: Any, prefix: str) -> None:
        nonlocal left
        size = _module_bytes(module, places, prefix)
        if size <= left:
            plan[prefix] = "resident"
            kept.update(k for k in places if not prefix or k.startswith(prefix + "."))
            left -= size
        elif _splittable(module, places, prefix):
            for child_name, child in module.named_children():
                walk(child, f"{prefix}.{child_name}" if prefix else child_name)
        else:
            plan[prefix] = "disk"

    walk(model, "")
    return plan, kept


def _free_memory(device: str) -> int:
    """Free bytes on a device right now (CUDA: ``mem_get_info``; CPU: MemAvailable)."""
    if _is_cuda(device):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise CacheError(f"cannot measure free memory of device {device!r}; give its budget in bytes")
