"""The epoch batch sampler: global batches split across ranks, resumable."""

from __future__ import annotations

import pytest

from hookengine.data.shuffle import EpochBatchSampler


@pytest.mark.parametrize("size, batch, drop_last", [(103, 8, True), (103, 8, False), (64, 16, False), (5, 4, False)])
def test_two_ranks_see_the_one_process_global_batches(size: int, batch: int, drop_last: bool) -> None:
    one = EpochBatchSampler(size, 2 * batch, seed=4, drop_last=drop_last)
    ranks = [EpochBatchSampler(size, batch, seed=4, drop_last=drop_last, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        single, split = list(one), [list(r) for r in ranks]
        assert len(split[0]) == len(split[1]) == len(ranks[0])
        if drop_last or size % 2 == 0:
            assert [a + b for a, b in zip(*split)] == single
        seen = [i for batches in split for b in batches for i in b]
        assert not set(sum(split[0], [])) & set(sum(split[1], [])) or not drop_last
        if drop_last:
            assert len(seen) == size // (2 * batch) * 2 * batch
        else:
            assert set(seen) == set(range(size))


def test_epochs_reshuffle_and_start_skips_once() -> None:
    s = EpochBatchSampler(50, 10, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    s.set_start(3)
    assert list(s) == first[3:]
    assert list(s) == first  # the start applied to one epoch only


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="empty"):
        EpochBatchSampler(0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(10, 0)
    with pytest.raises(ValueError, match="rank 2"):
        EpochBatchSampler(10, 2, num_replicas=2, rank=2)
