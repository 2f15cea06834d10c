"""The ``hookengine`` command: run recipes, show hooks, list plugins, export runs.

A user error (a wrong recipe, option value or path, a refused model file, a full disk)
is one line on stderr and exit status 2; anything else is a bug, shown with the end of
its traceback and exit status 1. ``--debug`` shows the whole traceback of either.
What counts as a user error is defined once, in :func:`user_error`.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from typing import Sequence

__all__ = ["main", "user_error", "USER_ERROR_TYPES"]

_EPILOG = """examples:
  hookengine run                                  # the embedded demo recipe
  hookengine run recipe.yaml --set trainer.lr=1e-4
  hookengine run recipe.yaml --resume             # continue from the newest checkpoint
  hookengine hooks recipe.yaml                    # what is attached where, in which order
  hookengine export runs/demo --out exported      # the trained models, ready to load
"""

# ------------------------------------------------------------ what a user error is
# Exceptions the user fixes in the recipe, the options, the files or the machine, not in
# the code. Named as "module:Class" so the command does not import torch to name them.
USER_ERROR_TYPES: tuple[str, ...] = (
    "hookengine.recipe:RecipeError",  # a recipe that does not read or validate
    "hookengine.core.plugins:PluginError",  # unknown plugin, wrong option, wrong kind of reference
    "hookengine.core.plan:PlanError",  # phases that do not add up
    "hookengine.training.checkpoint:CheckpointError",  # a checkpoint that cannot be read or resumed
    "hookengine.training.trainer:NonFiniteLossError",  # the loss diverged (nonfinite: raise)
    "hookengine.models.safety:ModelLoadError",  # a model that cannot be loaded, a refused pickle
    "hookengine.models.cache:CacheError",  # a latent/feature cache that does not fit or match
    "hookengine.data.images:BadSampleError",  # a sample that cannot be decoded
    "hookengine.data.buckets:BucketError",  # images that fit no bucket
    "hookengine.training.export:ExportError",  # a run that cannot be exported as asked
)
# Option checks of the libraries raise these (torch: "Invalid learning rate: nan",
# accelerate: "Unknown mixed_precision mode"; a batch without the key a routine reads).
_VALUE_ERRORS = (ValueError, KeyError)
# Errors of the machine rather than of the code: missing files, permissions, a full disk.
_USER_ERRNOS = {
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EEXIST,
}
_DISK_FULL = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def _user_types() -> tuple[type, ...]:
    found = []
    for reference in USER_ERROR_TYPES:
        module, _, name = reference.partition(":")
        loaded = sys.modules.get(module)  # an error of a module never imported was never raised
        cls = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 20:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user error, or ``None`` for a bug.

    A user error is an instance of :data:`USER_ERROR_TYPES`, an ``OSError`` about a file
    or the disk (missing, no permission, disk full, including a library's wrapped
    "No space left on device"), or a ``ValueError``/``KeyError`` (what the libraries'
    option checks raise).
    """
    chain = _chain(exc)
    for error in chain:  # a full disk, however the library that wrote wrapped it
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            text in str(error).lower() for text in _DISK_FULL
        ):
            return f"disk full while writing: {_line(error)}{_note(exc)}"
    if isinstance(exc, _user_types()):
        return _line(exc) + _note(exc)
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        return _line(exc) + _note(exc)
    if isinstance(exc, _VALUE_ERRORS):
        text = f"{type(exc).__name__}: {_line(exc)}" if isinstance(exc, KeyError) else _line(exc)
        return f"{text}{_note(exc)} (--debug shows the traceback)"
    return None


def _line(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _note(exc: BaseException) -> str:
    # The innermost "raised in <point> by <function> (plugin <name>)" note says where.
    notes = [n for n in getattr(exc, "__notes__", []) if n.startswith("raised in")]
    return f" [{_line(notes[0], 200)}]" if notes else ""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hookengine",
        description="One small engine for training torch, diffusers, transformers and Keras models; everything is a hook.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hookengine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of any error")
    # --debug is accepted after the command too (hookengine run r.yaml --debug).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (no recipe: the demo)", parents=[debug])
    run.add_argument("recipe", nargs="?", help="a recipe YAML file (default: the embedded demo)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. trainer.lr=1e-4 (repeatable)")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="resume from a checkpoint folder (default: the newest in the run folder)")
    run.add_argument("--run-dir", help="where the run writes its metrics, plots and checkpoints")

    hooks = sub.add_parser("hooks", parents=[debug],
                           help="print every hook point, what is attached, from which plugin, in which order")
    hooks.add_argument("recipe", nargs="?")
    hooks.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    export = sub.add_parser("export", parents=[debug],
                            help="export a run's trained models (rebuilt from RUN_DIR/recipe.yaml)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds recipe.yaml and checkpoints/)")
    export.add_argument("--out", metavar="DIR", default=None, help="where to write (default: RUN_DIR/export)")
    export.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="the checkpoint to export (default: the newest of the run)")

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


def _export(args: argparse.Namespace) -> int:
    from .training.export import export_run  # torch and the model libraries: only when asked

    written = export_run(args.run_dir, out=args.out, checkpoint=args.checkpoint)
    print(f"exported {args.run_dir}:" if written else f"exported {args.run_dir}: no trained model")
    for name, path in (written or {}).items():
        print(f"  {name}: {path}")
    return 0


def _command(args: argparse.Namespace) -> int:
    from .core.plugins import available

    if args.command == "docs":
        from .docgen import main as docs_main

        return docs_main(["--check"] if args.check else [])
    if args.command == "plugins":
        for name, target in sorted(available().items()):
            print(f"{name:14} {target}")
        return 0
    if args.command == "export":
        return _export(args)
    engine = _engine(args)
    if args.command == "hooks":
        _print_hooks(engine)
        return 0
    engine.run()
    if not getattr(engine.plugins.get("logging"), "summary", False):  # else the summary said it
        print(f"run finished at step {engine.state.clock.step}; results in {engine.state.run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hookengine`` command; returns the exit status.

    0: done; 2: a user error (one line on stderr, see :func:`user_error`); 1: a bug (the
    end of its traceback, and a line pointing to ``--debug``); 130: interrupted.
    """
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return _command(args)
    except KeyboardInterrupt:
        print("hookengine: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs right here
        message = user_error(exc)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f"hookengine: error: {message}", file=sys.stderr)
            return 2
        if not debug:
            traceback.print_exception(exc, limit=-3)  # the innermost frames: where it broke
        print(
            f"hookengine: internal error ({type(exc).__name__}): a bug in hookengine or a plugin, not in the "
            "recipe; run again with --debug for the whole traceback, and please report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
