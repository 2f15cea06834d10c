"""Plugins: every form, option checking, entry points through a real dist-info."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

from hookengine import Engine, PluginError
from hookengine.core.plugins import available, resolve
from hookengine.core.points import Point


class Counter:
    """A stateful plugin used by several tests."""

    name = "counter"
    hook_points = [Point("tick", "event", (), "a test clock ticked")]

    def __init__(self, start: int = 0, label: str = "steps") -> None:
        self.count = start
        self.label = label

    def setup(self, engine: Engine) -> None:
        engine.on("tick", self.tick)

    def tick(self, state) -> None:
        self.count += 1

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def test_class_object_module_and_function_plugins() -> None:
    engine = Engine()
    counter = engine.use(Counter, start=5)
    assert isinstance(counter, Counter) and counter.count == 5

    seen = []
    module = types.ModuleType("my_plugin_module")
    module.setup = lambda engine, tag="m": engine.on("tick", lambda state: seen.append(tag))
    engine.use(module, tag="module")

    def function_plugin(engine: Engine, tag: str = "f") -> None:
        engine.on("tick", lambda state: seen.append(tag))

    engine.use(function_plugin, tag="function")

    class WithSetup:
        def setup(self, engine, tag: str = "o"):
            engine.on("tick", lambda state: seen.append(tag))

    engine.use(WithSetup(), tag="object")
    engine.fire("tick")
    assert counter.count == 6
    assert seen == ["module", "function", "object"]
    assert set(engine.plugins) == {"counter", "my_plugin_module", "function_plugin", "WithSetup"}
    plugins_of = {r["plugin"] for r in engine.describe_hooks()}
    assert plugins_of == {"counter", "my_plugin_module", "function_plugin", "WithSetup"}


def test_module_attr_reference_and_duplicate_names() -> None:
    engine = Engine()
    engine.use("tests.core.test_plugins:Counter", start=2)
    with pytest.raises(PluginError, match="already in use"):
        engine.use(Counter)
    second = engine.use(Counter, name="second")
    assert engine.plugins["second"] is second


def test_options_are_checked_with_key_and_closest_match() -> None:
    engine = Engine()
    with pytest.raises(PluginError, match=r"plugins.counter.strat: unknown option \(did you mean 'start'\?\)"):
        engine.use(Counter, strat=3)
    with pytest.raises(PluginError, match=r"plugins.counter.start: expected int, got '3'"):
        engine.use(Counter, start="3")
    assert "counter" not in engine.plugins


def test_unknown_plugin_names_the_reference() -> None:
    with pytest.raises(PluginError, match=r"unknown plugin 'supervisd'.*did you mean 'supervised'"):
        resolve("supervisd")
    with pytest.raises(PluginError, match="has no attribute 'Nope'"):
        resolve("hookengine.training.trainer:Nope")


def test_builtins_are_entry_points_of_the_installed_distribution() -> None:
    installed = available()
    for name in ("trainer", "checkpoint", "logging", "progress", "supervised", "digits"):
        assert name in installed, name
    from hookengine.training.trainer import TrainingLoop

    assert resolve("trainer") is TrainingLoop


def test_a_third_party_distribution_is_discovered_by_entry_point(tmp_path: Path, monkeypatch) -> None:
    """A real dist-info folder on sys.path, as pip would install it."""
    package = tmp_path / "thirdparty_plugin.py"
    package.write_text(
        textwrap.dedent(
            """
            class Shout:
                def __init__(self, word: str = "hi"):
                    self.word = word
                def setup(self, engine):
                    engine.declare("greet", "slot", doc="a greeting")
                    engine.attach("greet", lambda nxt: self.word.upper())
            """
        )
    )
    dist = tmp_path / "thirdparty_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hookengine.plugins]\nshout = thirdparty_plugin:Shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available()["shout"] == "thirdparty_plugin:Shout"
    engine = Engine()
    engine.use("shout", word="hello")
    assert engine.call("greet") == "HELLO"
    sys.modules.pop("thirdparty_plugin", None)


def test_plugin_state_goes_into_engine_state_dict() -> None:
    engine = Engine()
    counter = engine.use(Counter)
    for _ in range(3):
        engine.fire("tick")
    state = engine.state_dict()
    assert state["plugins"]["counter"] == {"count": 3}
    counter.count = 0
    engine.load_state_dict(state)
    assert counter.count == 3
