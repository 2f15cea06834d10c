"""model_cache: budgets, LRU, disk round trips, prefetch, threads, partial loads, errors."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from hookengine import Engine
from hookengine.models.cache import CacheError, CacheFullError, ModelCache, parse_bytes
from hookengine.testing import build_tiny_causal_lm, build_tiny_mlp

WIDTH = 32
LAYER = (WIDTH * WIDTH + WIDTH) * 4  # bytes of one Linear(32, 32) in float32
MODEL = 4 * LAYER  # build_tiny_mlp(WIDTH, 4)


def _cpu_bytes(models) -> int:
    """Bytes really held on the CPU by the models' tensors (empty placeholders count 0)."""
    seen, total = set(), 0
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen and t.device.type == "cpu":
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snapshot) -> bool:
    state = model.state_dict()
    return set(state) == set(snapshot) and all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.fixture
def three(tmp_path: Path):
    models = {name: build_tiny_mlp(WIDTH, 4, seed=i) for i, name in enumerate("abc")}
    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path / "offload"))
    for name, model in models.items():
        cache.add(name, model)
    yield cache, models
    cache.close()


def test_parse_bytes_and_auto_budget() -> None:
    assert parse_bytes(10) == 10 and parse_bytes("2KB") == 2000 and parse_bytes("1.5GiB") == int(1.5 * 1024**3)
    with pytest.raises(CacheError, match="size in bytes"):
        parse_bytes("lots")
    cache = ModelCache(budgets={"cpu": "auto"}, reserve="1MB")
    assert 0 < cache.budget("cpu") < 10**15


def test_budget_never_exceeded_at_any_event(three) -> None:
    cache, models = three
    budget = cache.budget("cpu")
    seen: list[tuple[str, int, int]] = []
    cache.subscribe(lambda event, **p: seen.append((event, cache.resident_bytes("cpu"), _cpu_bytes(models.values()))))
    rng = random.Random(0)
    x = torch.randn(2, WIDTH)
    for _ in range(30):
        name = rng.choice("abc")
        with cache.acquire(name, "cpu") as model:
            assert _cpu_bytes([model]) == MODEL
            model(x)
            assert cache.resident_bytes("cpu") <= budget and _cpu_bytes(models.values()) <= budget
    assert len(seen) > 10
    assert all(counted <= budget and real <= budget for _, counted, real in seen), seen
    assert {"loaded", "evicted"} <= {event for event, _, _ in seen}
    stats = cache.stats
    assert stats["hits"] + stats["misses"] == 30 and stats["bytes_moved"] > 0 and stats["seconds"] > 0


def test_lru_order_decides_who_is_evicted(three) -> None:
    cache, _ = three
    evicted: list[str] = []
    cache.subscribe(lambda event, name, **p: evicted.append(name) if event == "evicted" else None)
    for name in "ab":
        with cache.acquire(name):
            pass
    with cache.acquire("a"):
        pass
    assert cache.lru_order("cpu") == ["b", "a"]
    with cache.acquire("c"):
        pass
    assert evicted[-1] == "b"  # least recently used, not the oldest added
    assert cache.tier("b") == "disk" and cache.tier("a") == "cpu" and cache.tier("c") == "cpu"


def test_a_model_in_use_is_never_evicted(three) -> None:
    cache, _ = three
    with cache.acquire("a") as a, cache.acquire("b"):
        with pytest.raises(CacheFullError, match=r"in use.*'a', 'b'"):
            with cache.acquire("c"):
                pass  # same thread holds both: waiting cannot help, so it fails at once
        assert cache.tier("a") == "cpu" and _cpu_bytes([a]) == MODEL


def test_disk_round_trip_is_bitwise_equal_and_keeps_identity_and_ties(tmp_path: Path) -> None:
    lm, _ = build_tiny_causal_lm(seed=3)
    lm.transformer.h[0].attn.register_buffer("probe", torch.arange(5.0))
    before = _snapshot(lm)
    params = list(lm.parameters())
    assert lm.lm_head.weight is lm.transformer.wte.weight
    cache = ModelCache(budgets={"cpu": 10**9}, offload_dir=str(tmp_path))
    cache.add("lm", lm)
    cache.offload("lm", "disk")
    assert cache.tier("lm") == "disk" and _cpu_bytes([lm]) == 0
    assert (tmp_path / "lm.safetensors").stat().st_size > 0
    with cache.acquire("lm") as model:
        assert model is lm and _same(lm, before)
        assert list(lm.parameters())[0] is params[0]
        assert lm.lm_head.weight is lm.transformer.wte.weight
    cache.close()


