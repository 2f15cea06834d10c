"""Teachers on Ray workers: each worker (a Ray actor) holds a few teachers, the trainer streams
batch inputs to them and gets their logits back, batch after batch, in order.

Each worker loads its teachers with the model loader (the same specs a local ``model_loader``
takes: a folder, file or hub id, or a mapping of :class:`~hookengine.models.loader.ModelSpec`
fields) into its own :class:`~hookengine.models.cache.ModelCache`, and runs them in eval mode
without gradients. The trainer side, :class:`RayTeachers`, puts a batch's inputs into Ray's
object store once, asks every worker at once, and gathers the answers of one batch in
teacher order; :meth:`RayTeachers.lookahead` submits the next batches' teacher work while
the current step runs.

Failures are one line: a teacher that does not load names the teacher and the worker's node;
a worker that dies, or gives no answer within ``timeout`` seconds, stops the run naming the
worker, its teachers and its node.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Iterable, Iterator

__all__ = ["RayTeachers", "RayTeacherError", "TeacherWorker"]


class RayTeacherError(RuntimeError):
    """A Ray teacher worker failed: a teacher did not load or run, the worker died or timed out."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _node() -> dict[str, Any]:
    """Where this process runs: Ray node id, IP, host name, process id."""
    import socket

    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "pid": os.getpid()}


class TeacherWorker:
    """The body of one Ray actor: a few teachers in a model cache, run on request.

    Args:
        index: the worker's number (for messages).
        specs: teacher name -> model loader spec.
        features: teacher module paths whose outputs are sent back with the logits.
        device: where the teachers run (``"cpu"``, ``"cuda"``).
        cache: options of the worker's :class:`~hookengine.models.cache.ModelCache`.
    """

    def __init__(self, index: int, specs: dict[str, Any], features: list[str], device: str,
                 cache: dict[str, Any] | None = None) -> None:
        self.index, self.specs, self.features, self.device = index, dict(specs), list(features), device
        self.cache_options = dict(cache or {})
        self.where = _node()
        self.cache: Any = None
        self.captured: dict[str, dict[str, Any]] = {}

    def _label(self) -> str:
        return f"Ray teacher worker {self.index} (node {self.where['ip']}, id {self.where['node_id'][:12]}, pid {self.where['pid']})"

    def node(self) -> dict[str, Any]:
        """Where this worker runs."""
        return dict(self.where)

    def load(self) -> str | None:
        """Load every teacher into this worker's cache; an error message instead of raising
        (one line naming the teacher and the node), ``None`` when all loaded."""
        from ..models.cache import ModelCache
        from ..models.loader import ModelLoader

        try:
            self.cache = ModelCache(device=self.device, **self.cache_options)
        except Exception as exc:  # a bad cache option: the same on every worker
            return f"distill.ray.cache: {_first_line(exc)} ({self._label()})"
        loader = ModelLoader()
        for name, spec in self.specs.items():
            try:
                model = loader.load(spec, name=name)
                if hasattr(model, "requires_grad_"):
                    model.requires_grad_(False)
                if hasattr(model, "eval"):
                    model.eval()
                self._hook(name, model)
                self.cache.add(name, model, frozen=True)  # frozen: a disk copy is written once
            except Exception as exc:
                return f"teacher {name!r} failed to load on {self._label()}: {_first_line(exc)}"
        return None

    def _hook(self, name: str, model: Any) -> None:
        from ..routines.distill import _capture  # what local distillation keeps of a module's output

        store = self.captured.setdefault(name, {})
        for path in self.features:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"distill.features: teacher {name!r} has no module {path!r}") from None
            module.register_forward_hook(_capture(store, path))

    def outputs(self, names: list[str], inputs: Any) -> dict[str, Any]:
        """``{teacher: (logits, {path: feature})}`` on the CPU for one batch, or ``{"error": message}``."""
        import torch

        from ..routines.distill import _logits

        out: dict[str, Any] = {}
        for name in names:
            try:
                with self.cache.acquire(name, self.device) as model, torch.no_grad():
                    moved = _to(inputs, self.device)
                    logits = _logits(model(**moved) if isinstance(moved, dict) else model(moved))
                    features = {p: _to(v, "cpu") for p, v in self.captured.get(name, {}).items()}
                out[name] = (_to(logits, "cpu"), features)
            except Exception as exc:
                return {"error": f"teacher {name!r} failed on {self._label()}: {_first_line(exc)}"}
        return out


