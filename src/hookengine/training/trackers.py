"""Experiment trackers (TensorBoard, W&B, MLflow...) through accelerate's tracker classes.

accelerate already wraps every tracker behind one interface (``accelerate.tracking``:
``start``, ``store_init_configuration``, ``log``, ``finish``); this module only picks the
classes by name, checks that their package is installed (one line naming it otherwise),
and turns the run's configuration into flat hyperparameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TrackerError", "check_trackers", "start_trackers", "flat_hparams"]

# accelerate's name -> the package to install (the pip name, when it differs).
_PIP_NAMES = {"comet_ml": "comet-ml", "tensorboard": "tensorboard"}


class TrackerError(ValueError):
    """A tracker that accelerate does not know, or whose package is not installed."""


def _registry() -> tuple[dict[str, Any], set[str]]:
    """accelerate's tracker classes by name, and the names whose package is installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    return dict(LOGGER_TYPE_TO_CLASS), available


def check_trackers(names: list[str], where: str = "logging.log_with") -> None:
    """Fail with one line for an unknown tracker name or a tracker whose package is missing.

    A name is one of accelerate's trackers (``tensorboard``, ``wandb``, ``mlflow``,
    ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``), ``all``
    (every one whose package is installed) or a ``module:attr`` reference to an
    ``accelerate.tracking.GeneralTracker`` subclass.
    """
    from ..core.plugins import closest

    classes, available = _registry()
    for name in names:
        if ":" in name:
            _tracker_class(name)  # a class of one's own: importable and a GeneralTracker
            continue
        if name == "all":
            continue  # whatever is installed
        if name not in classes:
            raise TrackerError(f"{where}: unknown tracker {name!r}{closest(name, sorted(classes))}; "
                               f"accelerate knows {sorted(classes)} (or give a module:attr GeneralTracker class)")
        if name not in available:
            package = _PIP_NAMES.get(name, name)
            raise TrackerError(f"{where}: tracker {name!r} needs the package {package!r}, which is not installed "
                               f"(pip install {package})")


def start_trackers(
    names: list[str],
    project: str,
    logging_dir: Path,
    config: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Any]:
    """Create and start the named trackers (as ``Accelerator.init_trackers`` does) and store
    ``config`` as their hyperparameters. Call on the main process only."""
    classes, available = _registry()
    options = options or {}
    if "all" in names:
        names = [n for n in names if n != "all"] + sorted(available - set(names))
    trackers = []
    for name in names:
        cls = _tracker_class(name) if ":" in name else classes[name]
        kwargs = dict(options.get(name, {}))
        if getattr(cls, "requires_logging_directory", False):
            tracker = cls(project, str(logging_dir), **kwargs)
        else:
            tracker = cls(project, **kwargs)
        tracker.start()
        trackers.append(tracker)
    if config:
        for tracker in trackers:
            tracker.store_init_configuration(dict(config))
    return trackers


def _tracker_class(reference: str) -> Any:
    """The ``accelerate.tracking.GeneralTracker`` subclass a ``module:attr`` names (nothing is called)."""
    from accelerate.tracking import GeneralTracker

    from ..core.plugins import resolve

    cls = resolve(reference, "any", "logging.log_with")
    if not (isinstance(cls, type) and issubclass(cls, GeneralTracker)):
        raise TrackerError(f"logging.log_with: {reference!r} is not an accelerate.tracking.GeneralTracker class")
    return cls


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as one level of ``a.b.c`` keys with values every tracker takes:
    numbers, strings and booleans; lists and ``None`` as JSON text.

    >>> flat_hparams({"train_sched": {"lr": 0.1, "phases": None}, "name": "x"})
    {'train_sched.lr': 0.1, 'train_sched.phases': 'null', 'name': 'x'}
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out
