"""The Engine: a hook registry, a State and a runtime. The loop itself is a plugin.

Only ``on``, ``fire``, ``attach``, ``call`` and ``use`` are the hook API; everything a
built-in plugin does goes through them and through :class:`State`, so a user's plugin
can do the same.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Callable, Mapping

from .hooks import Registry
from .plugins import DEFAULT_PLUGINS, PluginError, plugin_name, resolve_with_kind, validate_options
from .points import Point
from .runtime import Runtime
from .state import State

__all__ = ["Engine"]


class Engine:
    """Hooks + state + runtime.

    >>> engine = Engine(seed=0)
    >>> handle = engine.on("step_end", lambda state: None, every=10)
    >>> engine.attach("compute_loss", lambda next_impl, batch: 0.0) is not None
    True
    """

    def __init__(
        self,
        seed: int | None = 0,
        run_dir: str | Path | None = None,
        mixed_precision: str = "no",
        cpu: bool = False,
        timeout_s: float = 300.0,
        defaults: bool = True,
        **accelerator_options: Any,
    ) -> None:
        self.state = State(run_dir=str(run_dir) if run_dir is not None else None)
        self.hooks = Registry(self.state)
        self.runtime = Runtime(
            seed=seed, mixed_precision=mixed_precision, cpu=cpu, timeout_s=timeout_s, **accelerator_options
        )
        self.state.unwrap = self.runtime.unwrap
        self.plugins: dict[str, Any] = {}
        # run() fills in the default plugins that are not in use yet (by name).
        self.defaults = defaults
        # Bound once so the hot path is a single call (no extra frame per event).
        self.fire = self.hooks.fire
        self.call = self.hooks.call

    # ------------------------------------------------------------- hook API
    def on(self, point: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Listen to event ``point``: ``engine.on(name, fn)`` or ``@engine.on(name)``.

        The listener takes, by name, any of ``state`` and the event's payload (``loss``
        for ``step_end``...), or ``**payload`` for all of it; asking for a name the event
        does not provide, or listening to an undeclared event, fails here, not later.

        Args:
            point: a declared event (``hookengine hooks`` lists them; ``declare`` adds one).
            fn: the listener; omit it to use ``on`` as a decorator.
            priority: higher runs earlier (default 0); a number or a band name from
                :data:`hookengine.core.points.BANDS` (``"first"``, ``"last"``...).
            every: run only when the clock is a multiple of ``every`` (optimizer steps;
                epochs for ``epoch_*`` events, or as ``unit=`` says).
            once: ``True``: only the first time; an int: only at that step.
            when: run only when ``when(state)`` is true.
            start, stop: run only for ``start <= step < stop``.
            before, after: plugin names (instance or entry-point names) this listener
                must run before / after, whatever their priorities.
            unit: ``"step"`` or ``"epoch"``: what the filters count.
            plugin: record the listener as coming from this plugin (default: the plugin
                being set up).

        Returns:
            A :class:`Handle` whose ``detach()`` removes the listener (the decorator form
            returns the function, with the handle as ``fn.hook_handle``).

        >>> engine = Engine()
        >>> seen = []
        >>> handle = engine.on("step_end", lambda state, loss: seen.append(loss), every=2)
        >>> engine.state.clock.step = 2; engine.fire("step_end", loss=0.5); seen
        [0.5]
        """
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                f.hook_handle = self.hooks.on(point, f, **options)  # type: ignore[attr-defined]
                return f

            return decorator
        return self.hooks.on(point, fn, **self._owned(fn, options))

    def attach(self, point: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Implement slot ``point`` with ``fn(next_impl, *args, **kwargs)``; decorator form too.

        The newest implementation runs when the slot is called and may delegate to the one
        it replaced through ``next_impl`` (a wrapping chain, like middleware).

        Args:
            point: a declared slot (``compute_loss``, ``build_optimizer``...).
            fn: the implementation; omit it to use ``attach`` as a decorator.
            priority: a higher priority stays outermost whatever the attach order (a number
                or a band name); built-in base implementations sit at -1000.
            plugin: record the implementation as coming from this plugin.

        >>> engine = Engine()
        >>> _ = engine.attach("compute_loss", lambda next_impl, batch: 2.0)
        >>> _ = engine.attach("compute_loss", lambda next_impl, batch: 0.5 * next_impl(batch))
        >>> engine.call("compute_loss", None)
        1.0
        """
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                f.hook_handle = self.hooks.attach(point, f, **options)  # type: ignore[attr-defined]
                return f

            return decorator
        return self.hooks.attach(point, fn, **self._owned(fn, options))

    def _owned(self, fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
        """Attribute a plugin's method attached after its setup (at run time) to that plugin."""
        if "plugin" not in options and self.hooks.current_plugin is None:
            owner = getattr(fn, "__self__", None)
            for name, plugin in self.plugins.items():
                if plugin is owner:
                    return {**options, "plugin": name}
        return options

    def declare(
        self,
        name: str,
        kind: str = "event",
        payload: tuple[str, ...] | list[str] = (),
        doc: str = "",
        unit: str = "step",
    ) -> Point:
        """Declare a hook point of your own (an event your plugin fires, or a slot it calls).

        >>> engine = Engine()
        >>> _ = engine.declare("sample_ready", payload=("image",), doc="a sample was drawn")
        >>> _ = engine.on("sample_ready", lambda image: None)
        """
        return self.hooks.declare(name, kind, payload, doc, unit=unit)

    def has(self, point: str) -> bool:
        """Whether anything listens to / implements ``point``."""
        return self.hooks.has(point)

    @property
    def plugin_names(self) -> list[str]:
        """The names of the plugins in use, in the order they were used."""
        return list(self.plugins)

    @property
    def current_plugin(self) -> str | None:
        """The name of the plugin whose setup is running (``None`` outside ``use``)."""
        return self.hooks.current_plugin

    def fire(self, point: str, **payload: Any) -> None:  # replaced per instance in __init__
        """Run every listener of an event."""
        self.hooks.fire(point, **payload)

    def call(self, point: str, *args: Any, **kwargs: Any) -> Any:  # replaced per instance
        """Call a slot's outermost implementation."""
        return self.hooks.call(point, *args, **kwargs)

    def hook_module(self, pattern: str, fn: Callable[..., Any], **options: Any) -> Any:
        """Hook the forward/backward of the submodules of named models that match ``pattern``.

        ``pattern`` is ``MODEL.PATH`` with ``*`` for one name level (``unet.down_blocks.*.attentions.*``).
        Options: ``kind`` (``forward``, ``forward_pre``, ``backward``). Returns a detachable handle;
        the hooks are listed by ``describe_hooks`` and follow the models when they are re-wrapped
        or moved. See :mod:`hookengine.core.module_hooks`.
        """
        return self.module_hooks.add(pattern, fn, plugin=self.hooks.current_plugin, **options)

    @property
    def module_hooks(self) -> Any:
        """The registry of hooks on the models' own submodules (created on first use)."""
        registry = self.__dict__.get("_module_hooks")
        if registry is None:
            from .module_hooks import ModuleHooks

            registry = self.__dict__["_module_hooks"] = ModuleHooks(self.state)
        return registry

    def describe_hooks(self) -> list[dict[str, Any]]:
        """Every hook point, what is attached, from which plugin, in which order."""
        rows = self.hooks.describe()
        if "_module_hooks" in self.__dict__:
            rows += self._module_hooks.describe()
        return rows

    # --------------------------------------------------------------- plugins
    def use(self, plugin: Any, name: str | None = None, **options: Any) -> Any:
        """Set up a plugin: an object, class, module, function or reference string.

        Args:
            plugin: an entry-point name (``"lr_sched"``), a ``module:attr`` reference, or
                the plugin itself (see :mod:`hookengine.core.plugins` for the shapes).
            name: the name it is used under (default: its ``name`` attribute or class
                name); checkpoints, ``before=``/``after=`` and phases refer to it.
            options: its options, checked against its typed signature first.

        Before its setup runs, the plugin's ``hook_points`` are declared and an object
        plugin gets ``plugin_name`` set to its name; hooks attached during setup are
        recorded as coming from it. Returns the plugin instance.
        """
        reference = plugin
        # A string names code; what it resolves to must be a plugin, checked before any call.
        where = f"plugins.{name}.use" if name else "use"
        plugin, kind = resolve_with_kind(plugin, "plugin", where)
        name = name or plugin_name(plugin)
        if name in self.plugins:
            raise PluginError(f"a plugin named {name!r} is already in use; pass name= to use another")
        where = f"plugins.{name}"
        validate_options(plugin, options, where)
        kind = kind or plugin_name(plugin)
        for point in getattr(plugin, "hook_points", ()):
            self.hooks.declare(point.name, point.kind, point.payload, point.doc, owner=name, unit=point.unit)
        previous = self.hooks.current_plugin, self.hooks.current_kind
        self.hooks.current_plugin, self.hooks.current_kind = name, kind
        try:
            if isinstance(plugin, type):
                instance = plugin(**options)
                setup = getattr(instance, "setup", None)
                if setup is None:
                    raise PluginError(f"plugin {name!r} ({reference!r}) has no setup(engine) method")
                instance.plugin_name = name
                setup(self)
            elif hasattr(plugin, "setup"):
                instance = plugin
                if not isinstance(plugin, types.ModuleType):
                    plugin.plugin_name = name
                plugin.setup(self, **options)
            elif callable(plugin):
                result = plugin(self, **options)
                instance = result if result is not None else plugin
            else:
                raise PluginError(f"{reference!r} is not a plugin: no setup(engine) and not callable")
        finally:
            self.hooks.current_plugin, self.hooks.current_kind = previous
        self.plugins[name] = instance
        return instance

    def use_defaults(self, options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Use each default plugin (plan, loop, checkpoints, metrics, progress bar) that is
        not in use yet under its name; ``options`` maps a default's name to its options."""
        options = options or {}
        for name in DEFAULT_PLUGINS:
            if name not in self.plugins:
                self.use(name, name=name, **dict(options.get(name, {})))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Clock, metrics, models, optimizers, RNG and every stateful plugin."""
        state = self.state.state_dict()
        state["plugins"] = {
            name: p.state_dict() for name, p in self.plugins.items() if callable(getattr(p, "state_dict", None))
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        saved = state.get("plugins", {})
        for name, plugin in self.plugins.items():
            if callable(getattr(plugin, "load_state_dict", None)) and name in saved:
                plugin.load_state_dict(saved[name])

    # ------------------------------------------------------------------- run
    def run(self, recipe: Any = None, overrides: list[str] | None = None) -> Any:
        """Run a recipe (path, mapping or None for the attached plugins only).

        The loop is the slot ``run``; with a recipe, its plugins are used first. Default
        plugins not in use yet are used too, unless ``Engine(defaults=False)``.
        """
        if recipe is not None or overrides:
            # The app layer, imported only when asked for (core never imports it at import time).
            from ..recipe import apply_recipe, load_recipe

            apply_recipe(self, load_recipe(recipe, overrides or []))
        if self.defaults:
            self.use_defaults()
        return self.call("run")

    def __repr__(self) -> str:
        return f"<Engine plugins={list(self.plugins)} step={self.state.clock.step}>"
