"""FSDP2 from a recipe: ``runtime.fsdp`` shards models with ``torch.distributed.fsdp.fully_shard``.

accelerate 1.15's FSDP plugin wants the model and its optimizer prepared together and
picks its device from CUDA; hookengine builds the optimizer before the models are wrapped
(a routine may add parameter groups later) and must run on CPU/gloo as well. So the
runtime calls ``fully_shard`` itself on a 1-D device mesh over all processes, and swaps the
optimizer's parameters for the sharded ones (``fully_shard`` replaces every parameter
object by a ``DTensor`` parameter; an optimizer built before would silently update the
old, unused tensors).

With one process nothing is sharded (there is no process group to shard over); the
checkpoint format stays the sharded one, so runs of any size resume each other.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict

__all__ = ["FsdpOptions", "fsdp_options", "shard_model", "swap_parameters", "is_sharded"]


class FsdpOptions(BaseModel):
    """``runtime.fsdp``: how models are sharded.

    Args:
        units: module class names (``LlamaDecoderLayer``) sharded as units of their own
            before the whole model, so only one unit's full weights exist at a time; empty:
            the whole model is one unit.
        mixed_precision: ``no``, ``bf16`` or ``fp16``: the dtype parameters are gathered
            and computed in (FSDP's ``MixedPrecisionPolicy.param_dtype``); the sharded
            master weights and the optimizer stay in float32.
        reduce_precision: ``fp32`` (default) or ``same``: the dtype gradients are
            reduced in (``same``: the compute dtype).
        reshard_after_forward: free the gathered weights after the forward (less memory,
            one more all-gather in the backward).
    """

    model_config = ConfigDict(extra="forbid")

    units: list[str] = []
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    reduce_precision: Literal["fp32", "same"] = "fp32"
    reshard_after_forward: bool = True


def fsdp_options(value: Any) -> FsdpOptions | None:
    """``value`` (a mapping, ``True``, ``None`` or options) as :class:`FsdpOptions`; errors name the key."""
    if value is None or value is False:
        return None
    if value is True:
        return FsdpOptions()
    if isinstance(value, FsdpOptions):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"runtime.fsdp: expected a mapping of options or true, got {type(value).__name__}")
    from pydantic import ValidationError

    try:
        return FsdpOptions.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"runtime.fsdp.{where}: {first['msg']}") from None


def is_sharded(model: Any) -> bool:
    """Whether ``fully_shard`` has been applied to ``model`` (its class is an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` with every sharded ``DTensor`` gathered whole (other tensors as they are).

    A collective per sharded tensor: every process must call it with the same keys in the
    same order (files are then written by the main process alone).
    """
    return {key: value.full_tensor() if hasattr(value, "full_tensor") else value for key, value in tensors.items()}


def _policy(options: FsdpOptions) -> Any:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    param = dtypes[options.mixed_precision]
    reduce = torch.float32 if options.reduce_precision == "fp32" and param is not None else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def shard_model(model: Any, options: FsdpOptions, device: Any) -> dict[int, tuple[Any, Any]]:
    """Shard ``model`` in place over all processes.

    Returns ``{id(old parameter): (weak reference to it, new parameter)}``: the old
    tensors are not kept alive, and an id reused by another tensor later is not mistaken.

    Raises ValueError when a ``units`` name matches no module, or when ``model`` is
    already sharded (a structural change after sharding cannot be re-sharded).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        raise ValueError(
            "runtime.fsdp: a sharded model cannot be wrapped again (adapters added by a later phase, "
            "layers unfrozen after the start); add adapters and choose trainable layers before the first step"
        )
    model.to(device)
    before = dict(model.named_parameters())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "mp_policy": _policy(options), "reshard_after_forward": options.reshard_after_forward}
    found = set()
    for module in list(model.modules())[1:]:
        name = type(module).__name__
        if name in options.units and not is_sharded(module):
            fully_shard(module, **kwargs)
            found.add(name)
    missing = sorted(set(options.units) - found)
    if missing:
        raise ValueError(f"runtime.fsdp.units: no module of class {missing[0]!r} in {type(model).__name__}")
    fully_shard(model, **kwargs)
    import weakref

    after = dict(model.named_parameters())
    return {id(p): (weakref.ref(p), after[n]) for n, p in before.items() if n in after and after[n] is not p}


def swap_parameters(optimizer: Any, mapping: dict[int, tuple[Any, Any]]) -> None:
    """Point ``optimizer``'s param groups at the sharded parameters (its state must be empty)."""

    def new(p: Any) -> Any:
        ref, sharded = mapping.get(id(p), (None, None))
        return sharded if ref is not None and ref() is p else None

    for group in optimizer.param_groups:
        if any(new(p) is not None and p in optimizer.state for p in group["params"]):
            raise ValueError("runtime.fsdp: the optimizer has stepped before its model was sharded")
        group["params"] = [new(p) if new(p) is not None else p for p in group["params"]]
