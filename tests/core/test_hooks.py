"""The hook registry: order, filters, slots, detach, trace, introspection, errors."""

from __future__ import annotations

import pytest

from hookengine import Engine, HookError
from hookengine.core.hooks import Registry
from hookengine.core.state import State


@pytest.fixture
def registry() -> Registry:
    """A registry with the ad-hoc points these tests use declared."""
    registry = Registry(State())
    registry.declare("e", payload=("loss", "batch"))
    registry.declare("x")
    for slot in ("loss", "f", "slot", "s"):
        registry.declare(slot, "slot")
    return registry


def test_listeners_run_by_priority_then_registration(registry: Registry) -> None:
    seen: list[str] = []
    registry.on("e", lambda state: seen.append("a"))
    registry.on("e", lambda state: seen.append("b"), priority=5)
    registry.on("e", lambda state: seen.append("c"))
    registry.on("e", lambda state: seen.append("d"), priority=-1)
    registry.fire("e")
    assert seen == ["b", "a", "c", "d"]


def test_listener_gets_the_payload_it_asks_for(registry: Registry) -> None:
    got: dict = {}
    registry.on("e", lambda state, loss: got.update(loss=loss))
    registry.on("e", lambda state, **kw: got.update(all=kw))
    registry.on("e", lambda: got.update(bare=True))
    registry.fire("e", loss=1.5, batch="b")
    assert got == {"loss": 1.5, "all": {"loss": 1.5, "batch": "b"}, "bare": True}


def test_unfired_event_and_detached_listener_cost_nothing(registry: Registry) -> None:
    seen = []
    handle = registry.on("e", lambda state: seen.append(1))
    registry.fire("nobody-listens")
    registry.fire("e")
    handle.detach()
    handle.detach()  # harmless twice
    registry.fire("e")
    assert seen == [1]
    assert not handle.attached
    assert "e" not in registry._events


def test_every_once_start_stop_when_read_the_clock(registry: Registry) -> None:
    state = registry.state
    seen: dict[str, list[int]] = {k: [] for k in ("every", "once", "once_at", "window", "when")}
    registry.on("step_end", lambda state: seen["every"].append(state.clock.step), every=3)
    registry.on("step_end", lambda state: seen["once"].append(state.clock.step), once=True)
    registry.on("step_end", lambda state: seen["once_at"].append(state.clock.step), once=4)
    registry.on("step_end", lambda state: seen["window"].append(state.clock.step), start=2, stop=5)
    registry.on("step_end", lambda state: seen["when"].append(state.clock.step), when=lambda state: state.clock.step % 2 == 1)
    for step in range(1, 8):
        state.clock.step = step
        registry.fire("step_end")
    assert seen == {
        "every": [3, 6],
        "once": [1],
        "once_at": [4],
        "window": [2, 3, 4],
        "when": [1, 3, 5, 7],
    }


def test_epoch_events_filter_on_epochs(registry: Registry) -> None:
    seen = []
    registry.on("epoch_end", lambda state: seen.append(state.clock.epoch), every=2)
    for epoch in range(1, 6):
        registry.state.clock.epoch = epoch
        registry.state.clock.step = epoch * 7
        registry.fire("epoch_end")
    assert seen == [2, 4]


def test_before_and_after_constraints_by_plugin(registry: Registry) -> None:
    seen: list[str] = []
    registry.on("e", lambda state: seen.append("log"), plugin="logger", after="metrics")
    registry.on("e", lambda state: seen.append("metrics"), plugin="metrics")
    registry.on("e", lambda state: seen.append("early"), plugin="early", before=["metrics"], priority=-10)
    registry.fire("e")
    assert seen == ["early", "metrics", "log"]


def test_cyclic_constraints_are_refused_and_leave_registry_usable(registry: Registry) -> None:
    registry.on("e", lambda state: None, plugin="a", before="b")
    with pytest.raises(HookError, match="cycle"):
        registry.on("e", lambda state: None, plugin="b", before="a")
    registry.fire("e")  # the refused listener was removed again
    assert len(registry.describe("e")) == 1


