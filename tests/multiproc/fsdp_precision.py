"""Run as a script: one gloo process shards a tiny model with ``runtime.fsdp.mixed_precision``
and prints what dtypes the forward, the sharded weights and the gradients have (JSON)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from hookengine.core.fsdp import fsdp_options, shard_model


def main(precision: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    old = list(model.parameters())
    swapped = shard_model(model, fsdp_options({"mixed_precision": precision}), torch.device("cpu"))
    out = model(torch.ones(3, 4))
    out.float().sum().backward()
    params = list(model.parameters())
    print(json.dumps({
        "output": str(out.dtype), "weights": sorted({str(p.dtype) for p in params}),
        "grads": sorted({str(p.grad.dtype) for p in params}), "types": sorted({type(p).__name__ for p in params}),
        "swapped": len(swapped) == len(old) and all(swapped[id(p)][1] is q for p, q in zip(old, params)),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
