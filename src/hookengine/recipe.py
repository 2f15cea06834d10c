"""Recipes: YAML files naming the plugins to use, their options and the phases.

Recipes are data (see docs/RECIPES.md for the trust model). No string of a recipe is
evaluated or formatted as code: code is referenced as ``module:attr`` or by entry-point
name, and what a reference resolves to must be what its key asks for, checked before
anything is called. The YAML is read with limits (file size, nesting depth, aliases and
expanded size), and ``run_dir`` knows only plain ``{name}``/``{seed}`` fields. Errors
name the key path, the expected type and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import copy
import re
import string
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .core.plan import PlanError
from .core.plugins import DEFAULT_PLUGINS, MissingModuleError, PluginError, closest, resolve, short, validate_options

__all__ = [
    "RecipeError",
    "Recipe",
    "load_recipe",
    "apply_recipe",
    "parse_override",
    "expand_run_dir",
    "load_run_recipe",
    "save_run_recipe",
    "run_recipe_data",
    "make_importable",
    "RUN_RECIPE",
    "DEMO",
    "MAX_RECIPE_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_ALIASES",
    "MAX_YAML_NODES",
]

DEMO = "demo"
RUN_RECIPE = "recipe.yaml"  # the resolved recipe a run writes into its folder

# Limits on what a recipe may be: a recipe is a page of settings, and these stop a file
# (or an alias bomb) from taking the machine's memory or time before anything is checked.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 64  # nested mappings/lists
MAX_YAML_ALIASES = 1000  # *references to &anchors
MAX_YAML_NODES = 200_000  # scalars + collections once every alias is expanded
RUN_DIR_FIELDS = ("name", "seed")  # the only {fields} run_dir may use


class RecipeError(ValueError):
    """A recipe that cannot be read or does not validate; the message names the key."""


class _YamlLimit(yaml.YAMLError):
    """A recipe's YAML goes past one of the limits above."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader with limits, reading ``1e-4`` as a number (as YAML 1.2 does; YAML 1.1
    reads it as a string)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases (*name); the limit is MAX_YAML_ALIASES")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlLimit(
                    f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}); the limit is MAX_YAML_DEPTH"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _expanded_size(root: yaml.Node) -> int:
    """The number of nodes once every alias is expanded (a billion laughs is small as a
    graph and huge as data); counted over the graph, without expanding it."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    visiting: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            visiting.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_NODES:
                raise _YamlLimit(
                    f"more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?); "
                    "the limit is MAX_YAML_NODES"
                )
            continue
        if key in sizes:
            continue
        if key in visiting:  # an entry of a node still open below us: the node contains itself
            raise _YamlLimit("an alias refers to a collection that contains it (recursive)")
        visiting.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


_QUOTED_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|(?:^|\s)#[^\n]*')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _check_flow_depth(text: str) -> None:
    """Refuse deeply nested ``[[[...`` before PyYAML scans it (its scanner is quadratic in
    the number of open flow collections)."""
    brackets = _NOT_BRACKET.sub("", _QUOTED_OR_COMMENT.sub("", text))
    depth = deepest = 0
    for char in brackets:
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
        if deepest > MAX_YAML_DEPTH:
            raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels; the limit is MAX_YAML_DEPTH")


def _yaml(text: str) -> Any:
    _check_flow_depth(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _one_line(text: str, limit: int = 300) -> str:
    """Error text on one line, cut to ``limit`` characters (never a whole huge value)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RuntimeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] = "no"
    cpu: bool = False
    timeout_s: float = 300.0
    fsdp: dict[str, Any] | bool | None = None  # checked by hookengine.core.fsdp.FsdpOptions


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
    # Folders importable for module:attr references, besides the recipe's own folder
    # (relative ones are relative to the recipe file).
    import_paths: list[str] = Field(default_factory=list)

    _folder: Path | None = PrivateAttr(default=None)  # the recipe file's folder, if any

    @property
    def folders(self) -> list[Path]:
        """The folders made importable for this recipe's ``module:attr`` references."""
        base = self._folder or Path.cwd()
        found = [self._folder] if self._folder is not None else []
        found += [(base / p).resolve() for p in self.import_paths]
        return list(dict.fromkeys(found))

    def resolved_run_dir(self) -> str:
        """``run_dir`` with its ``{name}``/``{seed}`` fields filled in."""
        return expand_run_dir(self.run_dir, name=self.name, seed=self.seed)


def expand_run_dir(template: str, **fields: Any) -> str:
    """Fill plain ``{field}`` names of ``template`` (``runs/{name}``); ``{{``/``}}`` are braces.

    Only the names in :data:`RUN_DIR_FIELDS` are known; attribute access, indexing, format
    specs and conversions (``{name.__class__}``, ``{name!r}``, ``{name:>10}``) are errors:
    a recipe string is never handed to ``str.format``.
    """
    out = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(f"run_dir: {exc} in {short(template, 80)}; use {{name}} fields, {{{{ }}}} for braces") from None
    for literal, field, spec, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if field not in RUN_DIR_FIELDS or spec or conversion:
            text = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise RecipeError(
                f"run_dir: unknown field {short(text, 60)}; run_dir may use only "
                + ", ".join("{" + f + "}" for f in RUN_DIR_FIELDS)
            )
        out.append(str(fields.get(field)))
    return "".join(out)


def _read(source: Any) -> tuple[dict[str, Any], Path | None]:
    """The recipe's data and the folder of its file (``None`` for shipped recipes and mappings)."""
    folder = None
    if source is None or source == DEMO:
        text = resources.files("hookengine.recipes").joinpath("demo.yaml").read_text()
        origin = "the demo recipe"
    elif isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), None
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
            text, origin, folder = _read_text(path), str(path), path.resolve().parent
    try:
        data = _yaml(text)
    except _YamlLimit as exc:
        raise RecipeError(f"{origin}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{origin} is not valid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{origin}: refused: nested too deeply") from None
    if data is None:
        return {}, folder
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, folder


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: refused: {size} bytes is more than a recipe may be ({MAX_RECIPE_BYTES} bytes, MAX_RECIPE_BYTES)"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-4"`` -> (["trainer", "lr"], 0.0001); values are YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {short(text, 80)}: expected KEY=VALUE, e.g. trainer.lr=1e-4")
    if len(value) > MAX_RECIPE_BYTES:
        raise RecipeError(f"--set {key.strip()}: refused: the value is longer than {MAX_RECIPE_BYTES} bytes")
    try:
        parsed = _yaml(value) if value.strip() else ""
    except _YamlLimit as exc:
        raise RecipeError(f"--set {key.strip()}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {short(text, 80)}: value is not valid YAML ({_one_line(exc, 200)})") from None
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
            lines.append(f"{loc}: {e['msg']} (got {short(e.get('input'))})")
    return "; ".join(lines)


def load_recipe(source: Any = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (path, mapping, or None for the demo) and apply ``--set`` overrides."""
    data, folder = _read(source)
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value, text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"recipe: {_format(exc)}") from None
    recipe._folder = folder
    recipe.resolved_run_dir()  # an unknown {field} fails here, before anything is set up
    return recipe


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


def make_importable(recipe: Recipe) -> None:
    """Let ``module:attr`` references find modules in the recipe's folder (and ``import_paths``).

    The folders go at the end of ``sys.path``: a file next to the recipe never shadows an
    installed package (a ``yaml.py`` there does not replace PyYAML).
    """
    import importlib

    added = False
    for folder in recipe.folders:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
            added = True
    if added:
        importlib.invalidate_caches()


def _missing(exc: MissingModuleError, recipe: Recipe) -> RecipeError:
    """Say where the module was looked for and how to make it found."""
    if ":" not in exc.reference:  # a bare name: most likely a misspelt entry point
        return RecipeError(str(exc))
    folders = [str(f) for f in recipe.folders] or ["(none: the recipe is not a file)"]
    head = [p or "." for p in sys.path[:3]]
    where = f"{exc.where}: " if exc.where else ""
    file = exc.module.replace(".", "/") + ".py"
    return RecipeError(
        f"{where}cannot import module {exc.module!r} for {short(exc.reference, 80)}: looked in the recipe "
        f"folder {folders} and sys.path (starts {head}); put {file} next to the recipe, add its folder to "
        "import_paths, or install its package"
    )


def validate_recipe(recipe: Recipe) -> None:
    """Resolve every plugin and check its options, without setting anything up."""
    make_importable(recipe)
    for name, reference, options in plugin_sections(recipe):
        where = name if name in DEFAULT_PLUGINS else f"plugins.{name}"
        try:
            validate_options(resolve(reference, "plugin", f"{where}.use"), options, where)
        except MissingModuleError as exc:
            raise _missing(exc, recipe) from None
        except PluginError as exc:
            raise RecipeError(str(exc)) from None


def apply_recipe(engine: Any, recipe: Recipe) -> None:
    """Configure ``engine`` from ``recipe``: seed, run folder, precision, plugins.

    The run also writes the recipe, resolved (``--set`` applied), to ``RUN_DIR/recipe.yaml``
    when it starts (see :func:`save_run_recipe`).
    """
    validate_recipe(recipe)
    runtime = engine.runtime
    if runtime.started and (runtime.seed, runtime.mixed_precision) != (recipe.seed, recipe.runtime.mixed_precision):
        raise RecipeError("the engine's runtime has already started; apply the recipe to a new Engine")
    runtime.seed = recipe.seed
    runtime.mixed_precision = recipe.runtime.mixed_precision
    runtime.cpu = recipe.runtime.cpu
    runtime.timeout_s = recipe.runtime.timeout_s
    runtime.fsdp = recipe.runtime.fsdp
    engine.state.run_dir = recipe.resolved_run_dir()
    engine.state.config = recipe.model_dump()
    engine.defaults = recipe.defaults
    for name, reference, options in plugin_sections(recipe):
        where = name if name in DEFAULT_PLUGINS else f"plugins.{name}"
        try:
            engine.use(reference, name=name, **options)
        except MissingModuleError as exc:
            raise _missing(exc, recipe) from None
        except PluginError as exc:
            raise RecipeError(str(exc)) from None
        except PlanError as exc:
            raise RecipeError(str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {_one_line(exc)}") from exc

    def record(state: Any) -> None:  # at setup: the run has started, is_main_process is known
        if state.is_main_process and state.run_dir:
            save_run_recipe(recipe, state.run_dir)

    engine.on("setup", record, priority="first", plugin="recipe")


# ------------------------------------------------------------- the run's own recipe
def run_recipe_data(recipe: Recipe, run_dir: str | Path | None = None) -> dict[str, Any]:
    """The recipe as plain YAML data, as a run records it: ``run_dir`` filled in, the
    import folders absolute (the run folder itself left out), and without
    ``checkpoint.resume`` (how it was started, not what the run is)."""
    data = _plain(recipe.model_dump(mode="python"))
    data["run_dir"] = str(run_dir) if run_dir is not None else recipe.resolved_run_dir()
    own = Path(data["run_dir"]).resolve()
    data["import_paths"] = [str(f) for f in recipe.folders if f != own]
    data["checkpoint"] = {k: v for k, v in data.get("checkpoint", {}).items() if k != "resume"}
    return data


def _what_runs(data: Any) -> Any:
    """A recorded recipe without where it ran from (the folder may be moved or re-read)."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k not in ("run_dir", "import_paths")}


def _plain(value: Any) -> Any:
    """YAML-safe data; a class or function given in Python becomes its ``module:attr``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}:{qualname}"
    return repr(value)


def save_run_recipe(recipe: Recipe, run_dir: str | Path) -> Path:
    """Write the resolved recipe to ``RUN_DIR/recipe.yaml`` and return its path.

    A different recipe already there (a resumed run started with other settings) is not
    overwritten silently: it is kept as ``recipe.N.yaml`` and a line on stderr says so.
    """
    folder = Path(run_dir)
    path = folder / RUN_RECIPE
    data = run_recipe_data(recipe, run_dir)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if path.is_file():
        try:
            old = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            old = None
        if old == data:
            return path
        if _what_runs(old) == _what_runs(data):  # the same run, started from elsewhere: update
            n = 0
        else:
            n = 1
        while n and (folder / f"recipe.{n}.yaml").exists():
            n += 1
        if n:
            path.rename(folder / f"recipe.{n}.yaml")
            print(
                f"hookengine: {path} held a different recipe (another run, or a resume with other settings); "
                f"kept it as recipe.{n}.yaml",
                file=sys.stderr,
            )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_RECIPE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The recipe a run recorded in ``RUN_DIR/recipe.yaml`` (for export, evaluation...).

    Its ``import_paths`` hold the original recipe's folder, so ``module:attr`` plugins next
    to that recipe import again. Raises :class:`RecipeError` when the run recorded none.
    """
    path = Path(run_dir) / RUN_RECIPE
    if not Path(run_dir).is_dir():
        raise RecipeError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise RecipeError(
            f"{path} does not exist: the run did not record its recipe (runs started with "
            "`hookengine run` or engine.run(recipe) do); give the recipe explicitly"
        )
    return load_recipe(path)
