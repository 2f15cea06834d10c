"""Plugins: find them (entry points, ``module:attr``), validate their options, set them up.

A plugin is any of:

- a class: instantiated with the options, then ``instance.setup(engine)``;
- an object with ``setup(engine, **options)``;
- a module with ``setup(engine, **options)``;
- a function ``fn(engine, **options)``.

A plugin that has ``state_dict()``/``load_state_dict()`` is checkpointed under its name.
Built-ins are found the same way as a user's plugins: through the entry-point group
``hookengine.plugins`` of installed distributions (this package included).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from importlib.metadata import entry_points
from typing import Any

__all__ = ["PluginError", "resolve", "resolve_with_kind", "available", "plugin_name", "validate_options", "closest", "DEFAULT_PLUGINS"]

ENTRY_POINT_GROUP = "hookengine.plugins"

# Entry-point names of the plugins every run uses unless told otherwise (``Engine.run``
# fills in those not in use; a recipe says ``defaults: false`` to use none): the plan,
# the loop, checkpoints, metrics and the progress bar. Names, not imports: core does not
# depend on the plugins, it finds them like any user's plugin.
DEFAULT_PLUGINS: tuple[str, ...] = ("train_sched", "trainer", "checkpoint", "logging", "progress")


class PluginError(ValueError):
    """A plugin could not be found, its options are wrong, or its setup failed."""


def available() -> dict[str, str]:
    """Entry-point names of every installed plugin, mapped to their ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def closest(name: str, candidates: Any) -> str:
    """A ' (did you mean ...?)' hint, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve(reference: Any) -> Any:
    """The plugin object for an entry-point name, a ``module:attr`` or a module path."""
    return resolve_with_kind(reference)[0]


def resolve_with_kind(reference: Any) -> tuple[Any, str | None]:
    """The plugin object and, when ``reference`` is an entry-point name, that name (its kind)."""
    if not isinstance(reference, str):
        return reference, None
    installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if reference in installed:
        try:
            return installed[reference].load(), reference
        except Exception as exc:
            raise PluginError(
                f"plugin {reference!r} (entry point {installed[reference].value}) failed to import: {exc}"
            ) from exc
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            hint = closest(reference, installed)
            raise PluginError(
                f"unknown plugin {reference!r}{hint}: no installed entry point of that name and no "
                f"module {module_name!r}; installed plugins: {sorted(installed)}"
            ) from None
        raise
    if not attr:
        return module, None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = [n for n in dir(target) if not n.startswith("_")]
            raise PluginError(
                f"plugin {reference!r}: {module_name} has no attribute {part!r}{closest(part, names)}"
            ) from None
    return target, None


def plugin_name(plugin: Any) -> str:
    """The default name of a plugin: its ``name`` attribute, else its class/module name."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__.rsplit(".", 1)[-1]
    if inspect.isclass(plugin) or inspect.isfunction(plugin):
        return plugin.__name__
    return type(plugin).__name__


def _signature_target(plugin: Any) -> Any:
    if inspect.isclass(plugin):
        return plugin.__init__
    if isinstance(plugin, types.ModuleType) or hasattr(plugin, "setup"):
        return plugin.setup
    return plugin


def validate_options(plugin: Any, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``options`` against the plugin's signature; errors name ``where.key``.

    Types come from the annotations (through pydantic, so ``"3"`` for an ``int`` is an
    error, not a surprise); unknown keys get the closest valid key suggested.
    """
    target = _signature_target(plugin)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return options
    # The first positional parameter is ``self`` (a class's __init__) or the engine.
    params = [p for p in list(signature.parameters.values())[1:] if p.kind is not p.VAR_POSITIONAL]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind is not p.VAR_KEYWORD}
    for key in options:
        if key not in named and not accepts_any:
            raise PluginError(
                f"{where}.{key}: unknown option{closest(key, named)}; "
                f"{plugin_name(plugin)} accepts {sorted(named) or 'no options'}"
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in options]
    if missing:
        raise PluginError(f"{where}: missing required option(s) {missing} for {plugin_name(plugin)}")
    return _check_types(target, named, options, where)


def _check_types(target: Any, named: dict[str, inspect.Parameter], options: dict[str, Any], where: str) -> dict[str, Any]:
    import typing

    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: accept as given
        return options
    import pydantic

    checked = dict(options)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None or key not in named or hint is typing.Any:
            continue
        try:
            adapter = pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True, strict=False))
        except Exception:
            continue
        try:
            adapter.validate_python(value, strict=_strict_for(value))
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            raise PluginError(
                f"{where}.{key}{loc}: expected {_type_name(hint)}, got {value!r} ({error['msg']})"
            ) from None
    return checked


def _strict_for(value: Any) -> bool:
    # Strings from YAML must not silently become numbers or booleans.
    return isinstance(value, str)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X] reads "X or null", as a recipe author writes it
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + " or null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
