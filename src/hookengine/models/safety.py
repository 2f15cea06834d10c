"""Safe-by-default checks on model files: safetensors only, pickle refused unless allowed.

Pickle-based weights (``.bin``, ``.ckpt``, ``.pt``...) can run arbitrary code when loaded,
so a load that would read one is refused with a message that says how to allow it for
that one load. Safetensors files are checked (header and size) before a library reads
them, so a corrupt file gets an error that names it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "PICKLE_SUFFIXES",
    "ModelLoadError",
    "UnsafeFileError",
    "is_pickle_file",
    "check_file",
    "check_folder",
    "check_safetensors",
]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model, file or repo id."""


class UnsafeFileError(ModelLoadError):
    """A pickle-based weights file was about to be loaded without ``allow_pickle=True``."""


def is_pickle_file(path: str | Path) -> bool:
    """True for file names that torch/pickle would unpickle (``.bin``, ``.ckpt``, ``.pt``, ...)."""
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def _refusal(path: Path, model: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"refused to load pickle-based weights {str(path)!r} for model {model!r}: pickle files can run "
        "code when loaded. Convert them to safetensors, or, if you trust the file, allow pickle for "
        f"this load only with allow_pickle=True in its spec (recipe: model_loader.models.{model}.allow_pickle: true)"
    )


def check_file(path: str | Path, allow_pickle: bool = False, model: str = "") -> None:
    """Refuse a pickle-based file unless allowed; check a safetensors file's header."""
    path = Path(path)
    if is_pickle_file(path) and not allow_pickle:
        raise _refusal(path, model or path.stem)
    if path.suffix == ".safetensors":
        check_safetensors(path, model)


def _weight_folders(folder: Path, max_depth: int = 2) -> list[Path]:
    """``folder`` and its sub-folders down to ``max_depth`` (pipelines keep weights one level down)."""
    found = [folder]
    base_depth = len(folder.parts)
    for root, dirs, _ in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if len(Path(root).parts) - base_depth >= max_depth:
            dirs[:] = []
            continue
        found.extend(Path(root) / d for d in dirs)
    return found


def check_folder(folder: str | Path, allow_pickle: bool = False, model: str = "") -> None:
    """Check every weights file a load from ``folder`` could read.

    A folder whose only weights are pickle-based is refused (unless allowed); pickle files
    next to safetensors ones are left alone, because the libraries are told to read the
    safetensors. Every safetensors file must have a readable header.
    """
    for sub in _weight_folders(Path(folder)):
        files = [p for p in sub.iterdir() if p.is_file()]
        tensors = [p for p in files if p.suffix == ".safetensors"]
        pickles = [p for p in files if is_pickle_file(p) and not p.name.startswith(("optimizer", "scheduler", "training_args"))]
        if pickles and not tensors and not allow_pickle:
            raise _refusal(pickles[0], model or Path(folder).name)
        for path in tensors:
            check_safetensors(path, model)


def check_safetensors(path: str | Path, model: str = "") -> None:
    """Open the header (memory-mapped, no tensor is read); raise naming the file if it is corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError, OSError: both mean "this file cannot be used"
        owner = f" (model {model!r})" if model else ""
        raise ModelLoadError(f"corrupt or unreadable safetensors file {str(path)!r}{owner}: {exc}") from exc
