"""Small models, data and engines for the scheduler tests (also used by the torchrun scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hookengine import Engine


class Stack(nn.Module):
    """Embedding, a stack of blocks in a ModuleList, a head: a transformer's layout in miniature."""

    def __init__(self, width: int = 16, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def stack() -> Stack:
    return Stack()


def data(engine: Any, samples: int = 96, batch_size: int = 8, shard: bool = True) -> None:
    """Registers ``train`` and ``val`` loaders of a fixed random problem (sharded over processes)."""

    def register(state: Any) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(samples, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        rank, world = 0, 1
        if shard and engine.runtime.distributed:
            rank, world = engine.runtime.process_index, engine.runtime.num_processes
        train = torch.utils.data.TensorDataset(x[rank::world], y[rank::world])
        val = torch.utils.data.TensorDataset(x[:32], y[:32])
        state.dataloaders["train"] = torch.utils.data.DataLoader(train, batch_size=batch_size)
        state.dataloaders["val"] = torch.utils.data.DataLoader(val, batch_size=16)

    engine.on("setup", register, priority=10)


def make_engine(
    run_dir: Path | str,
    *,
    trainer: dict[str, Any],
    plugins: list[tuple[str, dict[str, Any]]] = (),
    checkpoint: dict[str, Any] | None = None,
    model: str = "tests.sched.helpers:stack",
    samples: int = 96,
) -> Engine:
    engine = Engine(seed=0, run_dir=run_dir, cpu=True)
    engine.use("supervised", model=model)
    engine.use(data, samples=samples)
    for reference, options in plugins:
        engine.use(reference, **options)
    engine.use("trainer", **{"eval_at_phase_end": False, **trainer})
    if checkpoint is not None:
        engine.use("checkpoint", **checkpoint)
    return engine


def record_lrs(engine: Engine) -> list[list[float]]:
    """The lr of every group used by each optimizer step, read right before the step."""
    out: list[list[float]] = []
    engine.on(
        "before_optimizer_step",
        lambda state: out.append([float(g["lr"]) for o in state.optimizers.values() for g in o.param_groups]),
        priority=-1000,
    )
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from hookengine.sched.groups import unwrap

    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
