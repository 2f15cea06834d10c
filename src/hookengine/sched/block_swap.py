"""The ``block_swap`` plugin: keep some of a model's repeated blocks on an offload device.

Models bigger than the accelerator's memory still train when their blocks take turns
(kohya's ``blocks_to_swap``, OneTrainer's layer offloading): the weights of ``count`` blocks
live on the offload device (the CPU) and each is copied to the compute device just before
its forward, dropped right after it, copied again just before its backward and dropped when
its backward is done. Only one swapped block (two with prefetch) is on the compute device
at a time.

How, with module hooks only (no ``autograd.Function``):

- a forward pre-hook copies the block's parameters up (``param.data`` becomes the compute
  copy; the offload tensor is kept), a forward hook drops them (``param.data`` is the
  offload tensor again);
- while the block runs forward, ``torch.autograd.graph.saved_tensors_hooks`` replaces every
  tensor autograd saves that is a view of one of the block's compute copies with a
  reference (parameter, size, stride, offset); unpacking rebuilds it from whatever copy is
  current, so the compute copies are really freed between forward and backward;
- a full backward pre-hook copies the parameters up again (and moves an accumulated
  gradient with them), a full backward hook drops them and moves their gradients to the
  offload device; unpacking a saved tensor also brings the block up when torch's order
  reaches it first or again (skip connections), and a callback queued on autograd's engine
  drops every block when the backward pass ends, so the optimizer always finds the weights
  and gradients on the offload device.

The optimizer steps the swapped blocks' parameters where they live (the offload device),
with their gradients and optimizer state there too: use ``foreach`` (``fused: auto`` knows).
Swapped parameters stay on the offload device when the model is placed (``model.to``), so
the compute device never holds the whole model. Values are unchanged: losses and gradients
equal the plain path's (tests/sched/test_block_swap.py, where both tiers are the CPU and
the compute copies are separate tensors).

On CUDA the offload copies are pinned and the next block is prefetched on a side stream
(untested here: this machine has no GPU). Single process only (DDP wants every parameter
on one device). Convert the model's dtype before the swap is installed: a later
``model.to(dtype)`` leaves the swapped weights as they are. Combined with gradient
checkpointing and compiled blocks it trains as the plain path on CPU
(tests/sched/test_memory.py, the recipe test).

In a recipe::

    plugins:
      swap:
        use: block_swap
        blocks: lm.model.layers.*
        count: 20
"""

from __future__ import annotations

from typing import Any

from ..core.module_hooks import unwrap
from .checkpointing import matched_modules

__all__ = ["BlockSwap", "SwappedBlock"]

_OFFLOADED = "_hookengine_offloaded"  # read by train_sched's fused/foreach "auto"