def test_slot_chain_newest_first_and_delegation(registry: Registry) -> None:
    registry.attach("loss", lambda nxt, x: x + 1)
    registry.attach("loss", lambda nxt, x: 10 * nxt(x))
    registry.attach("loss", lambda nxt, x: nxt(x) - 3)
    assert registry.call("loss", 1) == 10 * (1 + 1) - 3


def test_detaching_the_middle_of_a_chain_keeps_the_rest(registry: Registry) -> None:
    registry.attach("f", lambda nxt, x: [*x, "base"])
    middle = registry.attach("f", lambda nxt, x: nxt([*x, "middle"]))
    registry.attach("f", lambda nxt, x: nxt([*x, "outer"]))
    assert registry.call("f", []) == ["outer", "middle", "base"]
    middle.detach()
    assert registry.call("f", []) == ["outer", "base"]


def test_slot_priority_keeps_an_implementation_outermost(registry: Registry) -> None:
    registry.attach("f", lambda nxt: "guard:" + nxt(), priority=10)
    registry.attach("f", lambda nxt: "base")
    registry.attach("f", lambda nxt: "newer>" + nxt())
    assert registry.call("f") == "guard:newer>base"


def test_calling_an_empty_slot_or_delegating_past_the_base_is_a_clear_error(registry: Registry) -> None:
    with pytest.raises(HookError, match="'nothing' has no implementation"):
        registry.call("nothing")
    registry.attach("f", lambda nxt: nxt())
    with pytest.raises(HookError, match="no implementation below"):
        registry.call("f")


def test_event_and_slot_names_do_not_mix(registry: Registry) -> None:
    registry.on("x", lambda state: None)
    with pytest.raises(HookError, match="is a event"):
        registry.attach("x", lambda nxt: None)
    with pytest.raises(HookError, match="is a slot"):
        registry.on("f", lambda: None)


def test_a_raising_hook_is_named_and_keeps_its_type(registry: Registry) -> None:
    def broken(state):
        raise ValueError("boom")

    registry.on("e", lambda state: None, plugin="fine")
    registry.on("e", broken, plugin="shaky")
    with pytest.raises(ValueError, match="boom") as info:
        registry.fire("e")
    assert any("broken" in n and "shaky" in n and "'e'" in n for n in info.value.__notes__)

    def bad_impl(nxt, x):
        raise KeyError(x)

    registry.attach("slot", lambda nxt, x: x, plugin="base")
    registry.attach("slot", bad_impl, plugin="wrapper")
    registry.attach("slot", lambda nxt, x: nxt(x), plugin="outer")
    with pytest.raises(KeyError) as info:
        registry.call("slot", 1)
    assert any("bad_impl" in n and "wrapper" in n for n in info.value.__notes__)


def test_trace_records_order_and_time_only_while_on(registry: Registry) -> None:
    def first(state):
        pass

    def second(state):
        pass

    registry.on("e", first, plugin="p1")
    registry.on("e", second, plugin="p2")
    registry.attach("s", lambda nxt: 1, plugin="p3")
    with registry.tracing() as records:
        registry.fire("e")
        registry.call("s")
    registry.fire("e")
    assert [(r.point, r.function.rsplit(".", 1)[-1], r.plugin) for r in records] == [
        ("e", "first", "p1"),
        ("e", "second", "p2"),
        ("s", "<lambda>", "p3"),
    ]
    assert all(r.seconds >= 0 for r in records)
    assert len(records) == 3  # nothing recorded after the block


def test_introspection_lists_points_plugins_and_order() -> None:
    engine = Engine()

    class Plugin:
        name = "mine"

        def setup(self, engine):
            engine.on("step_end", self.on_step, every=5)
            engine.attach("compute_loss", self.loss)

        def on_step(self, state):
            pass

        def loss(self, nxt, batch):
            return 0

    engine.attach("compute_loss", lambda nxt, b: 1)
    engine.use(Plugin())
    rows = engine.describe_hooks()
    by_point = {(r["point"], r["position"]): r for r in rows}
    assert by_point[("step_end", 0)]["plugin"] == "mine"
    assert by_point[("step_end", 0)]["filters"] == {"every": 5}
    assert by_point[("compute_loss", 0)]["plugin"] == "mine"  # outermost first
    assert by_point[("compute_loss", 1)]["plugin"] is None
    assert engine.hooks.points() == ["compute_loss", "step_end"]


