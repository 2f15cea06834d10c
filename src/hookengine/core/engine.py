"""The Engine: a hook registry, a State and a runtime. The loop itself is a plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .hooks import Handle, Registry
from .plugins import PluginError, plugin_name, resolve, validate_options
from .runtime import Runtime
from .state import State

__all__ = ["Engine", "DEFAULT_PLUGINS"]

# The prepared plugins an engine uses unless told otherwise; each is an ordinary
# entry point, replaceable from a recipe (``defaults: false``) or by attaching over it.
DEFAULT_PLUGINS: dict[str, str] = {
    "trainer": "hookengine.training.trainer:TrainingLoop",
    "checkpoint": "hookengine.training.checkpoint:Checkpointing",
    "logging": "hookengine.training.logging:MetricsLogger",
    "progress": "hookengine.training.progress:ProgressBar",
}


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
        **accelerator_options: Any,
    ) -> None:
        self.state = State(run_dir=str(run_dir) if run_dir is not None else None)
        self.hooks = Registry(self.state)
        self.runtime = Runtime(
            seed=seed, mixed_precision=mixed_precision, cpu=cpu, timeout_s=timeout_s, **accelerator_options
        )
        self.state.unwrap = self.runtime.unwrap
        self.plugins: dict[str, Any] = {}
        # Bound once so the hot path is a single call (no extra frame per event).
        self.fire = self.hooks.fire
        self.call = self.hooks.call

    # ------------------------------------------------------------- hook API
    def on(self, point: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Listen to an event; usable as ``engine.on(name, fn)`` or ``@engine.on(name)``.

        Options: ``priority``, ``every``, ``once``, ``when``, ``start``, ``stop``,
        ``before``, ``after``, ``unit``, ``plugin``. Returns a :class:`Handle`
        (the decorator form returns the function and keeps the handle on it).
        """
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                f.hook_handle = self.hooks.on(point, f, **options)  # type: ignore[attr-defined]
                return f

            return decorator
        return self.hooks.on(point, fn, **options)

    def attach(self, point: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Implement a slot: ``fn(next_impl, *args, **kwargs)``; decorator form too."""
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                f.hook_handle = self.hooks.attach(point, f, **options)  # type: ignore[attr-defined]
                return f

            return decorator
        return self.hooks.attach(point, fn, **options)

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
        """Set up a plugin (object, class, module, function or reference string).

        Returns the plugin instance. Hooks attached during its setup are recorded as
        coming from ``name``. Options are checked against its signature first.
        """
        reference = plugin
        plugin = resolve(plugin)
        name = name or plugin_name(plugin)
        if name in self.plugins:
            raise PluginError(f"a plugin named {name!r} is already in use; pass name= to use another")
        where = f"plugins.{name}"
        validate_options(plugin, options, where)
        previous = self.hooks.current_plugin
        self.hooks.current_plugin = name
        try:
            if isinstance(plugin, type):
                instance = plugin(**options)
                setup = getattr(instance, "setup", None)
                if setup is None:
                    raise PluginError(f"plugin {name!r} ({reference!r}) has no setup(engine) method")
                setup(self)
            elif hasattr(plugin, "setup"):
                instance = plugin
                plugin.setup(self, **options)
            elif callable(plugin):
                result = plugin(self, **options)
                instance = result if result is not None else plugin
            else:
                raise PluginError(f"{reference!r} is not a plugin: no setup(engine) and not callable")
        finally:
            self.hooks.current_plugin = previous
        self.plugins[name] = instance
        return instance

    def use_defaults(self, options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Use the default plugins (loop, checkpointing, metrics, progress bar)."""
        options = options or {}
        for name, reference in DEFAULT_PLUGINS.items():
            if name not in self.plugins:
                self.use(reference, name=name, **dict(options.get(name, {})))

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

        The loop is the slot ``run``; with a recipe, its plugins are used first.
        """
        if recipe is not None or overrides:
            from ..recipe import apply_recipe, load_recipe

            apply_recipe(self, load_recipe(recipe, overrides or []))
        if not self.hooks.has("run"):
            self.use_defaults()
        return self.call("run")

    def __repr__(self) -> str:
        return f"<Engine plugins={list(self.plugins)} step={self.state.clock.step}>"
