"""Small plugins for the signal and non-finite tests (recipes name them as module:attr)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch


class TinyMLP(torch.nn.Module):
    """features -> 16 -> 1, small enough that a step is mostly the loop's own work."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_data(engine: Any, samples: int = 256, batch_size: int = 8, features: int = 8) -> None:
    """A fixed regression set (y = sum of x) as the ``train`` loader."""

    def register(state: Any) -> None:
        x = torch.randn(samples, features, generator=torch.Generator().manual_seed(0))
        y = x.sum(dim=1, keepdim=True)
        state.dataloaders["train"] = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
        )

    engine.on("setup", register)


class Hold:
    """Reports progress into ``folder`` and holds at step ``hold_at`` until ``folder/go`` exists.

    Each rank writes ``rank{r}.pid`` at setup and ``rank{r}.step`` after every step; at
    ``hold_at`` it writes ``rank{r}.held`` and waits, so a test can send signals at a known
    step (progress, not wall-clock time, decides when).
    """

    def __init__(self, folder: str, hold_at: int = -1) -> None:
        self.folder = Path(folder)
        self.hold_at = hold_at

    def setup(self, engine: Any) -> None:
        self.engine = engine
        self.folder.mkdir(parents=True, exist_ok=True)
        engine.on("setup", self._pid)
        engine.on("step_end", self._step)

    def _write(self, name: str, text: str) -> None:
        rank = self.engine.runtime.process_index
        tmp = self.folder / f".rank{rank}.{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.folder / f"rank{rank}.{name}")

    def _pid(self, state: Any) -> None:
        self._write("pid", str(os.getpid()))

    def _step(self, state: Any) -> None:
        self._write("step", str(state.clock.step))
        if state.clock.step == self.hold_at:
            self._write("held", str(state.clock.step))
            while not (self.folder / "go").exists():
                time.sleep(0.005)
