"""Checkpoint folders on disk: trees to files and back, a manifest of content hashes,
atomic placement (a complete checkpoint is always visible) and cleanup of leftovers.

A checkpoint is a folder ``step-00000120/`` holding ``tensors.safetensors``, ``state.json``
and, written last, ``manifest.json`` (size and SHA-256 of each file). It is written under a
temporary name (``.step-00000120.tmp-PID``) and renamed when complete, so a killed process
never leaves a half-written checkpoint that ``--resume`` would pick, and flipped bytes are
found on load instead of training on from damaged weights.

SHA-256: about 1 GB/s on this kind of CPU (SHA-NI), which is the speed of the disk write it
follows, it releases the GIL (a background write does not stall training), and unlike a
CRC-32 it has no practical collisions at checkpoint sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "save_tree", "load_tree", "verify_checkpoint",
    "checkpoints_in", "latest_checkpoint", "write_checkpoint", "staging_folder", "clean_stale", "step_of",
    "TENSORS", "META", "MANIFEST", "PREFIX",
]

logger = logging.getLogger(__name__)

PREFIX = "step-"
TENSORS = "tensors.safetensors"
META = "state.json"
MANIFEST = "manifest.json"
_FORMAT = "hookengine-checkpoint/1"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged or inconsistent; an older checkpoint may be used instead."""


# --------------------------------------------------------------- tree <-> JSON
def _encode(obj: Any, tensors: dict[str, Any], path: str) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise CheckpointError(f"cannot checkpoint {path}: values of type {type(obj).__name__} are not supported")


class _BadState(ValueError):
    """A state file entry that cannot be decoded; the message names where."""


def _tensor(tensors: dict[str, Any], key: Any, where: str) -> Any:
    if not isinstance(key, str) or key not in tensors:
        raise _BadState(f"{where} refers to tensor {key!r}, which {TENSORS} does not have")
    return tensors[key]


def _decode(obj: Any, tensors: dict[str, Any], where: str = "state") -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return _tensor(tensors, obj["__tensor__"], where)
    if "__ndarray__" in obj:
        import numpy as np

        try:
            dtype = np.dtype(obj.get("dtype"))
        except TypeError as exc:
            raise _BadState(f"{where} has an invalid array dtype {obj.get('dtype')!r}") from exc
        return _tensor(tensors, obj["__ndarray__"], where).numpy().astype(dtype)
    if "__tuple__" in obj:
        items = obj["__tuple__"]
        if not isinstance(items, list):
            raise _BadState(f"{where}: __tuple__ must be a list, got {type(items).__name__}")
        return tuple(_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(items))
    if "__items__" in obj:
        items = obj["__items__"]
        if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
            raise _BadState(f"{where}: __items__ must be a list of [key, value] pairs")
        out = {}
        for i, (k, v) in enumerate(items):
            key = _decode(k, tensors, f"{where}.<key {i}>")
            try:
                out[key] = _decode(v, tensors, f"{where}.{key}")
            except TypeError as exc:  # an unhashable key (a list)
                raise _BadState(f"{where}: key {i} is not hashable ({exc})") from exc
        return out
    if "__dtype__" in obj:
        import torch

        dtype = getattr(torch, str(obj["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise _BadState(f"{where} names an unknown torch dtype {obj['__dtype__']!r}")
        return dtype
    return {k: _decode(v, tensors, f"{where}.{k}") for k, v in obj.items()}


# ------------------------------------------------------------------ hashing
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, names: list[str]) -> None:
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": _FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(folder: Path) -> bool:
    """Check ``folder``'s files against its manifest; ``False`` when it has none (an old checkpoint).

    Raises :class:`CorruptCheckpointError` naming the file and the problem.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"checkpoint {folder}: {MANIFEST} cannot be read ({exc})") from exc
    for name in (META, TENSORS):
        if name not in files:
            raise CorruptCheckpointError(f"checkpoint {folder}: {MANIFEST} does not list {name}")
    for name, entry in files.items():
        target = folder / name
        if not target.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CorruptCheckpointError(f"checkpoint {folder}: {MANIFEST} has no sha256 for {name}")
        size = target.stat().st_size
        if entry.get("bytes") not in (None, size):
            raise CorruptCheckpointError(
                f"checkpoint {folder}: {name} has {size} bytes, its manifest says {entry['bytes']} (truncated or replaced)"
            )
        if _sha256(target) != entry["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} does not match its sha256 in {MANIFEST} (damaged)")
    return True


# ------------------------------------------------------------ tree <-> folder
def save_tree(tree: Any, folder: Path) -> None:
    """Write ``tree`` (dicts, lists, tuples, numbers, strings, tensors, arrays) to ``folder``.

    Every file is flushed to disk, and ``manifest.json`` (their sizes and SHA-256) is
    written last, so a folder with a manifest is a complete one.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, Any] = {}
    encoded = _encode(tree, tensors, "state")
    seen: set[tuple[int, int]] = set()
    ready = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        # safetensors refuses shared storage (tied weights, views): copy those.
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone().contiguous()
        seen.add(ident)
        ready[key] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # a folder written again is incomplete until the end
    save_file(ready, str(folder / TENSORS))
    _fsync_file(folder / TENSORS)
    with open(folder / META, "w") as f:
        json.dump(encoded, f)
        f.flush()
        os.fsync(f.fileno())
    # Files already there (the shards of a sharded checkpoint, written by every process) are
    # listed and hashed too; a plain checkpoint has none.
    extra = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.parent != folder
    )
    _write_manifest(folder, [TENSORS, META, *extra])


