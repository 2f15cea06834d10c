"""Bucket batch sampler: purity, coverage under each remainder policy, determinism, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hookengine.data.sampler import BucketBatchSampler, plan_epoch


def _ids(n=503, buckets=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, buckets, n)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


@pytest.mark.parametrize("remainder", ["drop", "pad", "carry"])
@pytest.mark.parametrize("replicas", [1, 3])
def test_batches_never_mix_buckets_and_ranks_agree(remainder, replicas):
    ids = _ids()
    samplers = [BucketBatchSampler(ids, 4, num_replicas=replicas, rank=r, seed=1, remainder=remainder)
                for r in range(replicas)]
    for epoch in range(3):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert len({len(p) for p in per_rank}) == 1  # same number of steps
        for step in zip(*per_rank):
            buckets = {int(ids[i]) for batch in step for i in batch}
            assert len(buckets) == 1  # every rank, same bucket, at every step
            assert all(len(batch) == 4 for batch in step)
            flat = [i for batch in step for i in batch]
            if remainder != "pad":
                assert len(set(flat)) == len(flat)  # disjoint across ranks


def test_drop_sees_each_sample_at_most_once_and_drops_only_remainders():
    ids = _ids()
    group = 4 * 2
    plan = plan_epoch(ids, 4, num_replicas=2, seed=3, epoch=0, remainder="drop")
    seen = plan.batches.reshape(-1)
    assert len(set(seen.tolist())) == len(seen)
    counts = np.bincount(ids)
    assert len(plan.dropped) == int((counts % group).sum())
    assert set(seen.tolist()) | set(plan.dropped.tolist()) == set(range(len(ids)))
    other = plan_epoch(ids, 4, num_replicas=2, seed=3, epoch=1, remainder="drop")
    assert set(plan.dropped.tolist()) != set(other.dropped.tolist())  # not always the same ones


def test_pad_sees_every_sample_and_repeats_within_bucket():
    ids = _ids()
    plan = plan_epoch(ids, 5, seed=0, epoch=0, remainder="pad")
    seen = Counter(plan.batches.reshape(-1).tolist())
    assert set(seen) == set(range(len(ids)))
    counts = np.bincount(ids)
    assert plan.padded == int(sum((-c) % 5 for c in counts))
    assert sum(seen.values()) == len(ids) + plan.padded


def test_carry_loses_nothing_and_repeats_nothing():
    ids = _ids(n=211, buckets=5)
    sampler = BucketBatchSampler(ids, 4, seed=2, remainder="carry")
    carried = set()
    for epoch in range(5):
        seen = [i for b in _epoch(sampler, epoch) for i in b]
        assert len(seen) == len(set(seen))  # once per epoch at most
        assert carried <= set(seen)  # last epoch's carry comes first this epoch
        plan = sampler.plan()
        assert set(seen) | set(plan.carry.tolist()) == set(range(len(ids)))
        assert len(plan.carry) == int((np.bincount(ids) % 4).sum())
        carried = set(plan.carry.tolist())


def test_deterministic_and_epoch_dependent():
    ids = _ids()
    a = BucketBatchSampler(ids, 4, seed=9)
    b = BucketBatchSampler(ids, 4, seed=9)
    assert _epoch(a, 2) == _epoch(b, 2)
    assert _epoch(a, 3) != _epoch(b, 2)
    c = BucketBatchSampler(ids, 4, seed=10)
    assert _epoch(c, 2) != _epoch(b, 2)


@pytest.mark.parametrize("remainder", ["drop", "pad", "carry"])
def test_resume_mid_epoch(remainder):
    ids = _ids()
    full = BucketBatchSampler(ids, 4, seed=4, remainder=remainder)
    reference = [_epoch(full, e) for e in range(4)]
    # interrupted in epoch 2 after 5 batches; a fresh sampler restores the saved state
    first = BucketBatchSampler(ids, 4, seed=4, remainder=remainder)
    for e in range(2):
        _epoch(first, e)
    first.set_epoch(2)
    first.set_start(5)
    state = first.state_dict()
    resumed = BucketBatchSampler(ids, 4, seed=0, remainder=remainder)
    resumed.load_state_dict(state)
    assert resumed.seed == 4
    resumed.set_epoch(2)
    resumed.set_start(5)
    assert [list(b) for b in resumed] == reference[2][5:]
    assert _epoch(resumed, 3) == reference[3]  # and the next epoch is unchanged (carry kept)
    # a start applies to one iteration only
    resumed.set_epoch(2)
    assert len(list(resumed)) == len(reference[2]) == len(resumed)


def test_carry_chain_replayed_without_state():
    ids = _ids(n=97, buckets=4)
    a = BucketBatchSampler(ids, 3, seed=1, remainder="carry")
    walked = [_epoch(a, e) for e in range(4)]
    b = BucketBatchSampler(ids, 3, seed=1, remainder="carry")
    assert _epoch(b, 3) == walked[3]  # jumping to epoch 3 replays the carries


def test_resume_refuses_other_buckets():
    ids = _ids()
    state = BucketBatchSampler(ids, 4).state_dict()
    changed = ids.copy()
    changed[0] = (changed[0] + 1) % 7
    with pytest.raises(ValueError, match="other buckets"):
        BucketBatchSampler(changed, 4).load_state_dict(state)


def test_with_epoch_pairs():
    sampler = BucketBatchSampler(_ids(), 4, with_epoch=True)
    sampler.set_epoch(6)
    batch = next(iter(sampler))
    assert all(isinstance(i, tuple) and i[1] == 6 for i in batch)


def test_bad_inputs_have_clear_messages():
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 4)
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([-1, -1], 4)
    with pytest.raises(ValueError, match="batch_size=8"):
        BucketBatchSampler([0, 0, 1, 1, 1], 8)
    BucketBatchSampler([0, 0, 1, 1, 1], 8, remainder="pad")  # padding makes one batch each
    with pytest.raises(ValueError, match="remainder"):
        BucketBatchSampler([0, 1], 1, remainder="wrap")
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([0, 1], 1, num_replicas=2, rank=2)


def test_unshuffled_order_is_sorted_within_buckets():
    ids = np.array([1, 0, 1, 0, 1, 0])
    plan = plan_epoch(ids, 3, shuffle=False)
    assert plan.batches.tolist() == [[1, 3, 5], [0, 2, 4]]


def test_planning_one_million_is_fast():
    import time

    ids = np.random.default_rng(0).integers(0, 40, 1_000_000)
    start = time.perf_counter()
    plan = plan_epoch(ids, 8, num_replicas=2, remainder="pad")
    assert time.perf_counter() - start < 3.0  # ~0.3 s here
    assert plan.batches.shape[1] == 16


@pytest.mark.parametrize("remainder", ["drop", "pad", "carry"])
@pytest.mark.parametrize(("saved", "now"), [((8, 2), (8, 1)), ((16, 1), (16, 2)), ((4, 4), (8, 2)), ((6, 2), (4, 3))])
def test_another_world_resumes_the_saved_plan_sample_for_sample(remainder, saved, now):
    """A state saved by ``saved = (batch, processes)`` continues on ``now``: mid-epoch and into the
    next epochs, the new ranks together train on exactly the samples of the old ranks, step by step."""
    ids = _ids()
    old = [BucketBatchSampler(ids, saved[0], num_replicas=saved[1], rank=r, seed=5, remainder=remainder)
           for r in range(saved[1])]
    for s in old:
        s.set_epoch(1)
    state = old[0].state_dict()
    new = [BucketBatchSampler(ids, now[0], num_replicas=now[1], rank=r, seed=5, remainder=remainder)
           for r in range(now[1])]
    for s in new:
        s.load_state_dict(state)
    micro = new[0].micro_steps
    assert new[0].global_batch == saved[0] * saved[1] and new[0].batch_size * micro * now[1] == new[0].global_batch
    for epoch in (1, 2, 3):
        for s in old + new:
            s.set_epoch(epoch)
            s.set_start(3 * micro if s in new else 3)  # resumed after 3 global batches
        before = [list(s) for s in old]
        after = [list(s) for s in new]
        assert len(after[0]) == len(before[0]) * micro
        for step in range(len(before[0])):
            old_samples = sorted(i for r in before for i in r[step])
            new_samples = sorted(i for r in after for b in r[step * micro:(step + 1) * micro] for i in b)
            assert old_samples == new_samples


def test_a_state_without_a_plan_loads_as_before_and_a_replanned_one_keeps_it():
    ids = _ids()
    sampler = BucketBatchSampler(ids, 8, seed=2)
    state = sampler.state_dict()
    for key in ("plan_batch_size", "plan_replicas", "micro_steps"):
        state.pop(key)
    fresh = BucketBatchSampler(ids, 8, seed=2)
    fresh.load_state_dict(state)
    assert (fresh.global_batch, fresh.micro_steps, fresh.resumed_micro_steps) == (8, 1, None)
    two = BucketBatchSampler(ids, 8, num_replicas=2, rank=0, seed=2, remainder="drop")
    fresh.load_state_dict(two.state_dict())
    assert (fresh.global_batch, fresh.batch_size, fresh.micro_steps, fresh.resumed_micro_steps) == (16, 8, 2, 1)
    assert len(fresh) == 2 * len(two)
    assert (fresh.plan().dropped_rank == -1).all()  # drops are not attributed to ranks of the saved world
