"""Memory tools on one model: plain, gradient checkpointing, block swap, both; time and memory per step.

A stack of wide residual MLP blocks (a transformer's layout without attention), trained with
AdamW on random data. Each variant reports the median step time and, on CUDA, the peak
allocated bytes (``torch.cuda.max_memory_allocated``); everywhere, the largest number of
parameter bytes that sat on the compute side during a step (block swap lowers it) and the
largest loss difference from the plain run (0 up to float rounding: the tools change no value).

Run: python bench/big_model.py [--width 1024 --depth 8 --swap 6 --steps 5]   (JSON line last)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from hookengine.sched.block_swap import BlockSwap
from hookengine.sched.checkpointing import checkpoint_modules


class Blocks(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).mean()


def run(model: nn.Module, device: torch.device, data: list[torch.Tensor], swap: BlockSwap | None) -> dict:
    offload = {t.untyped_storage().data_ptr() for t in swap.offload_tensors()} if swap else set()
    peak_params = 0

    def count(*_: object) -> None:
        nonlocal peak_params
        resident = sum(p.nbytes for p in model.parameters() if p.data.untyped_storage().data_ptr() not in offload)
        peak_params = max(peak_params, resident)

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(count)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for x in data:
        start = time.perf_counter()
        loss = model(x.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = {"step_s": statistics.median(times[1:] or times), "param_bytes_on_compute": peak_params, "losses": losses}
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--swap", type=int, default=6, help="blocks to swap")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = Blocks(args.width, args.depth)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(args.batch, 32, args.width, generator=g) for _ in range(args.steps)]
    results = {}
    for name in ("plain", "checkpointing", "block_swap", "both"):
        model = copy.deepcopy(base)
        if name in ("checkpointing", "both"):
            checkpoint_modules(model, ["blocks.*"])
        swap = None
        if name in ("block_swap", "both"):
            swap = BlockSwap("model.blocks.*", count=args.swap)
            swap.install(model, device)
        model.to(device)  # swapped weights stay on the CPU
        results[name] = run(model, device, data, swap)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain = results["plain"]["losses"]
    for name, result in results.items():
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(result.pop("losses"), plain))
        print(f"{name:14s} {result}")
    print(json.dumps({"device": device.type, **vars(args), "results": results}))


if __name__ == "__main__":
    main()