def load_tree(folder: Path) -> Any:
    """Read what :func:`save_tree` wrote, checked against its manifest.

    Errors are one line naming the folder, the file and the problem: a
    :class:`CorruptCheckpointError` for damaged, missing or inconsistent files.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta, weights = folder / META, folder / TENSORS
    for path in (meta, weights):
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder} is incomplete: {path.name} is missing")
    if not verify_checkpoint(folder):
        logger.warning("checkpoint %s has no %s (an older format); loading it unverified", folder, MANIFEST)
    try:
        tensors = load_file(str(weights))
        with open(meta) as f:
            encoded = json.load(f)
    except Exception as exc:
        raise CorruptCheckpointError(f"checkpoint {folder} cannot be read: {_one_line(exc)}") from exc
    try:
        return _decode(encoded, tensors)
    except _BadState as exc:
        raise CorruptCheckpointError(f"checkpoint {folder}: {META}: {exc}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------- folders of checkpoints
def step_of(name: str) -> tuple[int, int] | None:
    """``(step, version)`` of a checkpoint folder name: ``step-00000120`` is ``(120, 0)``,
    ``step-00000120-1`` (the same step saved again, while the older copy is replaced) ``(120, 1)``;
    ``None`` for any other name."""
    if not name.startswith(PREFIX):
        return None
    step, dash, version = name[len(PREFIX):].partition("-")
    if not step.isdigit() or (dash and not version.isdigit()):
        return None
    return int(step), int(version or 0)


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete-looking checkpoints in ``folder`` (a ``state.json`` is there), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        key = step_of(path.name)
        if key is not None and (path / META).is_file():
            found.append((key, path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` (not verified; see :func:`load_tree`)."""
    found = checkpoints_in(Path(folder))
    return found[-1] if found else None


def staging_folder(folder: Path, step: int) -> Path:
    """The temporary folder a checkpoint of ``step`` is written in (named after this process)."""
    return Path(folder) / f".{PREFIX}{step:08d}.tmp-{os.getpid()}"


def write_checkpoint(
    tree: Any, folder: Path, step: int, keep_last: int | None, staged: Path | None = None
) -> Path:
    """Write ``tree`` as ``folder/step-NNNNNNNN`` and prune to the newest ``keep_last``.

    A complete checkpoint of ``step`` is visible at every moment: when the step is saved
    again, the new copy appears as ``step-NNNNNNNN-K`` before the old one is moved away,
    then takes the plain name. ``staged``: the :func:`staging_folder` already holding files
    written by other processes (shards), which the manifest then covers.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    pid = os.getpid()
    tmp = staged or folder / f".{final.name}.tmp-{pid}"
    if staged is None and tmp.exists():
        shutil.rmtree(tmp)
    save_tree(tree, tmp)
    same = sorted(p for p in folder.iterdir() if (k := step_of(p.name)) is not None and k[0] == step)
    if not same:
        tmp.rename(final)
        _fsync_dir(folder)
    else:
        version = max(step_of(p.name)[1] for p in same) + 1  # type: ignore[index]
        staged = folder / f"{final.name}-{version}"
        tmp.rename(staged)
        _fsync_dir(folder)
        old = [_hide(p, pid) for p in same]
        staged.rename(final)
        _fsync_dir(folder)
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    if keep_last:
        _prune(folder, final, step, keep_last, pid)
    return final


def _hide(path: Path, pid: int) -> Path:
    """Rename ``path`` out of sight (atomic), to be deleted; a kill leaves it for :func:`clean_stale`."""
    hidden = path.with_name(f".{path.name}.old-{pid}")
    if hidden.exists():
        shutil.rmtree(hidden)
    path.rename(hidden)
    return hidden


def _prune(folder: Path, written: Path, step: int, keep_last: int, pid: int) -> None:
    # Never the one just written; checkpoints of later steps (left by a run resumed from
    # an earlier one) are left alone: this run replaces them when it gets there.
    older = [p for p in checkpoints_in(folder) if p != written and step_of(p.name)[0] < step]  # type: ignore[index]
    stale = older[: max(len(older) - (keep_last - 1), 0)]
    for path in stale:
        shutil.rmtree(_hide(path, pid), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(folder: Path) -> list[str]:
    """Remove what killed writers left in ``folder``: ``.step-*.tmp-PID`` and ``.step-*.old-PID``
    folders of processes that are gone, and empty ``step-*`` folders. Returns the names removed.

    Call it only while holding the run folder (see :mod:`.run_lock`): a temporary folder of a
    live process is never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_dir():
            continue
        if name.startswith(f".{PREFIX}") and (".tmp-" in name or ".old-" in name):
            pid = name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
        elif step_of(name) is not None and not any(path.iterdir()):
            path.rmdir()
            removed.append(name)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
