"""Plugins: find them (entry points, ``module:attr``), validate their options, set them up.

A plugin is any of:

- a class: instantiated with the options, then ``instance.setup(engine)``;
- an object with ``setup(engine, **options)``;
- a module with ``setup(engine, **options)``;
- a function ``fn(engine, **options)``.

A plugin that has ``state_dict()``/``load_state_dict()`` is checkpointed under its name.
Built-ins are found the same way as a user's plugins: through the entry-point group
``hookengine.plugins`` of installed distributions (this package included).

Recipes are data. A reference string names code: importing its module runs that module,
by design (an entry point or a ``module:attr`` is code the user chose to install or
write). What the reference resolves to must then be what the key asks for (``kind``: a
plugin for ``use:``, a model class or marked factory for ``model:``...); that is checked
before anything is called, so ``use: subprocess:Popen`` or ``model: os:system`` is refused
instead of run. Functions are marked usable for a kind with :func:`recipe_callable`
(:func:`model_factory` for models).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

__all__ = [
    "PluginError",
    "MissingModuleError",
    "resolve",
    "resolve_with_kind",
    "check_reference",
    "recipe_callable",
    "model_factory",
    "REFERENCE_KINDS",
    "available",
    "plugin_name",
    "validate_options",
    "closest",
    "short",
    "DEFAULT_PLUGINS",
]

ENTRY_POINT_GROUP = "hookengine.plugins"

# Entry-point names of the plugins every run uses unless told otherwise (``Engine.run``
# fills in those not in use; a recipe says ``defaults: false`` to use none): the plan,
# the loop, checkpoints, metrics and the progress bar. Names, not imports: core does not
# depend on the plugins, it finds them like any user's plugin.
DEFAULT_PLUGINS: tuple[str, ...] = ("train_sched", "trainer", "checkpoint", "logging", "progress")


class PluginError(ValueError):
    """A plugin could not be found, its options are wrong, or its setup failed."""


class MissingModuleError(PluginError):
    """The module of a ``module:attr`` reference is not importable (``module``, ``reference``, ``where``)."""

    def __init__(self, message: str, module: str, reference: str, where: str) -> None:
        super().__init__(message)
        self.module, self.reference, self.where = module, reference, where


def available() -> dict[str, str]:
    """Entry-point names of every installed plugin, mapped to their ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def closest(name: str, candidates: Any) -> str:
    """A ' (did you mean ...?)' hint, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never print huge values."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...<{len(text)} chars>"


def resolve(reference: Any, kind: str = "any", where: str = "") -> Any:
    """The object for an entry-point name, a ``module:attr`` or a module path.

    Args:
        reference: the string (an object is returned as it is: Python code is trusted).
        kind: what the key asks for, one of :data:`REFERENCE_KINDS`; checked before the
            result is returned, so nothing is called unless it is of that kind.
        where: the key, for the error message (``plugins.classifier.model``).
    """
    return resolve_with_kind(reference, kind, where)[0]


def resolve_with_kind(reference: Any, kind: str = "any", where: str = "") -> tuple[Any, str | None]:
    """The object and, when ``reference`` is an entry-point name, that name (its kind).

    ``kind`` and ``where`` as in :func:`resolve`; an installed entry point of the plugin
    group is trusted as a plugin (it was installed as one).
    """
    if not isinstance(reference, str):
        return reference, None
    installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if reference in installed and kind in ("plugin", "any"):
        try:
            return installed[reference].load(), reference
        except Exception as exc:
            raise PluginError(
                f"plugin {reference!r} (entry point {installed[reference].value}) failed to import: {exc}"
            ) from exc
    module_name, _, attr = reference.partition(":")
    prefix = f"{where}: " if where else ""
    if not module_name or not all(p.isidentifier() for p in module_name.split(".")) or (
        attr and not all(p.isidentifier() for p in attr.split("."))
    ):
        what = "plugin" if kind in ("plugin", "any") else kind
        raise PluginError(
            f"{prefix}unknown {what} {short(reference, 80)}{closest(reference, installed)}: expected "
            + ("an installed entry-point name or " if kind in ("plugin", "any") else "")
            + "module:attr"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            if kind in ("plugin", "any"):
                hint = closest(reference, installed)
                message = (
                    f"{prefix}unknown plugin {reference!r}{hint}: no installed entry point of that name and no "
                    f"module {module_name!r} ({_looked_in()}); installed plugins: {sorted(installed)}"
                )
            else:
                message = f"{prefix}no module {module_name!r} for {reference!r} ({_looked_in()})"
            raise MissingModuleError(message, module_name, reference, where) from None
        raise
    if not attr:
        check_reference(module, kind, reference, where)
        return module, None
    target: Any = module
    for part in attr.split("."):
        if part.startswith("__"):  # no walking into dunders (__class__, __globals__, __builtins__...)
            raise PluginError(f"{prefix}{reference!r}: private attribute {part!r} cannot be referenced")
        try:
            target = getattr(target, part)
        except AttributeError:
            names = [n for n in dir(target) if not n.startswith("_")]
            raise PluginError(
                f"{prefix}{reference!r}: {module_name} has no attribute {part!r}{closest(part, names)}"
            ) from None
    check_reference(target, kind, reference, where)
    return target, None


def _looked_in() -> str:
    head = [p or "." for p in sys.path[:3]]
    return f"looked in sys.path, which starts {head}"


# ----------------------------------------------------------------- reference kinds
F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__hookengine_kinds__"


def recipe_callable(*kinds: str) -> Callable[[F], F]:
    """Mark a function as usable from a recipe where a key asks for one of ``kinds``.

    >>> @recipe_callable("model")
    ... def tiny_net(width: int = 8): ...
    >>> check_reference(tiny_net, "model", "mymod:tiny_net")
    """
    unknown = set(kinds) - set(REFERENCE_KINDS)
    if unknown:
        raise ValueError(f"recipe_callable: unknown kind(s) {sorted(unknown)}; known: {sorted(REFERENCE_KINDS)}")

    def mark(fn: F) -> F:
        setattr(fn, _MARK, frozenset(getattr(fn, _MARK, frozenset())) | set(kinds))
        return fn

    return mark


def model_factory(fn: F) -> F:
    """Mark a function that builds a model (``model: mymod:build_net`` in a recipe)."""
    return recipe_callable("model")(fn)


def _marked(target: Any, kind: str) -> bool:
    return kind in getattr(target, _MARK, ())


def _subclass_of(target: Any, bases: tuple[tuple[str, str], ...]) -> bool:
    """Whether the class ``target`` derives from one of ``(module prefix, class name)``
    (by name, so checking a keras class does not import keras, nor torch)."""
    if not inspect.isclass(target):
        return False
    return any(
        c.__name__ == name and (c.__module__ or "").startswith(module) for c in target.__mro__ for module, name in bases
    )


_TORCH_MODULE = (("torch.nn.modules.module", "Module"),)
_KERAS_MODEL = (("keras", "Model"), ("keras", "Layer"))
_MODEL_BASES = _TORCH_MODULE + _KERAS_MODEL


def _from_stdlib(target: Any) -> bool:
    """Defined in Python's standard library or built in (``os.system``, ``subprocess.Popen``)."""
    if isinstance(target, types.ModuleType):
        module = target.__name__
    elif inspect.isclass(target) or inspect.isroutine(target):
        module = getattr(target, "__module__", None)
    else:  # an instance: where its class lives (functools.partial is the standard library's)
        module = type(target).__module__
    if not isinstance(module, str):
        return True  # builtin method descriptors, objects with no home module
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"


