"""Safe-by-default checks on model files: safetensors only, pickle refused unless allowed.

Pickle-based weights (``.bin``, ``.ckpt``, ``.pt``...) can run arbitrary code when loaded,
so a load that would read one is refused with a message that says how to allow it for
that one load. Names are not trusted: a file's content is checked too (pickle opcodes,
torch's zip archives), and sharded weights are followed through their index files
(``pytorch_model.bin.index.json``...), whatever the shards are called. Safetensors files
are checked (header and size) before a library reads them, so a corrupt file gets an
error that names it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

__all__ = [
    "PICKLE_SUFFIXES",
    "ModelLoadError",
    "UnsafeFileError",
    "is_pickle_file",
    "looks_like_pickle",
    "index_shards",
    "check_file",
    "check_folder",
    "check_safetensors",
    "class_reference",
]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model, file or repo id."""


class UnsafeFileError(ModelLoadError):
    """A pickle-based weights file was about to be loaded without ``allow_pickle=True``."""


INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json
MAX_INDEX_BYTES = 64 << 20  # an index maps tensor names to shards: megabytes at most


def is_pickle_file(path: str | Path) -> bool:
    """True for file names that torch/pickle would unpickle (``.bin``, ``.ckpt``, ``.pt``, ...)."""
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def looks_like_pickle(path: str | Path) -> bool:
    """Whether the file's content is a pickle (protocol 2+ opcode) or a torch zip archive
    holding one, whatever its name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode: torch.save's legacy format too
        return True
    if head == b"PK\x03\x04":  # torch.save's zip format keeps the pickle in <name>/data.pkl
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return True  # a damaged archive in a weights folder: not something to hand to torch.load
    return False


def _is_safetensors(path: Path) -> bool:
    """Whether the content starts like a safetensors file (8-byte header length, then '{')."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _refusal(path: Path, model: str, through: Path | None = None) -> UnsafeFileError:
    via = f" (a shard of {through.name})" if through is not None else ""
    return UnsafeFileError(
        f"refused to load pickle-based weights {str(path)!r}{via} for model {model!r}: pickle files can run "
        "code when loaded. Convert them to safetensors, or, if you trust the file, allow pickle for "
        f"this load only with allow_pickle=True in its spec (recipe: model_loader.models.{model}.allow_pickle: true)"
    )


def index_shards(index: str | Path, model: str = "") -> list[Path]:
    """The shard files a ``*.index.json`` maps its tensors to (they must stay in its folder)."""
    index = Path(index)
    owner = f" (model {model!r})" if model else ""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ModelLoadError(f"weights index {str(index)!r}{owner} is larger than {MAX_INDEX_BYTES} bytes")
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable weights index {str(index)!r}{owner}: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"weights index {str(index)!r}{owner} has no weight_map mapping")
    folder = index.parent.resolve()
    shards = []
    for name in dict.fromkeys(str(v) for v in weight_map.values()):
        shard = (index.parent / name).resolve()
        if folder not in shard.parents:
            raise ModelLoadError(f"weights index {str(index)!r}{owner} points outside its folder: {name[:200]!r}")
        shards.append(shard)
    return shards


def _check_index(index: Path, allow_pickle: bool, model: str) -> None:
    """Follow an index to its shards: a pickle index, or any shard whose content is a pickle
    (or that is not a safetensors file), is refused unless pickle is allowed."""
    pickle_index = not index.name.endswith(".safetensors" + INDEX_SUFFIX)
    for shard in index_shards(index, model):
        if not shard.is_file():
            continue  # the library names the missing shard itself
        if pickle_index or looks_like_pickle(shard) or not _is_safetensors(shard):
            if not allow_pickle:
                raise _refusal(shard, model, through=index)
        else:
            check_safetensors(shard, model)


def check_file(path: str | Path, allow_pickle: bool = False, model: str = "") -> None:
    """Refuse a pickle-based file unless allowed (by name or by content); follow an index
    file to its shards; check a safetensors file's header."""
    path = Path(path)
    model = model or path.stem
    if path.name.endswith(INDEX_SUFFIX):
        _check_index(path, allow_pickle, model)
        return
    if (is_pickle_file(path) or looks_like_pickle(path)) and not allow_pickle:
        raise _refusal(path, model)
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
    safetensors. Index files are followed to their shards, whatever the shards are named,
    and a shard is judged by its content. Every safetensors file must have a readable header.
    """
    model = model or Path(folder).name
    for sub in _weight_folders(Path(folder)):
        files = [p for p in sub.iterdir() if p.is_file()]
        tensors = [p for p in files if p.suffix == ".safetensors"]
        indexes = [p for p in files if p.name.endswith(INDEX_SUFFIX)]
        safe_indexes = [p for p in indexes if p.name.endswith(".safetensors" + INDEX_SUFFIX)]
        pickles = [p for p in files if is_pickle_file(p) and not p.name.startswith(("optimizer", "scheduler", "training_args"))]
        has_safe = bool(tensors or safe_indexes)
        if pickles and not has_safe and not allow_pickle:
            raise _refusal(pickles[0], model)
        for index in safe_indexes:
            _check_index(index, allow_pickle, model)
        if not has_safe:  # a pickle index is what the library would read
            for index in indexes:
                _check_index(index, allow_pickle, model)
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


def class_reference(reference: str, key: str = "cls") -> type:
    """The class a ``module:Class`` string names (a model class, or one with
    ``from_pretrained``), checked before anything of it is called: a model folder's
    ``hookengine_model.json`` or a recipe's ``cls`` is data, never a way to call
    ``os:system``."""
    from ..core.plugins import PluginError, resolve

    try:
        return resolve(reference, "model_class", key)
    except (PluginError, ImportError) as exc:
        raise ModelLoadError(f"cannot use class {reference!r}: {exc}") from exc
