"""Bucketing benchmark: assign + plan one epoch for N image sizes, vectorised vs per image.

The peer is the same algorithm written as kohya-ss/sd-scripts runs it: one image at a
time in Python (pick the bucket by aspect-ratio error, compute the resized size), then
an epoch planned with per-bucket lists (shuffle, cut into batches, shuffle batches).
Both runs use the same sizes; the bucket choices are checked equal before timing counts.

    python bench/bucketing.py [--n 1000000] [--batch-size 8] [--replicas 2]

Prints the seconds of each and the ratio; the last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import numpy as np

from hookengine.data.buckets import kohya_assign, kohya_bucket_resolutions, kohya_select_bucket_reference
from hookengine.data.sampler import plan_epoch


def vectorised(widths: np.ndarray, heights: np.ndarray, buckets: list, batch: int, replicas: int) -> tuple[float, np.ndarray, int]:
    start = time.perf_counter()
    assignment = kohya_assign(widths, heights, buckets)
    plan = plan_epoch(assignment.bucket, batch, num_replicas=replicas, seed=0, epoch=0, remainder="drop")
    return time.perf_counter() - start, assignment.bucket, len(plan)


def per_image(widths: list, heights: list, buckets: list, batch: int, replicas: int) -> tuple[float, list, int]:
    index = {b: i for i, b in enumerate(buckets)}
    start = time.perf_counter()
    chosen = []
    members: dict[int, list[int]] = {}
    for i, (w, h) in enumerate(zip(widths, heights)):
        bucket, _resized = kohya_select_bucket_reference(w, h, buckets)
        b = index[bucket]
        chosen.append(b)
        members.setdefault(b, []).append(i)
    rng = random.Random(0)
    group = batch * replicas
    batches = []
    for b in sorted(members):
        items = members[b]
        rng.shuffle(items)
        for s in range(0, len(items) - group + 1, group):
            batches.append(items[s : s + group])
    rng.shuffle(batches)
    return time.perf_counter() - start, chosen, len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Photo-like sizes: common aspect ratios with jitter, 256 to 4096 px on the long side.
    long_side = rng.integers(256, 4097, args.n)
    ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3 / 4, 2 / 3, 9 / 16], args.n) * rng.uniform(0.95, 1.05, args.n)
    widths = np.where(ratio >= 1, long_side, np.maximum(1, (long_side * ratio).astype(np.int64)))
    heights = np.where(ratio >= 1, np.maximum(1, (long_side / ratio).astype(np.int64)), long_side)
    buckets = kohya_bucket_resolutions((1024, 1024), 256, 2048, 64)

    gc.collect()
    gc.freeze()
    vectorised(widths[:1000], heights[:1000], buckets, args.batch_size, args.replicas)  # warm-up
    fast_s, fast_ids, fast_steps = vectorised(widths, heights, buckets, args.batch_size, args.replicas)
    slow_s, slow_ids, slow_steps = per_image(widths.tolist(), heights.tolist(), buckets, args.batch_size, args.replicas)
    if not np.array_equal(fast_ids, np.asarray(slow_ids)):
        raise SystemExit("the vectorised and per-image assignments differ")
    if fast_steps != slow_steps:
        raise SystemExit(f"plans differ in length: {fast_steps} vs {slow_steps}")
    ratio_x = slow_s / fast_s
    print(f"images: {args.n}, buckets: {len(buckets)}, steps per epoch: {fast_steps}")
    print(f"vectorised assign + plan: {fast_s:.3f} s")
    print(f"per-image Python loop:    {slow_s:.3f} s")
    print(f"speed-up: {ratio_x:.1f}x")
    print(json.dumps({
        "bench": "bucketing", "n": args.n, "buckets": len(buckets), "steps": fast_steps,
        "vectorised_s": round(fast_s, 4), "per_image_s": round(slow_s, 4), "ratio": round(ratio_x, 2),
    }))


if __name__ == "__main__":
    main()