def _returns(target: Any, bases: tuple[tuple[str, str], ...]) -> bool:
    """Whether a function's return annotation is a class derived from ``bases``."""
    if not inspect.isfunction(target):
        return False
    try:
        hint = typing.get_type_hints(target).get("return")
    except Exception:  # a lazily imported type, written as a string: "nn.Module", "keras.Model"
        text = str(target.__annotations__.get("return", "")).strip("'\" ")
        return text.rsplit(".", 1)[-1] in {name for _, name in bases}
    return _subclass_of(hint, bases)


def _is_plugin(target: Any) -> bool:
    if inspect.isfunction(target):  # fn(engine, **options), or marked
        params = list(inspect.signature(target).parameters)
        return bool(params) and params[0] == "engine"
    if inspect.isroutine(target):  # builtins, bound methods
        return False
    # a class, a module, or an object (an instance of a plugin class) with setup(engine)
    return callable(getattr(target, "setup", None))


# What each kind accepts (besides functions marked with recipe_callable(kind)), and how
# the error says it. "any" is the floor for call sites that name no kind: a class, a
# function or a module, never from the standard library.
REFERENCE_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "plugin": (_is_plugin, "a plugin (a class, object or module with setup(engine), or a function fn(engine, ...))"),
    "model": (
        lambda t: _subclass_of(t, _MODEL_BASES) or _returns(t, _MODEL_BASES),
        "a model (an nn.Module or keras Model class, or a function marked @model_factory "
        "or annotated to return one)",
    ),
    "loss": (
        lambda t: _subclass_of(t, _TORCH_MODULE)
        or (callable(t) and (getattr(t, "__module__", None) or "").startswith("torch.nn.functional")),
        "a loss (an nn.Module loss class, a torch.nn.functional function, or a function marked @recipe_callable('loss'))",
    ),
    "optimizer": (
        lambda t: _subclass_of(t, (("torch.optim", "Optimizer"),)),
        "an optimizer (a torch.optim.Optimizer class, or a function marked @recipe_callable('optimizer'))",
    ),
    "scheduler": (
        lambda t: _subclass_of(t, (("torch.optim.lr_scheduler", "LRScheduler"),)),
        "an lr scheduler (a torch LRScheduler class, or a function marked @recipe_callable('scheduler'))",
    ),
    "callback": (
        lambda t: _subclass_of(t if inspect.isclass(t) else type(t), (("keras", "Callback"),)),
        "a keras Callback (class or instance; or a function marked @recipe_callable('callback'))",
    ),
    "model_class": (
        lambda t: inspect.isclass(t) and (_subclass_of(t, _MODEL_BASES) or callable(getattr(t, "from_pretrained", None))),
        "a model class (an nn.Module or keras Model class, or a class with from_pretrained)",
    ),
    "function": (inspect.isfunction, "a Python function"),
    "any": (
        lambda t: inspect.isclass(t)
        or inspect.isfunction(t)
        or isinstance(t, types.ModuleType)
        or (callable(t) and not inspect.isroutine(t)),  # an instance with __call__
        "a class, function, callable object or module",
    ),
}


def check_reference(target: Any, kind: str, reference: str, where: str = "") -> None:
    """Raise :class:`PluginError` unless ``target`` (what ``reference`` resolved to) is a
    ``kind`` (see :data:`REFERENCE_KINDS`); nothing of ``target`` is called here."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; known: {sorted(REFERENCE_KINDS)}")
    accepts, wanted = REFERENCE_KINDS[kind]
    if _marked(target, kind) and not _from_stdlib(target):
        return
    if not _from_stdlib(target) and accepts(target):
        return
    found = "from the standard library" if _from_stdlib(target) else f"a {_describe(target)}"
    key = f"{where}: " if where else ""
    raise PluginError(f"{key}{short(reference, 80)} is not {wanted}: it is {found} (refused before calling anything)")


def _describe(target: Any) -> str:
    if inspect.isclass(target):
        return "class without that base"
    if isinstance(target, types.ModuleType):
        return "module without setup(engine)"
    if inspect.isroutine(target):
        return "function not marked for that use"
    return f"{type(target).__name__} object"


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
                f"{where}.{key}{loc}: expected {_type_name(hint)}, got {short(value)} ({error['msg']})"
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
