"""Sharded checkpoints of FSDP runs through ``torch.distributed.checkpoint`` (DCP).

The models' and optimizers' tensors leave the checkpoint tree and go to
``step-N/shards/``: every process writes its own shards as safetensors files
(DCP's ``HuggingFaceStorageWriter`` with ``save_distributed``), with each tensor's
place in the global tensor in the file's header. Nothing is pickled (DCP's default
format keeps its metadata in a pickle). The rest of the tree (clock, RNG, optimizer
param groups, the keys that were saved) stays in ``state.json``/``tensors.safetensors``
as in every checkpoint, under ``sharded``.

Loading reads the headers, so any number of processes can resume: each reads the
pieces of the global tensors that its own shards (or, unsharded, whole tensors) need.
Optimizer tensors are keyed by the optimizer's parameter index, which does not depend
on the number of processes (the same recipe builds the same parameter order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FOLDER", "FORMAT", "split_tree", "save_shards", "restore_tree"]

FOLDER = "shards"
FORMAT = "hookengine-dcp-safetensors/1"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def split_tree(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tree without model/optimizer tensors, {flat key: tensor})`` of an engine state tree."""
    shards: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for name, entries in tree.get("models", {}).items():
        keys = [k for k, v in entries.items() if _is_tensor(v)]
        shards.update({f"models/{name}/{k}": entries[k] for k in keys})
        models[name] = {"tensors": keys, "other": {k: v for k, v in entries.items() if not _is_tensor(v)}}
    optimizers: dict[str, Any] = {}
    for name, saved in tree.get("optimizers", {}).items():
        state = {}
        for index, values in saved.get("state", {}).items():
            keys = [k for k, v in values.items() if _is_tensor(v)]
            shards.update({f"optimizers/{name}/{index}/{k}": values[k] for k in keys})
            state[index] = {"tensors": keys, "other": {k: v for k, v in values.items() if not _is_tensor(v)}}
        optimizers[name] = {"state": state, "param_groups": saved.get("param_groups", [])}
    rest = {**tree, "models": {}, "optimizers": {}}
    rest["sharded"] = {"format": FORMAT, "folder": FOLDER, "models": models, "optimizers": optimizers}
    return rest, shards


def save_shards(shards: dict[str, Any], folder: Path) -> None:
    """Write ``shards`` to ``folder`` (collective: every process calls it with its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    # Plain tensors are written whole; DTensors as this process's shard with its offsets.
    shards = {k: v.detach() for k, v in shards.items()}
    dcp.save(shards, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def restore_tree(tree: dict[str, Any], state: Any, path: Path) -> dict[str, Any]:
    """``tree`` with its models and optimizers read back from ``path``'s shards (collective).

    Model entries are read into new tensors shaped like the live ones (sharded or
    whole), so the model itself changes only when the engine loads the tree; optimizer
    state is created (torch's zero-gradient step with lr 0) and read into.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    meta = tree["sharded"]
    if meta.get("format") != FORMAT:
        raise KeyError(f"sharded checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    targets: dict[str, Any] = {}
    models: dict[str, Any] = {}
    live_models = state.checkpointed_models()
    for name, info in meta["models"].items():
        if name not in live_models:
            continue  # the engine names missing/extra models in one error
        live = state.unwrap(live_models[name]).state_dict()
        entries = {}
        for key in info["tensors"]:
            if key not in live:
                raise KeyError(f"checkpoint's model {name!r} has {key!r}, which the model lacks")
            entries[key] = torch.empty_like(live[key])
            targets[f"models/{name}/{key}"] = entries[key]
        models[name] = {**info["other"], **entries}
    optimizers: dict[str, Any] = {}
    for name, info in meta["optimizers"].items():
        optimizer = state.optimizers.get(name)
        if optimizer is None:
            continue
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        _init_optim_state(inner)
        live = inner.state_dict()["state"]
        saved_state = {}
        for index, entry in info["state"].items():
            if index not in live and entry["tensors"]:
                raise KeyError(f"optimizer {name!r} has no state for parameter {index}; same model and optimizer?")
            values = {k: torch.empty_like(live[index][k]) for k in entry["tensors"]}
            targets.update({f"optimizers/{name}/{index}/{k}": v for k, v in values.items()})
            saved_state[index] = {**entry["other"], **values}
        optimizers[name] = {"state": saved_state, "param_groups": info["param_groups"]}
    if targets:
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(Path(path) / meta["folder"])))
    return {**tree, "models": models, "optimizers": optimizers}
