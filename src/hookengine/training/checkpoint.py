"""Save and resume the engine's whole state: the ``checkpoint`` plugin.

The files (safetensors and JSON, no pickle; a manifest of SHA-256 hashes; atomic
placement) are :mod:`.checkpoint_files`; the run folder's lock is :mod:`.run_lock`; the
run shape compared on resume is :mod:`.run_signature`. Everything they export that other
code used from here is re-exported.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from ..core.points import BASE_PRIORITY
from .checkpoint_files import (
    META as _META,
    PREFIX as _PREFIX,
    CheckpointError,
    CorruptCheckpointError,
    checkpoints_in,
    clean_stale,
    latest_checkpoint,
    load_tree,
    save_tree,
    staging_folder,
    write_checkpoint,
)
from .run_lock import RunLock, RunLockError
from .run_signature import compare_signatures, run_signature

__all__ = [
    "Checkpointing", "CheckpointError", "CorruptCheckpointError", "RunLockError", "save_tree", "load_tree",
    "latest_checkpoint", "checkpoints_in", "write_checkpoint",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------- plugin
class Checkpointing:
    """Save and resume the whole engine state (slots ``save_checkpoint``/``load_checkpoint``).

    Every checkpoint carries a manifest of SHA-256 hashes, checked on load, and the run's
    shape (processes, batch size per process, gradient accumulation per phase), compared on
    resume. At the start of a run the main process locks the run folder (``run.lock``: a
    second run into it is refused, naming the first) and removes what killed runs left
    behind (temporary checkpoint folders of dead processes, empty step folders).

    Args:
        every: save every N optimizer steps (0: only at the end and on request).
        keep_last: how many checkpoints to keep (0 keeps all).
        resume: ``None`` (start fresh); ``"latest"`` (the newest valid checkpoint in the
            folder: damaged ones are skipped, each with a one-line reason; with no
            checkpoint at all the run says so and starts from scratch); ``"required"``
            (as ``latest``, but no checkpoint is a one-line error); or a path (a
            checkpoint, or a folder of them: its newest valid one).
        folder: where checkpoints go; default ``RUN_DIR/checkpoints``.
        save_at_end: write a final checkpoint when the run ends normally.
        background: write files on a background thread; training goes on meanwhile.
            The state is copied first (a snapshot), the next save waits for the previous
            write, and the run waits for the last one before it ends. Sharded checkpoints
            (``runtime.fsdp``: every process writes its shards) are written in the foreground.
        lock: lock the run folder (``RUN_DIR/run.lock``, or ``folder`` when the run has no
            run folder) for the run's duration, so two runs never write into one folder.
        shape_check: what a resume does when the run's shape changed in a way that is not
            exact (another global batch or gradient accumulation in the checkpoint's phase,
            other phases before it): ``refuse`` (a one-line error listing old → new) or
            ``warn`` (say so and go on).
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
        lock: bool = True,
        shape_check: Literal["refuse", "warn"] = "refuse",
    ) -> None:
        if every < 0 or keep_last < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0")
        self.every = every
        self.keep_last = keep_last
        self.resume = resume
        self.folder = folder
        self.save_at_end = save_at_end
        self.background = background
        self.lock = lock
        self.shape_check = shape_check
        self.last_saved: Path | None = None
        self.resumed_from: Path | None = None
        self._pending: Any = None  # the Future of a background write
        self._executor: Any = None
        self._lock: RunLock | None = None
        self._verified: tuple[Path, Any] | None = None  # a tree checked while choosing, loaded next

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("save_checkpoint", self._save, priority=BASE_PRIORITY)  # base implementation
        engine.attach("load_checkpoint", self._load, priority=BASE_PRIORITY)
        # First: refuse a second run before any plugin builds models or reads data.
        engine.on("setup", self._start, priority="first")
        engine.on("resume", self._resume)
        if self.every:
            engine.on("step_end", self._request, every=self.every)
        engine.on("run_end", self._final)
        engine.on("teardown", self._teardown)

    @property
    def directory(self) -> Path:
        if self.folder:
            return Path(self.folder)
        run_dir = self.engine.state.run_dir or "runs/default"
        return Path(run_dir) / "checkpoints"

    def say(self, message: str) -> None:
        """Print (main process only) and log one line about checkpoints."""
        logger.info(message)
        if self.engine.state.is_main_process:
            print(f"hookengine: {message}", flush=True)

    # ------------------------------------------------------------ start / end
    def _start(self, state: Any) -> None:
        if not state.is_main_process:
            return
        where = state.run_dir or self.folder
        if self.lock and where and self._lock is None:
            self._lock = RunLock(where).acquire()
            message = self._lock.takeover_message()
            if message:
                self.say(message)
        removed = clean_stale(self.directory)
        if removed:
            self.say(f"removed {len(removed)} leftover(s) of killed runs in {self.directory}: {', '.join(removed)}")

    def _teardown(self, state: Any) -> None:
        try:
            self.wait()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ save
    def _save(self, next_impl: Any, folder: str | None = None) -> Path | None:
        engine = self.engine
        tree = engine.state_dict()
        tree["run_signature"] = run_signature(engine.state, getattr(engine.runtime, "num_processes", 1))
        step = engine.state.clock.step
        if engine.runtime.distributed:
            # Every rank has its own RNG stream (dropout, noise): keep them all.
            from accelerate.utils import gather_object

            tree["rng_per_rank"] = gather_object([tree["rng"]])
        engine.runtime.wait_for_everyone()
        target = Path(folder) if folder else self.directory
        staged = self._save_shards(tree, target, step) if engine.runtime.fsdp is not None else None
        if staged is not None:
            tree = staged[0]
        path = None
        if engine.state.is_main_process:
            path = target / f"{_PREFIX}{step:08d}"
            if staged is not None:  # every process wrote its shards; written in the foreground
                write_checkpoint(tree, target, step, self.keep_last, staged=staged[1])
            elif self.background:
                self.wait()  # one write at a time, in order
                snapshot = _snapshot(tree)
                self._pending = self._pool().submit(write_checkpoint, snapshot, target, step, self.keep_last)
            else:
                write_checkpoint(tree, target, step, self.keep_last)
            self.last_saved = path
            engine.fire("checkpoint_saved", path=path)
        engine.runtime.wait_for_everyone()
        # On every rank: _final decides from it whether to save again, and a save is collective.
        self.last_saved = target / f"{_PREFIX}{step:08d}"
        return path

    def _save_shards(self, tree: dict[str, Any], target: Path, step: int) -> tuple[dict[str, Any], Path]:
        """Every process writes its model/optimizer shards into the main process's staging folder
        (scale/fsdp_checkpoint.py); returns the tree without them and that folder."""
        from .checkpoint_shards import FOLDER, save_shards, split_tree

        self.wait()  # a background write of a plain checkpoint still going
        runtime = self.engine.runtime
        staging = [str(staging_folder(target, step))]
        if runtime.distributed:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(staging, from_process=0)
        staged = Path(staging[0])
        if runtime.is_main_process and staged.exists():
            shutil.rmtree(staged)
        runtime.wait_for_everyone()
        tree, shards = split_tree(tree)
        save_shards(shards, staged / FOLDER)
        runtime.wait_for_everyone()
        return tree, staged

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

    # ------------------------------------------------------------------ load
    def _read(self, path: Path) -> Any:
        """The tree of checkpoint ``path``, verified and checked in shape (CorruptCheckpointError)."""
        tree = load_tree(path)
        _check_tree(path, tree, self.engine.state.clock)
        return tree

    def newest_valid(self, folder: Path) -> tuple[Path, Any]:
        """The newest checkpoint in ``folder`` whose files are intact, and its tree.

        Damaged ones are skipped, each with a line saying why; none intact is a CheckpointError.
        """
        found = checkpoints_in(folder)
        if not found:
            raise CheckpointError(f"no complete checkpoint in {folder}")
        reasons = []
        for path in reversed(found):
            try:
                return path, self._read(path)
            except CorruptCheckpointError as exc:
                reasons.append(str(exc))
                self.say(f"resume: skipping {exc}")
        raise CheckpointError(
            f"no valid checkpoint in {folder}: all {len(found)} are damaged (the newest: {reasons[0]})"
        )

    def _load(self, next_impl: Any, path: str | Path) -> Path:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        cached, self._verified = self._verified, None
        if cached is not None and cached[0] == path:
            tree = cached[1]
        elif (path / _META).is_file():
            tree = self._read(path)
        else:  # a checkpoints folder: its newest valid one
            path, tree = self.newest_valid(path)
        self._check_shape(path, tree)
        try:
            if "sharded" in tree:  # written by an FSDP run: read on any number of processes
                from .checkpoint_shards import restore_tree

                tree = restore_tree(tree, self.engine.state, path)
            self.engine.load_state_dict(tree)
        except CheckpointError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
            raise CheckpointError(f"checkpoint {path}: {_META} does not fit this run: {_one_line(text)}") from exc
        runtime = self.engine.runtime
        per_rank = tree.get("rng_per_rank")
        if per_rank and len(per_rank) == runtime.num_processes:
            from ..core.state import restore_rng

            restore_rng(per_rank[runtime.process_index])
        self.resumed_from = path
        self.say(f"resumed from {path} (step {self.engine.state.clock.step})")
        self.engine.fire("checkpoint_loaded", path=path)
        return path

    def _check_shape(self, path: Path, tree: dict[str, Any]) -> None:
        engine = self.engine
        current = run_signature(engine.state, getattr(engine.runtime, "num_processes", 1))
        refuse, handled = compare_signatures(tree.get("run_signature"), current, tree["clock"])
        for line in handled:
            self.say(f"resume: {line}; continuing")
        if not refuse:
            return
        changes = "; ".join(refuse)
        if self.shape_check == "warn":
            self.say(f"resume: the run's shape changed ({changes}); continuing (checkpoint.shape_check=warn)")
            return
        raise CheckpointError(
            f"checkpoint {path} was made by a run of another shape: {changes}. Resume with the old settings, "
            "or set checkpoint.shape_check=warn to continue anyway"
        )

    def _resume(self, state: Any) -> None:
        from .elastic import resume_mode

        mode = resume_mode(self.resume, self.say)  # restarted by torchelastic: "latest"
        if not mode:
            return
        if mode in ("latest", "required"):
            folder = self.directory
            if not checkpoints_in(folder):
                if mode == "required":
                    raise CheckpointError(f"checkpoint.resume=required, but there is no checkpoint in {folder}")
                self.say(f"no checkpoint in {folder}; starting from scratch")
                return
        else:
            folder = Path(mode)
            if not folder.exists():
                raise CheckpointError(f"checkpoint {folder} does not exist")
        if not (folder / _META).is_file():
            # Choose here, so wrappers of load_checkpoint (lora_sched) see the checkpoint itself.
            self._verified = self._choose(folder)
            folder = self._verified[0]
        try:
            self.engine.call("load_checkpoint", folder)
        finally:
            self._verified = None  # not kept alive if a wrapper loaded something else

    def _choose(self, folder: Path) -> tuple[Path, Any]:
        """The newest valid checkpoint of ``folder``, chosen by the main process for all of them:
        a rank that read a file differently must not resume from another step."""
        runtime = self.engine.runtime
        if not runtime.distributed:
            return self.newest_valid(folder)
        from accelerate.utils import broadcast_object_list

        chosen: tuple[Path, Any] | None = None
        message = ["", ""]  # [path, error]
        if runtime.is_main_process:
            try:
                chosen = self.newest_valid(folder)
                message[0] = str(chosen[0])
            except CheckpointError as exc:
                message[1] = str(exc)
        broadcast_object_list(message, from_process=0)
        if message[1]:
            raise CheckpointError(message[1])
        if chosen is None:
            path = Path(message[0])
            chosen = (path, self._read(path))
        return chosen

    def _request(self, state: Any) -> None:
        # The loop serves the request after all step_end listeners (one save path).
        state.control.checkpoint_now()

    def _final(self, state: Any) -> None:
        if self.save_at_end and (self.last_saved is None or not self.last_saved.name.endswith(f"{state.clock.step:08d}")):
            self.engine.call("save_checkpoint")
        self.wait()


_TREE_TYPES = {"clock": dict, "metrics": dict, "models": dict, "optimizers": dict, "plugins": dict, "rng": dict}


def _check_tree(path: Path, tree: Any, clock: Any) -> None:
    """The top of a checkpoint's tree has the types the engine reads (before anything is loaded):
    mappings where mappings go, and clock values of the types of ``clock``'s."""
    where = f"checkpoint {path}: {_META}"
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"{where} holds a {type(tree).__name__}, not a mapping")
    if "clock" not in tree:
        raise CorruptCheckpointError(f"{where} has no 'clock'")
    for key, kind in _TREE_TYPES.items():
        if key in tree and not isinstance(tree[key], kind):
            raise CorruptCheckpointError(f"{where}: {key!r} is a {type(tree[key]).__name__}, expected a mapping")
    for key, value in tree["clock"].items():
        current = getattr(clock, key, None)
        if isinstance(current, int) and (not isinstance(value, int) or isinstance(value, bool)):
            raise CorruptCheckpointError(f"{where}: clock.{key} is {value!r}, expected an integer")
        if isinstance(current, str) and not isinstance(value, str):
            raise CorruptCheckpointError(f"{where}: clock.{key} is {value!r}, expected a string")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


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
