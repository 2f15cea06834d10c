"""Plugins of the world-size and elastic tests (referenced from recipes as module:attr)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class BucketDigits:
    """A ``train`` loader of the first ``samples`` digits through a
    :class:`~hookengine.data.sampler.BucketBatchSampler` (one bucket); batches are
    ``(images, labels, sample indices)``. The sampler's state goes into checkpoints."""

    def __init__(self, batch_size: int = 16, samples: int = 330, seed: int = 0) -> None:
        self.batch_size, self.samples, self.seed = batch_size, samples, seed

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._register, priority="early")

    def _register(self, state: Any) -> None:
        import numpy as np
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from hookengine.data.sampler import BucketBatchSampler
        from hookengine.demo.digits import load_digits_split

        tx, ty, _, _ = load_digits_split()
        tx, ty = tx[: self.samples], ty[: self.samples]
        runtime = self.engine.runtime
        self.sampler = BucketBatchSampler(np.zeros(len(tx), dtype=np.int64), self.batch_size, seed=self.seed,
                                          num_replicas=runtime.num_processes, rank=runtime.process_index)
        data = TensorDataset(tx, ty, torch.arange(len(tx)))
        state.dataloaders["train"] = DataLoader(data, batch_sampler=self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


class RecordSamples:
    """Each rank writes ``rank<r>.json``: per epoch, the sample indices of every batch it trained on,
    and the micro-batch sizes it saw."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, engine: Any) -> None:
        self.engine = engine
        self.seen: dict[str, list[int]] = {}
        self.sizes: list[int] = []
        engine.on("batch_start", self._record)
        engine.on("run_end", self._write)

    def _record(self, state: Any, batch: Any = None) -> None:
        indices = batch[2].tolist()
        self.seen.setdefault(str(state.clock.epoch), []).extend(indices)
        self.sizes.append(len(indices))

    def _write(self, state: Any) -> None:
        rank = self.engine.runtime.process_index
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.json").write_text(json.dumps({"seen": self.seen, "sizes": self.sizes}))


class KillOnce:
    """Rank ``rank`` exits abruptly (``os._exit``) at optimizer step ``step``, the first time only:
    a marker file in the run folder remembers it (a worker crash that a restart survives)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def setup(self, engine: Any) -> None:
        def maybe_die(state: Any) -> None:
            if engine.runtime.process_index != self.rank or state.clock.step != self.step:
                return
            marker = Path(state.run_dir) / "killed-once"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(3)

        engine.on("step_end", maybe_die)
