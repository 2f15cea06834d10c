"""A batch sampler whose order is a pure function of (seed, epoch): resumable mid-epoch."""

from __future__ import annotations

from typing import Any, Iterator

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler:
    """Batches of indices, reshuffled per epoch from ``seed + epoch``, sharded by rank.

    ``set_epoch(e)`` and ``set_start(k)`` (skip the first ``k`` batches) make a resumed
    run see exactly the batches an uninterrupted run would. Each rank takes a disjoint,
    equally long slice, so accelerate need not (and must not) re-shard it.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError("the data set is empty: nothing to sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, batch_index: int) -> None:
        self.start = batch_index

    def _indices(self) -> list[int]:
        import torch

        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.size // self.num_replicas
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        start, self.start = self.start, 0  # a start applies to one epoch only
        yield from batches[start:]

    def __len__(self) -> int:
        per_rank = self.size // self.num_replicas
        full, rest = divmod(per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}
