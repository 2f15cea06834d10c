"""A batch sampler whose order is a pure function of (seed, epoch): resumable mid-epoch."""

from __future__ import annotations

from typing import Any, Iterator

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler:
    """Batches of indices, reshuffled per epoch from ``seed + epoch``, sharded by rank.

    Each optimizer step reads one *global* batch of ``batch_size * num_replicas``
    samples; rank ``r`` takes the ``r``-th slice of it. So N processes with batch ``b``
    see exactly the samples one process with batch ``N * b`` sees, in the same steps,
    and every rank gets the same number of batches (accelerate need not, and must not,
    re-shard it). ``set_epoch(e)`` and ``set_start(k)`` (skip the first ``k`` batches)
    let a resumed run see exactly the batches an uninterrupted run would.
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
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, batch_index: int) -> None:
        self.start = batch_index

    def _order(self) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _global_batches(self) -> list[list[int]]:
        order = self._order()
        width = self.batch_size * self.num_replicas
        if self.drop_last:
            order = order[: len(order) // width * width]
        elif len(order) % self.num_replicas:
            # Pad by repeating from the start so the last global batch splits evenly.
            order += order[: self.num_replicas - len(order) % self.num_replicas]
        return [order[i : i + width] for i in range(0, len(order), width)]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0  # a start applies to one epoch only
        for batch in self._global_batches()[start:]:
            share = len(batch) // self.num_replicas
            yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        width = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.size // width
        padded = -(-self.size // self.num_replicas) * self.num_replicas
        return -(-padded // width)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}
