"""Recipes: YAML files naming the plugins to use, their options and the phases.

Recipes never evaluate strings as code; code is referenced as ``module:attr`` or by
entry-point name. Errors name the key path, the expected type and, for a misspelt key,
the closest valid one.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .core.plan import PlanError
from .core.plugins import DEFAULT_PLUGINS, PluginError, closest, resolve, validate_options

__all__ = ["RecipeError", "load_recipe", "apply_recipe", "parse_override", "DEMO"]

DEMO = "demo"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; recipes mean a number (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class RecipeError(ValueError):
    """A recipe that cannot be read or does not validate; the message names the key."""


class RuntimeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mixed_precision: str = "no"
    cpu: bool = False
    timeout_s: float = 300.0


class Recipe(BaseModel):
    """The top level of a recipe. Plugin sections are checked against the plugins."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    seed: int | None = 0
    run_dir: str = "runs/{name}"
    defaults: bool = True
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    train_sched: dict[str, Any] = Field(default_factory=dict)
    trainer: dict[str, Any] = Field(default_factory=dict)
    checkpoint: dict[str, Any] = Field(default_factory=dict)
    logging: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    phases: list[dict[str, Any]] | None = None


def _read(source: Any) -> dict[str, Any]:
    if source is None or source == DEMO:
        text = resources.files("hookengine.recipes").joinpath("demo.yaml").read_text()
        origin = "the demo recipe"
    elif isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    else:
        path = Path(source)
        shipped = resources.files("hookengine.recipes").joinpath(f"{source}.yaml")
        if not path.is_file() and path.suffix == "" and shipped.is_file():
            text, origin = shipped.read_text(), f"the shipped recipe {source!r}"  # e.g. digits_classifier
        elif not path.is_file():
            names = sorted(p.name.removesuffix(".yaml") for p in resources.files("hookengine.recipes").iterdir()
                           if p.name.endswith(".yaml"))
            raise RecipeError(f"recipe file {path} does not exist{closest(str(source), names)}; shipped recipes: {names}")
        else:
            text, origin = path.read_text(), str(path)
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-4"`` -> (["trainer", "lr"], 0.0001); values are YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. trainer.lr=1e-4")
    try:
        parsed = _yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), parsed


def _set(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, path[: i + 1])]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {text}: {'.'.join(path[:i])} is not a mapping")
        node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {text}: {'.'.join(path[:-1])} is not a mapping")


def _index(part: str, node: list[Any], path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"--set: {'.'.join(path)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _format(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = Recipe
            key = str(e["loc"][-1])
            fields = parent.model_fields if len(e["loc"]) == 1 else RuntimeSection.model_fields
            lines.append(f"{loc}: unknown key{closest(key, fields)}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_recipe(source: Any = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (path, mapping, or None for the demo) and apply ``--set`` overrides."""
    data = _read(source)
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value, text)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"recipe: {_format(exc)}") from None


def plugin_sections(recipe: Recipe) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, reference, options) for every plugin the recipe uses, defaults first."""
    sections: list[tuple[str, Any, dict[str, Any]]] = []
    if recipe.defaults:
        for name in DEFAULT_PLUGINS:
            options = dict(getattr(recipe, name))
            if name == "train_sched" and recipe.phases is not None:
                if "phases" in options:
                    raise RecipeError("phases and train_sched.phases are the same setting; keep one")
                options["phases"] = recipe.phases  # the short form
            sections.append((name, name, options))
    for name, spec in recipe.plugins.items():
        if not isinstance(spec, dict) or "use" not in spec:
            raise RecipeError(f"plugins.{name}: needs a 'use' key naming the plugin (entry point or module:attr)")
        options = {k: v for k, v in spec.items() if k != "use"}
        sections.append((name, spec["use"], options))
    return sections


def validate_recipe(recipe: Recipe) -> None:
    """Resolve every plugin and check its options, without setting anything up."""
    for name, reference, options in plugin_sections(recipe):
        where = name if name in DEFAULT_PLUGINS else f"plugins.{name}"
        try:
            validate_options(resolve(reference), options, where)
        except PluginError as exc:
            raise RecipeError(str(exc)) from None


def apply_recipe(engine: Any, recipe: Recipe) -> None:
    """Configure ``engine`` from ``recipe``: seed, run folder, precision, plugins."""
    validate_recipe(recipe)
    runtime = engine.runtime
    if runtime.started and (runtime.seed, runtime.mixed_precision) != (recipe.seed, recipe.runtime.mixed_precision):
        raise RecipeError("the engine's runtime has already started; apply the recipe to a new Engine")
    runtime.seed = recipe.seed
    runtime.mixed_precision = recipe.runtime.mixed_precision
    runtime.cpu = recipe.runtime.cpu
    runtime.timeout_s = recipe.runtime.timeout_s
    engine.state.run_dir = recipe.run_dir.format(name=recipe.name)
    engine.state.config = recipe.model_dump()
    engine.defaults = recipe.defaults
    for name, reference, options in plugin_sections(recipe):
        where = name if name in DEFAULT_PLUGINS else f"plugins.{name}"
        try:
            engine.use(reference, name=name, **options)
        except PluginError as exc:
            raise RecipeError(str(exc)) from None
        except PlanError as exc:
            raise RecipeError(str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {exc}") from exc
