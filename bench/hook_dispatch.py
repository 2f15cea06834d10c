"""µs per fired event with 0, 1, 10 and 50 listeners: hookengine vs a plain loop vs pluggy.

Run: python bench/hook_dispatch.py   (prints a table, then one JSON line)
Targets: <= 0.3 µs with 1 listener, <= 1 µs with 10, next to nothing with none.
"""

from __future__ import annotations

import gc
import json
import statistics
import timeit

from hookengine import Engine

COUNTS = (0, 1, 10, 50)
NUMBER = 20000
REPEAT = 15


def listener(state, loss=None):
    """The common shape: the state and the payload names it needs (bound at attach time)."""
    return None


def hookengine_case(n: int):
    engine = Engine()
    for _ in range(n):
        engine.on("step_end", listener)
    fire = engine.fire
    return lambda: fire("step_end", loss=1.0)


def hookengine_bare_case(n: int):
    """An event without payload (setup, epoch_start, before_optimizer_step...)."""
    engine = Engine()
    for _ in range(n):
        engine.on("before_optimizer_step", listener)
    fire = engine.fire
    return lambda: fire("before_optimizer_step")


def plain_case(n: int):
    listeners = [listener] * n
    state = object()

    def fire():
        for fn in listeners:
            fn(state, loss=1.0)

    return fire


def pluggy_case(n: int):
    try:
        import pluggy
    except ImportError:
        return None
    spec = pluggy.HookspecMarker("bench")
    impl = pluggy.HookimplMarker("bench")

    class Spec:
        @spec
        def step_end(self, state, loss):
            pass

    pm = pluggy.PluginManager("bench")
    pm.add_hookspecs(Spec)
    for i in range(n):
        plugin = type(f"P{i}", (), {"step_end": impl(lambda self, state, loss: None)})()
        pm.register(plugin, name=f"p{i}")
    hook = pm.hook.step_end
    state = object()
    return lambda: hook(state=state, loss=1.0)


def measure(fn) -> float:
    """Median µs per call over REPEAT runs of NUMBER calls."""
    times = timeit.repeat(fn, number=NUMBER, repeat=REPEAT)
    return statistics.median(times) / NUMBER * 1e6


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    gc.collect()
    gc.freeze()
    for n in COUNTS:
        row = {}
        cases = (
            ("hookengine", hookengine_case),
            ("hookengine_no_payload", hookengine_bare_case),
            ("plain_loop", plain_case),
            ("pluggy", pluggy_case),
        )
        for name, make in cases:
            fn = make(n)
            if fn is not None:
                row[name] = round(measure(fn), 3)
        results[str(n)] = row
        print(f"{n:3d} listeners: " + "  ".join(f"{k} {v:.3f} µs" for k, v in row.items()))
    figures = {
        "us_per_event": results,
        "targets": {"1": 0.3, "10": 1.0},
        "meets_targets": results["1"]["hookengine"] <= 0.3 and results["10"]["hookengine"] <= 1.0,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