def test_frozen_models_write_their_disk_copy_once(tmp_path: Path) -> None:
    cache = ModelCache(budgets={"cpu": MODEL}, offload_dir=str(tmp_path))
    cache.add("a", build_tiny_mlp(WIDTH, 4, seed=0), frozen=True)
    cache.add("b", build_tiny_mlp(WIDTH, 4, seed=1), frozen=False)
    path = tmp_path / "a.safetensors"
    stamps = []
    for name in "abab":
        with cache.acquire(name):
            pass
        if path.exists():
            stamps.append(path.stat().st_mtime_ns)
    assert len(set(stamps)) == 1


def test_prefetch_moves_the_next_model_in_another_thread(three) -> None:
    cache, models = three
    cache.offload("b", "disk")
    threads: dict[str, str] = {}
    cache.subscribe(lambda event, name, **p: threads.setdefault(name, threading.current_thread().name) if event == "loaded" else None)
    with cache.acquire("a") as a:
        future = cache.prefetch("b")
        a(torch.randn(1, WIDTH))  # the current model works meanwhile
        assert future.result(timeout=30) is models["b"]
    assert threads["b"].startswith("hookengine-prefetch") and threads["b"] != threading.current_thread().name
    hits = cache.stats["hits"]
    with cache.acquire("b"):
        pass
    assert cache.stats["hits"] == hits + 1


