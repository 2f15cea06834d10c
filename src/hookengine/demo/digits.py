"""The demo: sklearn's handwritten digits (real 8x8 images shipped inside the package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.plugins import model_factory, resolve

__all__ = ["DigitsData", "DigitsConvNet", "load_digits_split", "evaluate_checkpoint"]


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(train_x, train_y, val_x, val_y) as tensors; images scaled to [0, 1], shape (N, 1, 8, 8)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tx, vx, ty, vy = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    return tx, ty, vx, vy


@model_factory
def DigitsConvNet(width: int = 16, hidden: int = 64, dropout: float = 0.1) -> Any:
    """A small convnet for 8x8 digits (about 40k parameters)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


class DigitsData:
    """Registers ``train`` and ``val`` loaders of the digits, sharded across processes.

    Args:
        batch_size: samples per batch on each process.
        val_fraction: share of the 1797 images held out for validation.
        seed: the split and the per-epoch shuffle.
        num_workers: DataLoader worker processes.
    """

    name = "digits"

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed, self.num_workers = batch_size, val_fraction, seed, num_workers

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._register, priority="early")  # data first: others may size by it

    def _register(self, state: Any) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from ..data.shuffle import EpochBatchSampler

        runtime = self.engine.runtime
        tx, ty, vx, vy = load_digits_split(self.val_fraction, self.seed)
        shards = dict(num_replicas=runtime.num_processes, rank=runtime.process_index)
        train = EpochBatchSampler(len(tx), self.batch_size, seed=self.seed, drop_last=True, **shards)
        val = EpochBatchSampler(len(vx), 256, shuffle=False, **shards)
        # A private generator: creating a loader iterator then draws nothing from the global
        # RNG, so a run resumed mid-epoch sees the same dropout masks as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        state.dataloaders["train"] = DataLoader(
            TensorDataset(tx, ty), batch_sampler=train, num_workers=self.num_workers, generator=generator
        )
        state.dataloaders["val"] = DataLoader(TensorDataset(vx, vy), batch_sampler=val, num_workers=self.num_workers)


def evaluate_checkpoint(path: str, model: str, model_options: dict[str, Any] | None = None,
                        model_name: str = "model") -> dict[str, float]:
    """Validation loss and accuracy of one digits checkpoint (a job for ``fan_out``)."""
    import torch

    from ..training.checkpoint import load_tree
    
    tree = load_tree(Path(path))
    net = resolve(model, "model", "model")(**(model_options or {}))
    net.load_state_dict(tree["models"][model_name])
    net.eval()
    _, _, vx, vy = load_digits_split()
    with torch.no_grad():
        logits = net(vx)
    return {
        "step": tree["clock"]["step"],
        "val_loss": float(torch.nn.functional.cross_entropy(logits, vy)),
        "val_accuracy": float((logits.argmax(-1) == vy).float().mean()),
    }
