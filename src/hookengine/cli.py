"""The ``hookengine`` command: run recipes, show hooks, list plugins."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]

_EPILOG = """examples:
  hookengine run                                  # the embedded demo recipe
  hookengine run recipe.yaml --set trainer.lr=1e-4
  hookengine run recipe.yaml --resume             # continue from the newest checkpoint
  hookengine hooks recipe.yaml                    # what is attached where, in which order
"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hookengine",
        description="One small engine for training torch, diffusers, transformers and Keras models; everything is a hook.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hookengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (no recipe: the demo)")
    run.add_argument("recipe", nargs="?", help="a recipe YAML file (default: the embedded demo)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. trainer.lr=1e-4 (repeatable)")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="resume from a checkpoint folder (default: the newest in the run folder)")
    run.add_argument("--run-dir", help="where the run writes its metrics, plots and checkpoints")

    hooks = sub.add_parser("hooks", help="print every hook point, what is attached, from which plugin, in which order")
    hooks.add_argument("recipe", nargs="?")
    hooks.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("plugins", help="list the installed plugins (entry points)")
    docs = sub.add_parser("docs", help="regenerate docs/HOOKS.md and docs/PLUGIN_OPTIONS.md from the code")
    docs.add_argument("--check", action="store_true", help="exit 1 listing stale files instead of writing")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume={args.resume}")
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return overrides


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .core.engine import Engine
    from .recipe import apply_recipe, load_recipe

    engine = Engine()
    apply_recipe(engine, load_recipe(args.recipe, _overrides(args)))
    return engine


def _print_hooks(engine) -> None:  # type: ignore[no-untyped-def]
    rows = engine.describe_hooks()
    current = None
    for row in rows:
        if row["point"] != current:
            current = row["point"]
            point = engine.hooks.declared.get(current)  # module hooks are not in the table
            signature = f"({', '.join(point.payload)})" if point else ""
            print(f"{row['kind']} {current}{signature}" + (f"  # {point.doc}" if point and point.doc else ""))
        extras = []
        if row["priority"]:
            extras.append(f"priority={row['priority']}")
        extras += [f"{k}={v}" for k, v in row["filters"].items()]
        extras += [f"before={row['before']}"] if row["before"] else []
        extras += [f"after={row['after']}"] if row["after"] else []
        suffix = f"  [{', '.join(extras)}]" if extras else ""
        print(f"  {row['position']}. {row['plugin'] or 'user'}: {row['function']}{suffix}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hookengine`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    from .training.checkpoint import CheckpointError
    from .training.trainer import NonFiniteLossError
    from .core.plugins import PluginError, available
    from .recipe import RecipeError

    try:
        if args.command == "docs":
            from .docgen import main as docs_main

            return docs_main(["--check"] if args.check else [])
        if args.command == "plugins":
            for name, target in sorted(available().items()):
                print(f"{name:14} {target}")
            return 0
        engine = _engine(args)
        if args.command == "hooks":
            _print_hooks(engine)
            return 0
        engine.run()
        print(f"run finished at step {engine.state.clock.step}; results in {engine.state.run_dir}")
        return 0
    except (RecipeError, PluginError, CheckpointError, NonFiniteLossError, FileNotFoundError) as exc:
        print(f"hookengine: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hookengine: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
