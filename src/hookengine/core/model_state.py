"""What a checkpoint keeps of a model: all of it, or only what trains plus a reference to
the frozen base.

A model whose parameters all train is saved whole. A model with a frozen part (a base
under LoRA adapters, a teacher, a VAE next to a trained UNet) keeps only its *trained*
entries: parameters with ``requires_grad``, parameters some optimizer holds (layer
freezing keeps them there), PEFT adapter weights, and every buffer (BatchNorm statistics
change even under frozen weights). A model of which nothing trains (a teacher, a VAE)
is not saved at all, buffers included. The rest is the frozen base, which the run reloads
from its recipe (the model loader, a routine's ``pipeline=``); the checkpoint holds a
reference to it (the model's class and source, and a content hash of the frozen
tensors), and resuming onto a different base is refused with a clear error.

Hashing is done once per model and reused while the frozen tensors do not change
(same objects, same ``_version`` counters), so saving every N steps costs no rehash.
Torch is imported lazily, inside the functions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

__all__ = ["BaseModelChanged", "split_model_state", "load_model_state", "model_source", "frozen_fingerprint"]


class BaseModelChanged(RuntimeError):
    """The frozen base a checkpoint was trained on is not the one the run has loaded."""


def _is_keras(model: Any) -> bool:
    return any(c.__module__.startswith("keras") for c in type(model).__mro__)


def model_source(model: Any) -> str | None:
    """Where the model came from: the model loader's spec, else its ``name_or_path``."""
    for value in (
        getattr(model, "hookengine_source", None),
        getattr(model, "name_or_path", None),
        getattr(getattr(model, "config", None), "_name_or_path", None),
    ):
        if value:
            # A folder named relative to the working directory is recorded absolute, so that
            # whatever names it (a checkpoint, an exported adapter) loads from anywhere.
            return str(Path(str(value)).resolve()) if Path(str(value)).is_dir() else str(value)
    return None


def _adapter_keys(model: Any) -> set[str]:
    """State-dict keys of PEFT adapter weights (tuner layers name them in ``adapter_layer_names``)."""
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        for attribute in getattr(module, "adapter_layer_names", ()) or ():
            part = getattr(module, attribute, None)
            if part is None or not hasattr(part, "named_parameters"):
                continue
            prefix = f"{module_name}.{attribute}." if module_name else f"{attribute}."
            keys.update(prefix + name for name, _ in part.named_parameters())
    return keys


def split_model_state(
    model: Any, optimizer_params: set[int], cache: dict[str, Any], name: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(entries to save, reference to the frozen base or None)`` for one model.

    ``optimizer_params`` holds ``id()`` of every parameter some optimizer has; ``cache``
    keeps the frozen part's hash between calls (keyed by ``name``).
    """
    import torch

    if _is_keras(model):  # Keras keeps changing non-trainable variables (seed, statistics)
        return model.state_dict(), None
    live = model.state_dict(keep_vars=True)
    adapters = _adapter_keys(model)
    trained, frozen = {}, {}
    for key, value in live.items():
        is_param = isinstance(value, torch.nn.Parameter)
        if not is_param or value.requires_grad or id(value) in optimizer_params or key in adapters:
            trained[key] = value
        else:
            frozen[key] = value
    if frozen and not any(isinstance(v, torch.nn.Parameter) for v in trained.values()):
        # Nothing of it trains (a teacher, a VAE): never saved, only referenced.
        frozen, trained = dict(live), {}
    state = {k: v.detach() for k, v in trained.items()}
    if not frozen:
        return state, None
    reference = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "source": model_source(model),
        "frozen_entries": len(frozen),
        "frozen_hash": frozen_fingerprint(frozen, cache, name),
    }
    return state, reference


def frozen_fingerprint(tensors: dict[str, Any], cache: dict[str, Any], name: str) -> str:
    """A content hash of ``tensors`` (names, dtypes, shapes, bytes), reused while unchanged."""
    # A sharded (FSDP, DTensor) tensor is identified by its local shard, and hashed whole
    # (a collective every process makes in the same order), so the hash does not depend
    # on the number of processes.
    signature = [(k, id(t), t._version, _local(t).data_ptr()) for k, t in sorted(tensors.items())]
    cached = cache.get(name)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hashlib.sha256()
    for key, _, _, _ in signature:
        tensor = tensors[key].detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            import torch

            digest.update(flat.view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    cache[name] = (signature, value)
    return value


def _local(tensor: Any) -> Any:
    return getattr(tensor, "_local_tensor", tensor)


def load_model_state(
    model: Any, saved: dict[str, Any], reference: dict[str, Any] | None, cache: dict[str, Any], name: str
) -> None:
    """Load ``saved`` into ``model``; with a reference, check the frozen base first."""
    if reference is None:
        model.load_state_dict(saved)
        return
    live = model.state_dict(keep_vars=True)
    unexpected = sorted(set(saved) - set(live))
    if unexpected:
        raise KeyError(
            f"checkpoint's model {name!r} has {len(unexpected)} entries the model lacks, e.g. {unexpected[0]!r}; "
            "are the same adapters and trainable modules set up?"
        )
    frozen = {k: v for k, v in live.items() if k not in saved}
    found = frozen_fingerprint(frozen, cache, name)
    if len(frozen) != reference.get("frozen_entries") or found != reference.get("frozen_hash"):
        raise BaseModelChanged(
            f"model {name!r}: its frozen base is not the one the checkpoint was trained on "
            f"(checkpoint: {reference.get('class')} from {reference.get('source')}, {reference.get('frozen_entries')} "
            f"frozen tensors, hash {str(reference.get('frozen_hash'))[:12]}; loaded now: {model_source(model)}, "
            f"{len(frozen)} tensors, hash {found[:12]}); resume with the same base model"
        )
    model.load_state_dict(saved, strict=False)  # only trained entries: the cached hash stays valid
