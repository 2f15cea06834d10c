"""The runtime: accelerate's ``Accelerator``, created once and used only where it works.

accelerate does devices, mixed precision, DDP and DeepSpeed (FSDP when set in accelerate's
config); ``fsdp=`` (``runtime.fsdp`` in a recipe) shards with FSDP2 directly
(:mod:`hookengine.core.fsdp`, docs/DISTRIBUTED.md). Its wrappers also cost
about 200 µs per step on a small model (bench/step_overhead.py), so the optimizer is wrapped and
``accelerator.backward`` is used only when they do something (a gradient scaler,
DeepSpeed, FSDP); plain single-device fp32/bf16 training calls torch directly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["Runtime"]

_FLAGS = ("num_processes", "process_index", "is_main_process", "distributed", "wraps_optimizer", "sharded", "deepspeed")


class Runtime:
    """Devices, processes, precision and seeding for one engine.

    Args:
        seed: seeds Python, NumPy and torch on every process (accelerate's ``set_seed``).
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` (as accelerate).
        cpu: force the CPU even when a GPU is there.
        timeout_s: how long a collective may wait for the other ranks before failing.
        fsdp: shard models with FSDP2 (``fully_shard``) when several processes run: a mapping
            of :class:`hookengine.core.fsdp.FsdpOptions` or ``True``; checkpoints are then
            sharded (``torch.distributed.checkpoint``) and resume on any number of processes.
        accelerator_options: more keyword arguments for ``accelerate.Accelerator``.
    """

    def __init__(
        self,
        seed: int | None = 0,
        mixed_precision: str = "no",
        cpu: bool = False,
        timeout_s: float = 300.0,
        fsdp: Any = None,
        **accelerator_options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        self.fsdp = fsdp
        self.seed = seed
        self.mixed_precision = mixed_precision
        self.cpu = cpu
        self.accelerator_options = accelerator_options
        self._accelerator: Any = None
        self._swapped: dict[int, Any] = {}  # old parameter id -> its sharded parameter
        self._deepspeed_model: Any = None  # the trained model, prepared with its optimizer

    @property
    def fsdp(self) -> Any:
        """The FSDP options (:class:`hookengine.core.fsdp.FsdpOptions`) or ``None``."""
        return self._fsdp

    @fsdp.setter
    def fsdp(self, value: Any) -> None:
        if value is not None and value is not False:
            from .fsdp import fsdp_options

            value = fsdp_options(value)
        self._fsdp = value or None

    @property
    def accelerator(self) -> Any:
        """The one ``Accelerator`` of this engine (created on first use)."""
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import set_seed

            from datetime import timedelta

            from accelerate.utils import InitProcessGroupKwargs

            # A bounded collective timeout: if a rank dies, the others fail instead of hanging.
            handlers = list(self.accelerator_options.pop("kwargs_handlers", []))
            handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=self.timeout_s)))
            _elastic_process_group(self.timeout_s)  # a torchelastic restart: a fresh store prefix
            self._accelerator = Accelerator(
                mixed_precision=self.mixed_precision, cpu=self.cpu or _cpu_processes(), kwargs_handlers=handlers,
                **self.accelerator_options,
            )
            if self.seed is not None:
                set_seed(self.seed)
            self._cache_flags()
        return self._accelerator

    def _cache_flags(self) -> None:
        # Read once: the hot path asks every step, and accelerate's properties are not free.
        from accelerate.utils import DistributedType

        acc = self._accelerator
        self.num_processes = acc.num_processes
        self.process_index = acc.process_index
        self.is_main_process = acc.is_main_process
        self.distributed = self.num_processes > 1
        self.sharded = self._fsdp is not None and self.distributed
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed and self._fsdp is not None:
            raise ValueError("runtime.fsdp cannot be combined with DeepSpeed (accelerate's config): choose one")
        self.wraps_optimizer = (
            getattr(acc, "scaler", None) is not None
            or acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        )

    @property
    def started(self) -> bool:
        return self._accelerator is not None

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def __getattr__(self, name: str) -> Any:
        # num_processes, process_index, is_main_process, distributed, wraps_optimizer:
        # plain attributes once the accelerator exists; asking for one starts it.
        if name in _FLAGS and self.__dict__.get("_accelerator") is None:
            self.accelerator  # noqa: B018 - creates it and caches the flags
            return self.__dict__[name]
        raise AttributeError(name)

    def prepare_model(self, model: Any) -> Any:
        """Move ``model`` to the device and wrap it for DDP/FSDP when distributed."""
        acc = self.accelerator
        if self.sharded:
            from .fsdp import shard_model

            self._swapped.update(shard_model(model, self._fsdp, acc.device))
            return model
        if self.deepspeed:
            # accelerate builds DeepSpeed's engine from the model and its optimizer together:
            # the model waits for prepare_optimizer (and forwards as itself meanwhile).
            if self._deepspeed_model is not None and self._deepspeed_model is not model:
                raise ValueError("DeepSpeed (accelerate's config) trains one model per run; this recipe trains several")
            self._deepspeed_model = model
            return model.to(acc.device)
        if self.distributed or self.wraps_optimizer:
            return acc.prepare_model(model)
        return model.to(acc.device)

    def prepare_optimizer(self, optimizer: Any) -> Any:
        if self._swapped:  # built before its models were sharded
            from .fsdp import swap_parameters

            swap_parameters(getattr(optimizer, "optimizer", optimizer), self._swapped)
        if self.deepspeed:
            return self._prepare_deepspeed(optimizer)
        if self.wraps_optimizer:
            return self.accelerator.prepare_optimizer(optimizer)
        return optimizer

    def _prepare_deepspeed(self, optimizer: Any) -> Any:
        acc = self.accelerator
        if self._deepspeed_model is None:
            raise ValueError("DeepSpeed (accelerate's config): no trained model was prepared before its optimizer")
        config = acc.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu") == "auto":
            # accelerate reads it from a prepared data loader; hookengine's loaders are its own.
            config["train_micro_batch_size_per_gpu"] = 1
        _engine, optimizer = acc.prepare(self._deepspeed_model, optimizer)
        return optimizer

    def backward(self, loss: Any) -> None:
        if self.wraps_optimizer:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager[Any]:
        """Autocast for the run's precision, or for ``precision`` (a phase's) when given.

        A phase may switch between ``no`` and ``bf16`` freely (no gradient scaler is
        involved); ``fp16`` needs the scaler that only a run started in fp16 has.
        """
        precision = precision or self.mixed_precision
        if precision == "no":
            return contextlib.nullcontext()
        if precision == self.mixed_precision:
            return self.accelerator.autocast()
        if precision == "bf16":
            import torch

            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        raise ValueError(
            f"a phase asks for precision {precision!r} but the run started with {self.mixed_precision!r}: "
            "fp16 needs a gradient scaler, so set runtime.mixed_precision=fp16 for the whole run"
        )

    @contextlib.contextmanager
    def no_sync(self, models: list[Any]) -> Iterator[None]:
        """Skip DDP's gradient all-reduce / FSDP's reduce-scatter (micro-steps inside an accumulation)."""
        with contextlib.ExitStack() as stack:
            for model in models:
                if hasattr(model, "no_sync"):
                    stack.enter_context(model.no_sync())
                elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                    model.set_requires_gradient_sync(False)
                    stack.callback(model.set_requires_gradient_sync, True)
            yield

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model) if self.started else model

    def wait_for_everyone(self) -> None:
        if self.started and self.distributed:
            self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Synchronise then end (a barrier first avoids gloo's exit-time crash)."""
        if self._accelerator is not None:
            self.wait_for_everyone()
            self._accelerator.end_training()


def _elastic_process_group(timeout_s: float) -> None:
    """After a torchelastic restart, start the process group on a store prefixed by the restart
    count: torchrun's agent keeps one store for all attempts, and the first attempt's addresses
    left in it make the new group connect to dead workers ("Connection refused")."""
    import os

    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restarts == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    world, timeout = int(os.environ["WORLD_SIZE"]), timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(store=dist.PrefixStore(f"hookengine/restart_{restarts}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def _cpu_processes() -> bool:
    """Several processes (torchrun, accelerate launch) on a machine with no GPU.

    accelerate only picks its multi-CPU (gloo) mode when told ``cpu=True``; without it
    every process would silently train alone.
    """
    import os

    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not has_accelerator