class SwappedBlock:
    """One block whose parameters live on ``offload`` and visit ``compute`` when used."""

    def __init__(self, name: str, module: Any, compute: Any, offload: Any, pin: bool, in_backward: Any = None) -> None:
        import torch

        self.name, self.module = name, module
        self.in_backward = in_backward  # called when backward brings the block up
        self.compute, self.offload = torch.device(compute), torch.device(offload)
        self.params = [p for p in module.parameters()]
        self.store: dict[int, Any] = {}
        for p in self.params:
            tensor = p.data.to(self.offload, copy=True)
            if pin and torch.cuda.is_available() and self.offload.type == "cpu":
                tensor = tensor.pin_memory()
            self.store[id(p)] = tensor
            p.data = tensor
            setattr(p, _OFFLOADED, True)
        self.loaded = False
        self.pending: Any = None  # a CUDA event when a prefetch is in flight
        self._saving: Any = None
        self._copies: set[int] = set()

    # ------------------------------------------------------------- moving
    def load(self, stream: Any = None) -> None:
        """Copy the parameters (and any gradient) to the compute device; on ``stream`` when given."""
        import torch

        if self.loaded:
            return
        context = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with context:
            for p in self.params:
                grad, p.grad = p.grad, None
                p.data = self.store[id(p)].to(self.compute, copy=True, non_blocking=stream is not None)
                if grad is not None:
                    p.grad = grad.to(self.compute, non_blocking=stream is not None)
        if stream is not None:
            self.pending = torch.cuda.Event()
            self.pending.record(stream)
        self._copies = {p.data.untyped_storage().data_ptr() for p in self.params}
        self.loaded = True

    def ready(self) -> None:
        """Make the compute stream wait for a prefetch of this block."""
        if self.pending is not None:
            import torch

            torch.cuda.current_stream().wait_event(self.pending)
            for p in self.params:
                p.data.record_stream(torch.cuda.current_stream())
            self.pending = None

    def drop(self) -> None:
        """Back to the offload tensors; gradients move to the offload device."""
        if not self.loaded:
            return
        self.ready()
        for p in self.params:
            grad, p.grad = p.grad, None
            p.data = self.store[id(p)]
            if grad is not None:
                p.grad = grad.to(self.offload)
        self._copies = set()
        self.loaded = False

    def settle(self) -> None:
        """Offloaded, with every gradient on the offload device (before an optimizer step)."""
        self.drop()
        for p in self.params:
            if p.grad is not None and p.grad.device != self.offload:
                grad, p.grad = p.grad, None
                p.grad = grad.to(self.offload)

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes for p in self.params) if self.loaded else 0

    # ------------------------------------------------------ saved tensors
    def pack(self, tensor: Any) -> Any:
        if self._copies and tensor.device == self.compute:
            try:
                ptr = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # no plain storage (sparse, fake tensors)
                return tensor
            if ptr in self._copies:
                for index, p in enumerate(self.params):
                    if p.data.untyped_storage().data_ptr() == ptr:
                        return _Ref(index, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        return tensor

    def unpack(self, packed: Any) -> Any:
        if isinstance(packed, _Ref):
            if self.in_backward is not None:
                self.in_backward()
            self.load()
            self.ready()
            return self.params[packed.index].data.as_strided(packed.size, packed.stride, packed.offset)
        return packed


class _Ref:
    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int) -> None:
        self.index, self.size, self.stride, self.offset = index, size, stride, offset


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class BlockSwap:
    """Keep ``count`` of a model's repeated blocks on an offload device; each visits the compute
    device only for its own forward and backward.

    Args:
        blocks: ``MODEL.PATH`` pattern of the repeated blocks, in the syntax of
            ``engine.hook_module`` (``unet.down_blocks.*``, ``lm.model.layers.*``,
            ``lm.transformer.h.*``).
        count: how many of the matched blocks to swap, the last ones in module order (kohya's
            ``blocks_to_swap``); default: all of them.
        offload_device: where swapped weights, their gradients and optimizer state live.
        compute_device: where blocks run (default: the run's device).
        pin_memory: pin the offload copies (CUDA only: faster, asynchronous copies).
        prefetch: on CUDA, copy the next block up on a side stream while this one runs.
    """

    name = "block_swap"

    def __init__(
        self,
        blocks: str,
        count: int | None = None,
        offload_device: str = "cpu",
        compute_device: str | None = None,
        pin_memory: bool = True,
        prefetch: bool = True,
    ) -> None:
        model, _, path = blocks.partition(".")
        if not path:
            raise ValueError(f"block_swap.blocks: {blocks!r} is not MODEL.PATH (e.g. unet.down_blocks.*)")
        if count is not None and count < 1:
            raise ValueError(f"block_swap.count: expected a positive integer, got {count!r}")
        self.model_name, self.path, self.count = model, path, count
        self.offload_device, self.compute_device = offload_device, compute_device
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.swapped: list[SwappedBlock] = []
        self._handles: list[Any] = []
        self._stream: Any = None
        self._queued = False  # a settle is queued for the end of the running backward

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._install, priority=-95)  # after adapters and the memory plugin
        engine.attach("optimizer_step", self._optimizer_step, priority="last")
        engine.on("after_backward", self._settle, priority="first")

    # ------------------------------------------------------------ install
    def _install(self, state: Any) -> None:
        from ..core.plugins import closest

        if self.model_name not in state.models:
            raise ValueError(
                f"block_swap.blocks: unknown model {self.model_name!r}{closest(self.model_name, state.models)}; "
                f"models: {sorted(state.models)}"
            )
        self.install(unwrap(state.unwrap(state.models[self.model_name])), self.compute_device or self.engine.runtime.device)

    def install(self, model: Any, compute: Any) -> list[str]:
        """Swap the matching blocks of ``model`` (used outside an engine too); their names."""
        import torch

        blocks = matched_modules(model, [self.path], f"block_swap.blocks ({self.model_name}.{self.path})")
        if self.count is not None:
            if self.count > len(blocks):
                raise ValueError(f"block_swap.count: {self.count} blocks asked, {self.model_name}.{self.path} matches {len(blocks)}")
            blocks = blocks[len(blocks) - self.count:]
        compute = torch.device(compute)
        if self.prefetch and compute.type == "cuda":
            self._stream = torch.cuda.Stream(device=compute)
        for name, module in blocks:
            block = SwappedBlock(name, module, compute, self.offload_device, self.pin_memory and compute.type == "cuda",
                                 self._settle_after_backward)
            self.swapped.append(block)
            index = len(self.swapped) - 1
            module._apply = _buffers_only(module)  # model.to(device) leaves swapped weights offloaded
            self._handles += [
                module.register_forward_pre_hook(lambda m, args, i=index: self._before_forward(i)),
                module.register_forward_hook(lambda m, args, out, i=index: self._after_forward(i), always_call=True),
                module.register_full_backward_pre_hook(lambda m, grad_out, i=index: self._before_backward(i)),
                module.register_full_backward_hook(lambda m, grad_in, grad_out, i=index: self._after_backward(i)),
            ]
        return [b.name for b in self.swapped]

    # -------------------------------------------------------------- hooks
    def _before_forward(self, index: int) -> None:
        import torch

        block = self.swapped[index]
        block.load()
        block.ready()
        if self._stream is not None and index + 1 < len(self.swapped):
            self.swapped[index + 1].load(self._stream)
        if torch.is_grad_enabled():
            block._saving = torch.autograd.graph.saved_tensors_hooks(block.pack, block.unpack)
            block._saving.__enter__()

    def _after_forward(self, index: int) -> None:
        block = self.swapped[index]
        if block._saving is not None:
            block._saving.__exit__(None, None, None)
            block._saving = None
        block.drop()

    def _before_backward(self, index: int) -> None:
        self._settle_after_backward()
        block = self.swapped[index]
        block.load()
        block.ready()
        if self._stream is not None and index > 0:
            self.swapped[index - 1].load(self._stream)

    def _after_backward(self, index: int) -> None:
        self.swapped[index].drop()

    def _settle(self) -> None:
        self._queued = False
        for block in self.swapped:
            block.settle()

    def _settle_after_backward(self) -> None:
        """Settle every block when the running backward pass ends (once per pass).

        torch's hook order does not promise that nothing of a block runs after its backward
        hook (skip connections unpack its saved tensors later and bring it up again).
        """
        if not self._queued:
            import torch

            torch.autograd.Variable._execution_engine.queue_callback(self._settle)
            self._queued = True

    def _optimizer_step(self, next_impl: Any) -> Any:
        self._settle()  # the step runs where the weights live
        return next_impl()

    @property
    def resident_bytes(self) -> int:
        """Bytes of swapped parameters on the compute device now."""
        return sum(b.resident_bytes for b in self.swapped)

    def offload_tensors(self) -> list[Any]:
        """The offload copies of every swapped parameter."""
        return [t for b in self.swapped for t in b.store.values()]

    def remove(self) -> None:
        """Take the hooks off and put every swapped parameter on the compute device for good."""
        for handle in self._handles:
            handle.remove()
        for block in self.swapped:
            block.settle()
            del block.module._apply
            for p in block.params:
                delattr(p, _OFFLOADED)
            block.module.to(block.compute)
        self._handles, self.swapped = [], []


def _buffers_only(module: Any) -> Any:
    """An ``_apply`` for ``module`` that converts its buffers but leaves its parameters alone."""
    import torch

    def _apply(fn: Any, recurse: bool = True) -> Any:
        hidden = {m: dict(m._parameters) for m in module.modules()}
        for m in hidden:
            m._parameters.clear()
        try:
            return torch.nn.Module._apply(module, fn, recurse)
        finally:
            for m, params in hidden.items():
                m._parameters.update(params)

    return _apply
