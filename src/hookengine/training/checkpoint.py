"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``step-00000120/`` holding ``tensors.safetensors`` and
``state.json``. It is written under a temporary name and renamed when complete, so a
killed process never leaves a half-written checkpoint that ``--resume`` would pick.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..core.points import BASE_PRIORITY

__all__ = ["Checkpointing", "CheckpointError", "save_tree", "load_tree", "latest_checkpoint"]

_PREFIX = "step-"
_TENSORS = "tensors.safetensors"
_META = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run."""


# --------------------------------------------------------------- tree <-> files
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


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__dtype__" in obj:
        import torch

        return getattr(torch, obj["__dtype__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(tree: Any, folder: Path) -> None:
    """Write ``tree`` (dicts, lists, tuples, numbers, strings, tensors, arrays) to ``folder``."""
    from safetensors.torch import save_file

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
    save_file(ready, str(folder / _TENSORS))
    with open(folder / _META, "w") as f:
        json.dump(encoded, f)
        f.flush()
        os.fsync(f.fileno())


def load_tree(folder: Path) -> Any:
    """Read what :func:`save_tree` wrote; errors name the folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta, weights = folder / _META, folder / _TENSORS
    for path in (meta, weights):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(str(weights))
        with open(meta) as f:
            encoded = json.load(f)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {folder} cannot be read: {exc}") from exc
    return _decode(encoded, tensors)


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        name = path.name
        if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and (path / _META).is_file():
            found.append((int(name[len(_PREFIX):]), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints_in(Path(folder))
    return found[-1] if found else None


def write_checkpoint(tree: Any, folder: Path, step: int, keep_last: int | None) -> Path:
    """Write atomically as ``folder/step-NNNNNNNN`` and prune to the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:08d}"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_tree(tree, tmp)
    if final.exists():  # the same step saved again (e.g. at the end of a run)
        old = folder / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(folder)
    if keep_last:
        for stale in checkpoints_in(folder)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------- plugin
class Checkpointing:
    """Save and resume the whole engine state (slots ``save_checkpoint``/``load_checkpoint``).

    Args:
        every: save every N optimizer steps (0: only at the end and on request).
        keep_last: how many checkpoints to keep (0 keeps all).
        resume: ``None`` (start fresh), ``"latest"`` (newest in the folder, if any), or a path.
        folder: where checkpoints go; default ``RUN_DIR/checkpoints``.
        save_at_end: write a final checkpoint when the run ends normally.
        background: write files on a background thread; training goes on meanwhile.
            The state is copied first (a snapshot), the next save waits for the previous
            write, and the run waits for the last one before it ends.
    """

    name = "checkpoint"

    def __init__(
        self,
        every: int = 0,
        keep_last: int = 2,
        resume: str | None = None,
        folder: str | None = None,
        save_at_end: bool = True,
        background: bool = False,
    ) -> None:
        if every < 0 or keep_last < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0")
        self.every = every
        self.keep_last = keep_last
        self.resume = resume
        self.folder = folder
        self.save_at_end = save_at_end
        self.background = background
        self.last_saved: Path | None = None
        self._pending: Any = None  # the Future of a background write
        self._executor: Any = None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("save_checkpoint", self._save, priority=BASE_PRIORITY)  # base implementation
        engine.attach("load_checkpoint", self._load, priority=BASE_PRIORITY)
        engine.on("resume", self._resume)
        if self.every:
            engine.on("step_end", self._request, every=self.every)
        engine.on("run_end", self._final)
        engine.on("teardown", lambda state: self.wait())

    @property
    def directory(self) -> Path:
        if self.folder:
            return Path(self.folder)
        run_dir = self.engine.state.run_dir or "runs/default"
        return Path(run_dir) / "checkpoints"

    def _save(self, next_impl: Any, folder: str | None = None) -> Path | None:
        engine = self.engine
        tree = engine.state_dict()
        step = engine.state.clock.step
        if engine.runtime.distributed:
            # Every rank has its own RNG stream (dropout, noise): keep them all.
            from accelerate.utils import gather_object

            tree["rng_per_rank"] = gather_object([tree["rng"]])
        engine.runtime.wait_for_everyone()
        path = None
        if engine.state.is_main_process:
            target = Path(folder) if folder else self.directory
            path = target / f"{_PREFIX}{step:08d}"
            if self.background:
                self.wait()  # one write at a time, in order
                snapshot = _snapshot(tree)
                self._pending = self._pool().submit(write_checkpoint, snapshot, target, step, self.keep_last)
            else:
                write_checkpoint(tree, target, step, self.keep_last)
            self.last_saved = path
            engine.fire("checkpoint_saved", path=path)
        engine.runtime.wait_for_everyone()
        return path

    def wait(self) -> None:
        """Block until a background write has finished; re-raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _pool(self) -> Any:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookengine-checkpoint")
        return self._executor

    def _load(self, next_impl: Any, path: str | Path) -> Path:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not (path / _META).is_file():  # a checkpoints folder: take its newest
            newest = latest_checkpoint(path)
            if newest is None:
                raise CheckpointError(f"no complete checkpoint in {path}")
            path = newest
        tree = load_tree(path)
        self.engine.load_state_dict(tree)
        runtime = self.engine.runtime
        per_rank = tree.get("rng_per_rank")
        if per_rank and len(per_rank) == runtime.num_processes:
            from ..core.state import restore_rng

            restore_rng(per_rank[runtime.process_index])
        self.engine.fire("checkpoint_loaded", path=path)
        return path

    def _resume(self, state: Any) -> None:
        if not self.resume:
            return
        if self.resume == "latest":
            newest = latest_checkpoint(self.directory)
            if newest is not None:
                self.engine.call("load_checkpoint", newest)
            return
        self.engine.call("load_checkpoint", self.resume)

    def _request(self, state: Any) -> None:
        # The loop serves the request after all step_end listeners (one save path).
        state.control.checkpoint_now()

    def _final(self, state: Any) -> None:
        if self.save_at_end and (self.last_saved is None or not self.last_saved.name.endswith(f"{state.clock.step:08d}")):
            self.engine.call("save_checkpoint")
        self.wait()


def _snapshot(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors no longer change as training goes on."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_snapshot(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_snapshot(v) for v in tree)
    return copy.deepcopy(tree)
