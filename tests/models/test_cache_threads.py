"""model_cache under threads: forced interleavings, wait_timeout, reservations.

Each test runs the cache calls in daemon threads joined with a timeout, so a deadlock fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from hookengine.models.cache import CacheError, CacheFullError, ModelCache
from hookengine.testing import build_tiny_mlp

WIDTH = 32
MODEL = 4 * (WIDTH * WIDTH + WIDTH) * 4  # bytes of build_tiny_mlp(WIDTH, 4) in float32
JOIN_S = 10.0  # far above what any of these tests needs; a thread still alive after it is stuck

pytestmark = pytest.mark.threads  # in scripts/flaky_check.sh


def _run(*targets: Callable[[], Any]) -> tuple[list[threading.Thread], dict[int, Any]]:
    """Start one daemon thread per target; results[i] is its return value or its exception."""
    results: dict[int, Any] = {}

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True, name=f"worker-{i}") for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    return threads, results


def _join(threads: list[threading.Thread], timeout: float = JOIN_S) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads stuck after {timeout} s (deadlock): {stuck}"


def _parked(thread: threading.Thread) -> bool:
    """True while ``thread`` sleeps in ``threading.Condition.wait`` (the cache's only wait)."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    return frame is not None and frame.f_code is threading.Condition.wait.__code__


def _wait_parked(thread: threading.Thread, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _parked(thread):
            return True
        time.sleep(0.005)
    return False


def test_two_threads_asking_for_a_model_off_the_device_both_get_it(tmp_path: Path) -> None:
    """The reported deadlock, forced: both threads have asked for the model before either
    starts to load it (a barrier at the entry of the cache's loading step)."""
    model = build_tiny_mlp(WIDTH, 4, seed=1)
    x = torch.randn(2, WIDTH)
    expected = model(x).detach()
    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=3)
    cache.add("a", model)
    cache.offload("a", "disk")
    both_asked = threading.Barrier(2, timeout=5)
    ensure_code = ModelCache._ensure.__code__

    def stop_at_ensure(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is ensure_code:
            both_asked.wait()
        return None

    def use() -> bool:
        sys.settrace(stop_at_ensure)  # this thread only
        try:
            with cache.acquire("a", "cpu") as m:
                return torch.equal(m(x), expected)
        finally:
            sys.settrace(None)

    threads, results = _run(use, use)
    _join(threads)
    assert results == {0: True, 1: True}, results
    assert not both_asked.broken
    # Loaded once by one of them; the other waited for that load and used it.
    assert (cache.stats["misses"], cache.stats["hits"], cache.stats["loads"]) == (1, 1, 1)
    cache.close()


def test_wait_timeout_is_honoured_while_another_thread_loads(tmp_path: Path) -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow_factory() -> torch.nn.Module:
        calls.append(1)
        release.wait(JOIN_S)  # a slow load (the test lets it finish)
        return build_tiny_mlp(WIDTH, 4, seed=2)

    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=0.3)
    cache.add("slow", factory=slow_factory)

    def use() -> str:
        with cache.acquire("slow", "cpu") as m:
            return type(m).__name__

    loader, results = _run(use)
    while not calls:  # the loader is inside the factory
        time.sleep(0.005)
    started = time.monotonic()
    waiter, waited = _run(use)
    try:
        _join(waiter, timeout=3.0)  # the waiter gives up after wait_timeout, not after the load
        took = time.monotonic() - started
    finally:
        release.set()
    _join(loader)
    error = waited[0]
    assert isinstance(error, CacheFullError) and type(error).__name__ == "CacheTimeoutError", error
    message = str(error)
    assert "model 'slow'" in message and "0.3 s" in message and "being loaded by ['worker-0']" in message, message
    assert 0.25 <= took < 2.5, took
    assert results == {0: "Sequential"} and len(calls) == 1
    # The waiter left nothing behind: the model is usable and evictable again.
    with cache.acquire("slow", "cpu"):
        pass
    cache.offload("slow", "disk")
    assert cache.tier("slow") == "disk"
    cache.close()


def test_waiting_for_room_times_out_naming_the_holders(tmp_path: Path) -> None:
    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=0.3)
    for i, name in enumerate("abc"):
        cache.add(name, build_tiny_mlp(WIDTH, 4, seed=i))
    cache.offload("c", "disk")

    def use_c() -> None:
        with cache.acquire("c", "cpu"):
            pass

    with cache.acquire("a", "cpu"), cache.acquire("b", "cpu"):  # the main thread keeps the budget full
        threads, results = _run(use_c)
        _join(threads, timeout=3.0)
    error = results[0]
    assert isinstance(error, CacheFullError) and type(error).__name__ == "CacheTimeoutError", error
    message = str(error)
    me = threading.current_thread().name
    assert "model 'c'" in message and "0.3 s" in message, message
    assert f"'a' on cpu: held by ['{me}']" in message and f"'b' on cpu: held by ['{me}']" in message, message
    assert {e.name for e in error.blockers} == {"a", "b"}
    # Once the holders are gone the same request succeeds.
    with cache.acquire("c", "cpu"):
        assert cache.tier("c") == "cpu"
    cache.close()


