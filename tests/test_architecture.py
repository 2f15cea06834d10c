"""The layout is the architecture: imports go one way (core <- plugins <- app), and no
plugin reaches into another plugin; they meet through State and the declared points."""

from __future__ import annotations

import ast
from pathlib import Path

import hookengine

PACKAGE = Path(hookengine.__file__).parent
CORE = {"core"}
PLUGINS = {"training", "models", "data", "sched", "routines", "scale", "demo", "testing", "recipes"}
APP = {"recipe", "cli", "docgen", "__main__"}
# The one import against the direction, made only when Engine.run() is handed a recipe:
# a convenience entry into the app layer, never at import time.
ALLOWED_UPWARD = {("core/engine.py", "hookengine.recipe")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    if not top or top in CORE:
        return 0
    if top in PLUGINS:
        return 1
    if top in APP:
        return 2
    raise AssertionError(f"{module}: a top-level name the layering does not know; add it to a layer")


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((path, ".".join(parts)))
    return out


def _imports(path: Path, module: str) -> list[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            if node.module is None or node.level:  # "from . import x": x may be a module
                found += [f"{target}.{a.name}" for a in node.names]
    return [m for m in found if m == "hookengine" or m.startswith("hookengine.")]


def test_imports_go_one_way_core_plugins_app() -> None:
    wrong = []
    for path, module in _modules():
        if module == "hookengine":  # the package's front door re-exports the core
            continue
        rel = str(path.relative_to(PACKAGE))
        for target in _imports(path, module):
            known = _known_module(target)
            if known is None or (rel, known) in ALLOWED_UPWARD:
                continue
            if _layer(known) > _layer(module):
                wrong.append(f"{rel} imports {known}")
    assert not wrong, "imports against core <- plugins <- app:\n" + "\n".join(wrong)


def _known_module(target: str) -> str | None:
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        path = PACKAGE.parent / Path(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return name
        parts = parts[:-1]
    return None


def test_the_demo_is_imported_by_nothing_but_itself() -> None:
    users = [
        f"{path.relative_to(PACKAGE)} imports {t}"
        for path, module in _modules()
        if not module.startswith("hookengine.demo")
        for t in _imports(path, module)
        if t.startswith("hookengine.demo")
    ]
    assert not users


def _reaches_into_plugins(source: str) -> list[tuple[int, str]]:
    """``engine.plugins`` / ``self.engine.plugins`` and the registry's private bookkeeping."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
        if owner == "engine" and node.attr == "plugins":
            hits.append((node.lineno, "engine.plugins"))
        if owner == "hooks" and node.attr in ("current_plugin", "current_kind", "has", "_entries", "declared"):
            hits.append((node.lineno, f"engine.hooks.{node.attr}"))
    return hits


def test_no_plugin_reads_another_plugin_or_the_registry_internals() -> None:
    """Plugins meet through State (the plan, models, metrics) and the hook API only."""
    offences = [
        f"{path.relative_to(PACKAGE)}:{line} reads {what}"
        for path, module in _modules()
        if _layer(module) == 1
        for line, what in _reaches_into_plugins(path.read_text())
    ]
    assert not offences, "\n".join(offences)


def test_the_scan_can_fail() -> None:
    source = "def setup(engine):\n    t = engine.plugins.get('trainer')\n    n = self.engine.hooks.current_plugin\n"
    assert sorted(what for _, what in _reaches_into_plugins(source)) == ["engine.hooks.current_plugin", "engine.plugins"]