def test_decorator_forms_return_the_function_with_a_handle() -> None:
    engine = Engine()
    engine.declare("e")
    engine.declare("s", "slot")

    @engine.on("e", priority=1)
    def listener(state):
        listener.calls += 1

    listener.calls = 0

    @engine.attach("s")
    def impl(nxt):
        return 42

    engine.fire("e")
    assert listener.calls == 1 and engine.call("s") == 42
    listener.hook_handle.detach()
    engine.fire("e")
    assert listener.calls == 1


def test_every_must_be_positive(registry: Registry) -> None:
    with pytest.raises(ValueError, match="every="):
        registry.on("e", lambda state: None, every=0)


def test_a_misspelt_point_is_refused_at_attach_time_with_a_hint(registry: Registry) -> None:
    with pytest.raises(HookError, match="no hook point named 'step_ned'.*did you mean 'step_end'"):
        registry.on("step_ned", lambda state: None)
    with pytest.raises(HookError, match="did you mean 'compute_loss'"):
        registry.attach("compute_los", lambda nxt, batch: 0)
    registry.fire("step_ned")  # firing an unknown point stays a cheap no-op


def test_listeners_bind_by_name_not_position(registry: Registry) -> None:
    got: dict = {}
    registry.declare("evaluated", payload=("metrics",))
    registry.on("evaluated", lambda metrics: got.update(first=metrics))  # not the State
    registry.on("evaluated", lambda metrics, state: got.update(second=(metrics, state)))
    registry.on("evaluated", lambda **payload: got.update(third=payload))
    registry.on("evaluated", lambda state, *, metrics, extra=3: got.update(fourth=(metrics, extra)))
    registry.fire("evaluated", metrics={"acc": 1.0})
    assert got == {
        "first": {"acc": 1.0},
        "second": ({"acc": 1.0}, registry.state),
        "third": {"metrics": {"acc": 1.0}},
        "fourth": ({"acc": 1.0}, 3),
    }


def test_asking_for_a_payload_the_event_lacks_fails_at_attach_time(registry: Registry) -> None:
    with pytest.raises(HookError, match="asks for 'los'.*did you mean 'loss'.*provides: state, loss"):
        registry.on("step_end", lambda state, los: None)
    with pytest.raises(HookError, match="asks for 's'"):
        registry.on("step_end", lambda s: None)
    assert not registry.has("step_end")


def test_a_plugin_declares_its_own_points_and_they_are_checked() -> None:
    from hookengine.core.points import Point

    seen = []

    class Sampler:
        hook_points = [Point("sample_drawn", "event", ("image",), "a sample was drawn")]

        def setup(self, engine):
            engine.on("step_end", lambda: engine.fire("sample_drawn", image="img"))

    engine = Engine()
    engine.use(Sampler())
    engine.on("sample_drawn", lambda state: seen.append(state))
    engine.on("sample_drawn", lambda image: seen.append(image))
    engine.fire("step_end", loss=0.0)
    assert seen == [engine.state, "img"]
    assert engine.hooks.declared["sample_drawn"].owner == "Sampler"
    with pytest.raises(HookError, match="already declared"):
        engine.declare("sample_drawn", payload=("other",))


def test_bands_name_priorities_and_before_after_match_entry_point_names(registry: Registry) -> None:
    seen: list[str] = []
    registry.on("e", lambda: seen.append("default"))
    registry.on("e", lambda: seen.append("last"), priority="last")
    registry.on("e", lambda: seen.append("first"), priority="first")
    registry.current_plugin, registry.current_kind = "my_lora", "lora_sched"
    registry.on("e", lambda: seen.append("lora"), priority="late")
    registry.current_plugin = registry.current_kind = None
    registry.on("e", lambda: seen.append("needs lora"), priority="first", after="lora_sched")
    registry.fire("e")
    assert seen == ["first", "default", "lora", "needs lora", "last"]
    with pytest.raises(ValueError, match="did you mean 'late'"):
        registry.on("e", lambda: None, priority="lat")