def _to(value: Any, device: str) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if hasattr(value, "to") else value


def _absolute(spec: Any) -> Any:
    """A spec whose local source is an absolute path (workers need not share the trainer's
    working directory; they do need the same file system, or a hub id)."""
    from pathlib import Path

    if isinstance(spec, (str, Path)):
        return str(Path(spec).resolve()) if Path(spec).exists() else str(spec)
    if isinstance(spec, dict) and "source" in spec:
        return {**spec, "source": _absolute(spec["source"])}
    return spec


class _Pending:
    """One batch's teacher work in flight: one Ray object reference per worker."""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs


class RayTeachers:
    """Teachers spread over Ray actors, ``teachers_per_worker`` each, in teacher order.

    Args:
        teachers: teacher names, in the order their outputs are combined.
        models: teacher name -> model loader spec (a source, or a mapping of spec fields).
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``); ``None``
            joins the Ray this process already started, else starts a local one.
        teachers_per_worker: how many teachers one worker holds.
        num_cpus, num_gpus: resources Ray reserves for each worker.
        device: where workers run teachers; default ``"cuda"`` with GPUs, else ``"cpu"``.
        spread: place workers on different nodes where possible (Ray's ``SPREAD``).
        timeout: seconds to wait for one batch's teacher outputs before stopping the run.
        load_timeout: seconds to wait for the workers to start and load their teachers.
        lookahead: batches whose teacher work is submitted ahead of the step (0: none).
        cache: options of each worker's model cache (``budgets``, ``offload_dir``...).
        features: teacher module paths whose outputs come back with the logits.
    """

    def __init__(
        self,
        teachers: list[str],
        models: dict[str, Any],
        address: str | None = None,
        teachers_per_worker: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        device: str | None = None,
        spread: bool = True,
        timeout: float = 120.0,
        load_timeout: float = 600.0,
        lookahead: int = 1,
        cache: dict[str, Any] | None = None,
        features: list[str] | None = None,
    ) -> None:
        missing = [t for t in teachers if t not in (models or {})]
        if missing:
            raise ValueError(f"distill.ray.models: no spec for teacher(s) {missing}; give name -> model loader spec "
                             f"(a folder, file or hub id) for each of {list(teachers)}")
        if int(teachers_per_worker) < 1:
            raise ValueError(f"distill.ray.teachers_per_worker must be at least 1, got {teachers_per_worker!r}")
        if int(lookahead) < 0:
            raise ValueError(f"distill.ray.lookahead must be 0 or more, got {lookahead!r}")
        for key, value in (("timeout", timeout), ("load_timeout", load_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"distill.ray.{key} must be a positive number of seconds, got {value!r}")
        self.teachers = list(teachers)
        self.specs = {t: _absolute(models[t]) for t in self.teachers}
        self.address = address
        per = int(teachers_per_worker)
        self.groups = [self.teachers[i:i + per] for i in range(0, len(self.teachers), per)]
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.device = device or ("cuda" if num_gpus else "cpu")
        self.spread, self.timeout, self.load_timeout = spread, float(timeout), float(load_timeout)
        self.depth = int(lookahead)
        self.cache = dict(cache or {})
        self.features = list(features or [])
        self.workers: list[Any] = []
        self.nodes: list[dict[str, Any]] = []  # where each worker runs
        self._queue: deque[tuple[Any, _Pending]] = deque()  # (batch, its work) in submission order
        self._started_ray = False
        # submitted: batches sent to the workers; ahead: steps that found their batch already submitted
        self.stats = {"submitted": 0, "ahead": 0}

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        """Join (or start) Ray, start the workers, load their teachers; raises :class:`RayTeacherError`."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        actor = ray.remote(TeacherWorker).options(**options)
        self.workers = [actor.remote(i, {t: self.specs[t] for t in group}, self.features, self.device, self.cache)
                        for i, group in enumerate(self.groups)]
        deadline = time.monotonic() + self.load_timeout
        loads = [w.load.remote() for w in self.workers]
        nodes = [w.node.remote() for w in self.workers]
        for index, (load, node) in enumerate(zip(loads, nodes)):
            try:
                self.nodes.append(ray.get(node, timeout=max(0.0, deadline - time.monotonic())))
                error = ray.get(load, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                self.close()
                raise RayTeacherError(
                    f"distill: Ray teacher worker {index} (teachers {self.groups[index]}) did not start and load in "
                    f"{self.load_timeout:g} s (distill.ray.load_timeout); does the cluster have {self.num_cpus:g} CPU(s) "
                    f"and {self.num_gpus:g} GPU(s) free for each of {len(self.groups)} workers?"
                ) from None
            except ray.exceptions.RayError as exc:
                self.close()
                raise RayTeacherError(f"distill: Ray teacher worker {index} (teachers {self.groups[index]}) "
                                      f"failed to start: {_first_line(exc)}") from None
            if error is not None:
                self.close()
                raise RayTeacherError(f"distill: {error}")

    def _describe(self, index: int) -> str:
        where = self.nodes[index] if index < len(self.nodes) else {}
        node = f"; node {where.get('ip')}, id {str(where.get('node_id'))[:12]}" if where else ""
        return f"Ray teacher worker {index} (teachers {self.groups[index]}{node})"

    # ---------------------------------------------------------------- batches
    def submit(self, inputs: Any) -> _Pending:
        """Send one batch's inputs (CPU tensors) to every worker at once."""
        import ray

        self.stats["submitted"] += 1
        shared = ray.put(inputs)  # one copy in the object store, whatever the number of workers
        return _Pending([w.outputs.remote(group, shared) for w, group in zip(self.workers, self.groups)])

    def gather(self, pending: _Pending) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{teacher: (logits, features)}`` of one batch; waits at most ``timeout`` seconds in all."""
        import ray

        deadline = time.monotonic() + self.timeout
        out: dict[str, tuple[Any, dict[str, Any]]] = {}
        for index, ref in enumerate(pending.refs):
            try:
                answer = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RayTeacherError(f"distill: {self._describe(index)} gave no teacher outputs in "
                                      f"{self.timeout:g} s (distill.ray.timeout); stopping the run") from None
            except ray.exceptions.RayActorError as exc:
                raise RayTeacherError(f"distill: {self._describe(index)} died: {_first_line(exc)}") from None
            except ray.exceptions.RayError as exc:
                raise RayTeacherError(f"distill: {self._describe(index)} failed: {_first_line(exc)}") from None
            if "error" in answer:
                raise RayTeacherError(f"distill: {answer['error']}")
            out.update(answer)
        return {t: out[t] for t in self.teachers}

    def pending_for(self, batch: Any, inputs: Any) -> _Pending:
        """The work submitted ahead for ``batch`` (the same object), else submitted now.

        Work queued before ``batch`` (batches the loop skipped) is dropped; a batch not in the
        queue (an evaluation batch) leaves it as it is.
        """
        for position, (queued, _) in enumerate(self._queue):
            if queued is batch:
                for _ in range(position):
                    self._queue.popleft()
                self.stats["ahead"] += 1
                return self._queue.popleft()[1]
        return self.submit(inputs)

    def lookahead(self, batches: Iterable[Any], inputs_of: Any) -> Iterator[Any]:
        """Yield ``batches`` unchanged, with the teacher work of each one and of the next
        ``lookahead`` batches already submitted (batches are read that far ahead)."""
        self._queue.clear()
        if self.depth == 0:
            yield from batches
            return
        source = iter(batches)
        window: deque[Any] = deque()

        def fill() -> None:
            while len(window) <= self.depth:
                try:
                    batch = next(source)
                except StopIteration:
                    return
                self._queue.append((batch, self.submit(inputs_of(batch))))
                window.append(batch)

        fill()
        while window:
            yield window.popleft()
            fill()

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """Stop the workers (and Ray, when this object started it)."""
        self._queue.clear()
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            for worker in self.workers:
                try:
                    ray.kill(worker)
                except Exception:  # already dead
                    pass
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False
        self.workers = []