def test_waiters_on_one_load_share_it_and_the_load_runs_outside_the_lock(tmp_path: Path) -> None:
    """A factory that returns only once another model has been used and two more threads
    wait for its own model: they wait on the loader (parked on the cache's Condition), not
    on a lock it keeps, and nobody loads it twice."""
    calls: list[int] = []
    waiters: list[threading.Thread] = []
    other_used = threading.Event()
    seen: dict[str, bool] = {}

    def factory() -> torch.nn.Module:
        calls.append(1)
        seen["other used during the load"] = other_used.wait(5)
        deadline = time.monotonic() + 5
        while len(waiters) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        seen["waiters parked on the Condition"] = len(waiters) == 2 and all(_wait_parked(t) for t in waiters)
        return build_tiny_mlp(WIDTH, 4, seed=3)

    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=15)
    cache.add("m", factory=factory)
    other = build_tiny_mlp(WIDTH, 4, seed=4)
    cache.add("other", other)

    def use() -> int:
        with cache.acquire("m", "cpu") as m:
            return id(m)

    def use_other() -> bool:
        with cache.acquire("other", "cpu") as o:
            other_used.set()
            return o is other

    loader, results = _run(use)
    while not calls:
        time.sleep(0.005)
    side, side_results = _run(use_other)
    more, more_results = _run(use, use)
    waiters.extend(more)
    _join(loader + side + more, timeout=20)
    assert seen == {"other used during the load": True, "waiters parked on the Condition": True}
    assert side_results == {0: True}
    ids = [results[0], more_results[0], more_results[1]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 1, (results, more_results)
    assert len(calls) == 1 and cache.stats["misses"] == 1
    cache.close()


def test_a_model_just_loaded_is_not_evicted_before_its_waiter_wakes(tmp_path: Path) -> None:
    """The reservation: a prefetch loads 'a' while a thread waits for it; right after the load,
    before that thread wakes, the prefetch thread asks for 'b', which needs the room 'a' has.
    'a' is pinned by its waiter, so 'b' waits; 'a' is loaded once and its waiter gets a hit."""
    x = torch.randn(2, WIDTH)
    a_model = build_tiny_mlp(WIDTH, 4, seed=6)
    expected = a_model(x).detach()
    calls: list[int] = []
    waiter: list[threading.Thread] = []
    seen: dict[str, Any] = {}

    def factory() -> torch.nn.Module:
        calls.append(1)
        deadline = time.monotonic() + 5
        while not waiter and time.monotonic() < deadline:
            time.sleep(0.005)
        seen["waiter parked during the load"] = bool(waiter) and _wait_parked(waiter[0])
        return a_model

    cache = ModelCache(budgets={"cpu": MODEL}, offload_dir=str(tmp_path), wait_timeout=10)  # room for one
    cache.add("a", factory=factory)
    cache.add("b", build_tiny_mlp(WIDTH, 4, seed=7))
    cache.offload("b", "disk")

    def right_after_the_load(future: Any) -> None:  # runs in the prefetch thread, as it finishes
        seen["waiter still parked after the load"] = _parked(waiter[0])
        try:
            with cache.acquire("b", "cpu"):
                seen["b"] = cache.tier("a")
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            seen["b"] = exc

    def use_a() -> bool:
        with cache.acquire("a", "cpu") as m:
            return torch.equal(m(x), expected)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the prefetch thread runs on until it blocks: the waiter wakes after it
    try:
        future = cache.prefetch("a", "cpu")
        future.add_done_callback(right_after_the_load)
        threads, results = _run(use_a)
        waiter.extend(threads)
        _join(threads)
        future.result(timeout=JOIN_S)
        deadline = time.monotonic() + JOIN_S
        while "b" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sys.setswitchinterval(switch)
    assert seen.get("waiter parked during the load") and seen.get("waiter still parked after the load"), seen
    assert results == {0: True}
    assert seen["b"] == "disk"  # 'b' got its room only once the waiter had used 'a'
    assert len(calls) == 1 and (cache.stats["hits"], cache.stats["misses"]) == (1, 2), cache.stats
    cache.close()


def test_a_thread_holding_a_model_elsewhere_is_told_at_once(tmp_path: Path) -> None:
    """Acquiring a model on another device while this thread uses it cannot be served by
    waiting (it would wait for itself): a clear error, at once."""
    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=30)
    cache.add("a", build_tiny_mlp(WIDTH, 4, seed=5))
    started = time.monotonic()
    with cache.acquire("a", "cpu"):
        with pytest.raises(CacheError, match=r"model 'a' is in use on cpu by this thread"):
            with cache.acquire("a", "meta"):
                pass
    assert time.monotonic() - started < 5
    cache.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (two devices)")
def test_many_threads_on_two_devices_never_deadlock(tmp_path: Path) -> None:
    """Threads asking for the same models on the CPU and on the GPU: every acquire ends."""
    models = {name: build_tiny_mlp(WIDTH, 4, seed=i) for i, name in enumerate("abc")}
    x = torch.randn(2, WIDTH)
    expected = {name: m(x).detach() for name, m in models.items()}
    cache = ModelCache(budgets={"cpu": 2 * MODEL, "cuda:0": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=20)
    for name, model in models.items():
        cache.add(name, model)

    def worker(seed: int) -> int:
        import random

        rng, done = random.Random(seed), 0
        for _ in range(20):
            name, device = rng.choice("abc"), rng.choice(["cpu", "cuda:0"])
            with cache.acquire(name, device) as m:
                assert torch.allclose(m(x.to(device)).cpu(), expected[name], atol=1e-5)
            done += 1
        return done

    threads, results = _run(*(lambda s=s: worker(s) for s in range(4)))
    _join(threads, timeout=60)
    assert results == {i: 20 for i in range(4)}, results
    cache.close()