@pytest.mark.threads
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_acquire_from_several_threads_is_safe(tmp_path: Path, round_: int) -> None:
    """Four threads, 25 acquires each over four models with room for two, all started at once:
    every thread ends, every acquire is served and counted, outputs and weights stay exact,
    the budget holds, and nothing stays held, pinned or reserved afterwards."""
    models = {name: build_tiny_mlp(WIDTH, 4, seed=i) for i, name in enumerate("abcd")}
    before = {name: _snapshot(m) for name, m in models.items()}
    x = torch.randn(2, WIDTH)
    expected = {name: m(x).detach() for name, m in models.items()}
    cache = ModelCache(budgets={"cpu": 2 * MODEL}, offload_dir=str(tmp_path), wait_timeout=30)
    for name, model in models.items():
        cache.add(name, model)
    budget = cache.budget("cpu")
    over: list[int] = []
    cache.subscribe(lambda event, **p: over.append(cache.resident_bytes("cpu")) if cache.resident_bytes("cpu") > budget else None)
    errors: list[BaseException] = []
    served = [0] * 4
    start = threading.Barrier(4, timeout=10)

    def worker(i: int) -> None:
        rng = random.Random(100 * round_ + i)
        try:
            start.wait()  # all four ask at once: the most contention
            for _ in range(25):
                name = rng.choice("abcd")
                with cache.acquire(name) as model:
                    assert torch.equal(model(x), expected[name])
                served[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # one limit for all: a deadlock fails in a minute, never hangs
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "threads stuck after 60 s (deadlock)"
    assert not errors, errors
    assert served == [25] * 4
    assert not over
    stats = cache.stats
    assert stats["hits"] + stats["misses"] == 100 and stats["loads"] <= stats["misses"]
    for name in "abcd":  # raises if any model were still held or pinned
        cache.offload(name, "disk")
    assert cache.resident_bytes("cpu") == 0  # every reservation was given back
    for name in "abcd":
        with cache.acquire(name) as model:
            assert _same(model, before[name])
    cache.close()


def test_model_larger_than_budget_loads_partially(tmp_path: Path) -> None:
    big = build_tiny_mlp(WIDTH, 8, seed=5)  # 8 layers, budget for 3
    x = torch.randn(2, WIDTH)
    expected = big(x).detach()
    before = _snapshot(big)
    cache = ModelCache(budgets={"cpu": 3 * LAYER}, offload_dir=str(tmp_path))
    events: list[tuple[str, int]] = []
    cache.subscribe(lambda event, **p: events.append((event, cache.resident_bytes("cpu"))))
    cache.add("big", big)
    with cache.acquire("big") as model:
        assert torch.equal(model(x), expected)
        assert _cpu_bytes([model]) <= 3 * LAYER - LAYER  # room for the module moved in per forward
        assert cache.resident_bytes("cpu") <= 3 * LAYER
    assert "partial" in [e for e, _ in events]
    assert all(b <= 3 * LAYER for _, b in events)
    cache.offload("big", "disk")
    assert cache.tier("big") == "disk" and _cpu_bytes([big]) == 0
    roomy = ModelCache(budgets={"cpu": 10 * LAYER}, offload_dir=str(tmp_path / "roomy"))
    roomy.add("big", cache.remove("big"))
    with roomy.acquire("big") as model:
        assert _same(model, before) and torch.equal(model(x), expected)


def test_budget_too_small_for_one_module_is_a_clear_error(three) -> None:
    cache, _ = three
    tiny = ModelCache(budgets={"cpu": LAYER // 2})
    tiny.add("mlp", build_tiny_mlp(WIDTH, 2, seed=4))
    with pytest.raises(CacheFullError, match=r"budget too small for model 'mlp'.*largest module '0'"):
        with tiny.acquire("mlp"):
            pass
    # Nothing is lost: the model comes back whole, and other caches are untouched.
    assert _same(tiny.remove("mlp"), _snapshot(build_tiny_mlp(WIDTH, 2, seed=4)))
    with cache.acquire("a") as a:
        assert _same(a, _snapshot(build_tiny_mlp(WIDTH, 4, seed=0)))


def test_factory_loads_lazily_and_unload_drops_weights(tmp_path: Path) -> None:
    calls: list[int] = []

    def make():
        calls.append(1)
        return build_tiny_mlp(WIDTH, 2, seed=9)

    cache = ModelCache(budgets={"cpu": MODEL}, offload_dir=str(tmp_path))
    cache.add("lazy", factory=make)
    assert cache.tier("lazy") == "unloaded" and not calls
    with cache.acquire("lazy") as model:
        reference = _snapshot(model)
    cache.unload("lazy")
    assert cache.tier("lazy") == "unloaded"
    with cache.acquire("lazy") as model:
        assert _same(model, reference)
    assert len(calls) == 2
    with pytest.raises(CacheError, match="no model named 'nope'"):
        with cache.acquire("nope"):
            pass


def test_pipeline_as_one_cached_model(tiny_sd: Path, tmp_path: Path) -> None:
    from hookengine.models.loader import load_model

    pipe = load_model(str(tiny_sd))
    before = {name: _snapshot(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    cache = ModelCache(budgets={"cpu": 10**9}, offload_dir=str(tmp_path))
    cache.add("sd", pipe)
    cache.offload("sd", "disk")
    assert _cpu_bytes([pipe.unet, pipe.vae, pipe.text_encoder]) == 0
    with cache.acquire("sd") as model:
        assert all(_same(getattr(model, name), snap) for name, snap in before.items())


def test_engine_plugin_with_loader_fires_events_and_serves_slots(tiny_net: Path, tmp_path: Path) -> None:
    engine = Engine(seed=0)
    spec = {"source": str(tiny_net), "cls": "hookengine.testing.tiny_models:TinyNet"}
    engine.use("model_loader", models={"teacher": spec, "vae": spec, "student": spec})
    net_bytes = sum(p.numel() * 4 for p in engine.state.models["teacher"].parameters())
    cache = engine.use("model_cache", budgets={"cpu": net_bytes}, offload_dir=str(tmp_path), models=["teacher", "vae"])
    fired: list[tuple[str, str]] = []
    engine.on("model_cache_evicted", lambda state, name: fired.append(("evicted", name)))
    engine.on("model_cache_loaded", lambda state, name: fired.append(("loaded", name)))
    assert sorted(cache.names()) == ["teacher", "vae"]
    with engine.call("acquire_model", "teacher") as teacher:
        assert teacher is engine.state.models["teacher"]
    with engine.call("acquire_model", "vae"):
        pass
    assert ("evicted", "teacher") in fired and ("loaded", "vae") in fired
    assert engine.call("prefetch_model", "teacher").result(timeout=30) is engine.state.models["teacher"]
