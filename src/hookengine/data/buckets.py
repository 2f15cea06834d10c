"""Aspect-ratio bucketing algorithms: pure functions, vectorised with NumPy (no engine,
no plugin; the plugin is :class:`hookengine.data.bucketing.Bucketing`).

Two modes:

- ``kohya`` reproduces kohya-ss/sd-scripts: the bucket list of ``make_bucket_resolutions``
  (max resolution, min/max side, step), the choice of the bucket with the smallest
  aspect-ratio error (an image whose exact size is a bucket keeps it), resize to cover
  the bucket (rounding half up) then crop, and the ``no_upscale`` mode whose buckets are
  the image sizes rounded down to the step.
- ``area`` normalises every bucket to a pixel area (``resolution ** 2``), for one or several
  target resolutions at once (chosen per image at random with weights, or the largest one
  that fits), with sides aligned to 8/16/32/64.

Sizes are ``(width, height)`` throughout this module, as in kohya.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
    "VAE_FACTOR",
    "BucketError",
    "Assignment",
    "check_step",
    "kohya_bucket_resolutions",
    "kohya_assign",
    "kohya_select_bucket_reference",
    "area_bucket_resolutions",
    "area_assign",
    "cover_size",
    "crop_offsets",
    "uniforms",
]

# The VAE of every latent-diffusion model downsamples by 8: sides must be multiples of it.
VAE_FACTOR = 8


class BucketError(ValueError):
    """A bucketing setting is wrong or no bucket can hold the data; the message names it."""


@dataclass
class Assignment:
    """Where each image goes.

    Attributes:
        bucket: ``(N,)`` int64 bucket index per image; ``-1`` when the image cannot be
            bucketed (too small for any bucket, zero size).
        resized: ``(N, 2)`` int64 ``(width, height)`` after the resize, before the crop.
        buckets: ``(B, 2)`` int64 ``(width, height)`` of every bucket.
        ar_error: ``(N,)`` float64 bucket aspect ratio minus image aspect ratio (kohya's).
    """

    bucket: np.ndarray
    resized: np.ndarray
    buckets: np.ndarray
    ar_error: np.ndarray

    def __len__(self) -> int:
        return int(self.bucket.shape[0])

    def counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket, keyed by ``(width, height)`` (empty buckets left out)."""
        valid = self.bucket[self.bucket >= 0]
        counts = np.bincount(valid, minlength=len(self.buckets))
        return {(int(w), int(h)): int(c) for (w, h), c in zip(self.buckets, counts) if c}


# --------------------------------------------------------------------------- checks
def check_step(step: int, name: str = "step", multiple: int = VAE_FACTOR) -> None:
    """Raise :class:`BucketError` unless ``step`` is a positive multiple of ``multiple``
    (8 for latent models; pixel-space models may use 4)."""
    if not isinstance(step, (int, np.integer)) or step <= 0 or step % multiple:
        hint = "use 8, 16, 32 or 64" if multiple == VAE_FACTOR else f"use a multiple of {multiple}"
        raise BucketError(
            f"bucketing.{name}={step!r} is not a positive multiple of {multiple} "
            f"(latent models downsample by {VAE_FACTOR}; set pixel_space: true for pixel models); {hint}"
        )


def _as_sizes(widths: Any, heights: Any) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    h = np.asarray(heights, dtype=np.int64).reshape(-1)
    if w.shape != h.shape:
        raise BucketError(f"widths ({w.shape[0]}) and heights ({h.shape[0]}) differ in length")
    return w, h


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise BucketError(f"bucketing.{name} must be one int or (width, height), got {value!r}")
    return pair  # type: ignore[return-value]


# ------------------------------------------------------------------------ kohya mode
def kohya_bucket_resolutions(
    max_resolution: int | Sequence[int] = 512,
    min_size: int = 256,
    max_size: int = 1024,
    step: int = 64,
) -> list[tuple[int, int]]:
    """kohya's bucket list: sorted ``(width, height)`` whose area is at most the max area.

    The square side is ``sqrt(area)`` floored to the step; then for each width from
    ``min_size`` to ``max_size`` (by ``step``) the height is the largest multiple of
    ``step`` that keeps ``width * height <= area``, capped at ``max_size``; pairs with a
    height below ``min_size`` are left out; each pair is added in both orientations.
    """
    max_w, max_h = _pair(max_resolution, "max_resolution")
    check_step(step)
    if min_size <= 0 or max_w <= 0 or max_h <= 0:
        raise BucketError(f"bucketing: sizes must be positive (min_size={min_size}, max_resolution={max_resolution})")
    if min_size > max_size:
        raise BucketError(f"bucketing.min_size={min_size} is larger than bucketing.max_size={max_size}")
    if max_size < max_w or max_size < max_h:
        raise BucketError(
            f"bucketing.max_size={max_size} is smaller than a side of bucketing.max_resolution={max_resolution}"
        )
    area = max_w * max_h
    square = int(math.sqrt(area) // step) * step
    resos = {(square, square)}
    for width in range(min_size, max_size + 1, step):
        # Integer floor divisions, in kohya's order (area // width, then // step).
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def cover_size(widths: np.ndarray, heights: np.ndarray, bucket_w: np.ndarray, bucket_h: np.ndarray) -> np.ndarray:
    """Sizes that cover each bucket with the image's aspect ratio (kohya's rounding).

    The side that is relatively shorter is scaled to the bucket's side exactly; the other
    one becomes ``int(side * scale + 0.5)`` and is at least the bucket's.
    """
    w = widths.astype(np.float64)
    h = heights.astype(np.float64)
    ar = w / h
    ar_bucket = bucket_w / bucket_h
    scale = np.where(ar > ar_bucket, bucket_h / h, bucket_w / w)
    out = np.empty((len(w), 2), dtype=np.int64)
    out[:, 0] = np.floor(w * scale + 0.5)
    out[:, 1] = np.floor(h * scale + 0.5)
    return out


def _nearest_in_sorted(keys: np.ndarray, order_index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index (into the unsorted table) of the key nearest to each value.

    ``keys`` are sorted and unique; ``order_index[i]`` is the table position of
    ``keys[i]``. Ties go to the smaller table position, as ``np.argmin`` over the table
    would. Errors are computed as ``abs(key - value)``, the same float operations as a
    per-image ``argmin``, so results match it exactly.
    """
    right = np.searchsorted(keys, values, side="left").clip(0, len(keys) - 1)
    left = (right - 1).clip(0, len(keys) - 1)
    err_left = np.abs(keys[left] - values)
    err_right = np.abs(keys[right] - values)
    pos_left, pos_right = order_index[left], order_index[right]
    take_left = (err_left < err_right) | ((err_left == err_right) & (pos_left < pos_right))
    return np.where(take_left, pos_left, pos_right)


def kohya_assign(
    widths: Any,
    heights: Any,
    buckets: Sequence[tuple[int, int]] | None = None,
    *,
    no_upscale: bool = False,
    max_resolution: int | Sequence[int] = 512,
    step: int = 64,
) -> Assignment:
    """Assign image sizes to kohya buckets, vectorised.

    With ``no_upscale=False`` the image goes to the predefined bucket (``buckets``) of the
    smallest aspect-ratio error, unless its exact size is a bucket; it is resized to cover
    the bucket. With ``no_upscale=True`` an image larger than the max area is shrunk to it
    (rounding one side to the step, the one giving the smaller aspect error) and the bucket
    is the size rounded down to the step; buckets are then the distinct sizes found.
    Images that end in a zero-sized bucket get ``-1``.
    """
    w, h = _as_sizes(widths, heights)
    check_step(step)
    bad = (w <= 0) | (h <= 0)
    w_safe, h_safe = np.where(bad, 1, w), np.where(bad, 1, h)
    if no_upscale:
        max_w, max_h = _pair(max_resolution, "max_resolution")
        result = _kohya_no_upscale(w_safe, h_safe, max_w * max_h, step)
    else:
        if buckets is None:
            buckets = kohya_bucket_resolutions(max_resolution, step=step)
        result = _kohya_predefined(w_safe, h_safe, np.asarray(buckets, dtype=np.int64).reshape(-1, 2))
    result.bucket[bad] = -1
    return result


def _kohya_predefined(w: np.ndarray, h: np.ndarray, table: np.ndarray) -> Assignment:
    if len(table) == 0:
        raise BucketError("bucketing: the bucket list is empty (check min_size, max_size and max_resolution)")
    ar = w / h
    table_ar = table[:, 0] / table[:, 1]
    # np.unique keeps the first table position of each aspect ratio (argmin's tie rule).
    keys, first = np.unique(table_ar, return_index=True)
    bucket = _nearest_in_sorted(keys, first, ar)
    # An image whose size is a bucket keeps it (kohya checks this before the error).
    span = int(max(table.max(), w.max(initial=0), h.max(initial=0))) + 1
    table_key = table[:, 0] * span + table[:, 1]
    key_order = np.argsort(table_key, kind="stable")
    sorted_keys = table_key[key_order]
    image_key = w * span + h
    pos = np.searchsorted(sorted_keys, image_key).clip(0, len(table) - 1)
    exact = sorted_keys[pos] == image_key
    bucket = np.where(exact, key_order[pos], bucket).astype(np.int64)
    chosen = table[bucket]
    resized = cover_size(w, h, chosen[:, 0], chosen[:, 1])
    ar_error = chosen[:, 0] / chosen[:, 1] - ar
    return Assignment(bucket, resized, table.copy(), ar_error)


def _round_to_steps(x: np.ndarray, step: int) -> np.ndarray:
    rounded = np.floor(x + 0.5).astype(np.int64)
    return rounded - rounded % step


def _kohya_no_upscale(w: np.ndarray, h: np.ndarray, max_area: int, step: int) -> Assignment:
    ar = w / h
    resized = np.stack([w, h], axis=1).astype(np.int64)
    big = w * h > max_area
    if big.any():
        a = ar[big]
        rw = np.sqrt(max_area * a)
        rh = max_area / rw
        # Round one side to the step, derive the other; keep the smaller aspect error.
        bw_r = _round_to_steps(rw, step)
        bh_in_wr = _round_to_steps(bw_r / a, step)
        bh_r = _round_to_steps(rh, step)
        bw_in_hr = _round_to_steps(bh_r * a, step)
        with np.errstate(divide="ignore", invalid="ignore"):
            err_w = np.abs(bw_r / bh_in_wr - a)
            err_h = np.abs(bw_in_hr / bh_r - a)
        # kohya divides by zero for extreme aspect ratios; an infinite error avoids that side.
        err_w = np.where(np.isfinite(err_w), err_w, np.inf)
        err_h = np.where(np.isfinite(err_h), err_h, np.inf)
        by_width = err_w < err_h
        sized = np.where(
            by_width[:, None],
            np.stack([bw_r, np.floor(bw_r / a + 0.5).astype(np.int64)], axis=1),
            np.stack([np.floor(bh_r * a + 0.5).astype(np.int64), bh_r], axis=1),
        )
        resized[big] = sized
    bucket_sizes = resized - resized % step
    usable = (bucket_sizes > 0).all(axis=1)
    # Distinct sizes through one integer key (np.unique on rows is ten times slower).
    span = int(bucket_sizes[:, 1].max(initial=0)) + 1
    keys, inverse = np.unique(bucket_sizes[usable, 0] * span + bucket_sizes[usable, 1], return_inverse=True)
    table = np.stack([keys // span, keys % span], axis=1)
    bucket = np.full(len(w), -1, dtype=np.int64)
    bucket[usable] = inverse.reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ar_error = bucket_sizes[:, 0] / bucket_sizes[:, 1] - ar
    return Assignment(bucket, resized, table.astype(np.int64).reshape(-1, 2), ar_error)


def kohya_select_bucket_reference(
    width: int,
    height: int,
    buckets: Sequence[tuple[int, int]],
    *,
    no_upscale: bool = False,
    max_area: int = 512 * 512,
    step: int = 64,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's per-image choice, one image at a time in plain Python: ``(bucket, resized)``.

    The straightforward form of the algorithm, for checking the vectorised
    :func:`kohya_assign` and for the benchmark's per-image loop.
    """
    aspect = width / height
    if not no_upscale:
        if (width, height) in buckets:
            reso = (width, height)
        else:
            errors = [abs(bw / bh - aspect) for bw, bh in buckets]
            reso = buckets[errors.index(min(errors))]
        if aspect > reso[0] / reso[1]:
            scale = reso[1] / height
        else:
            scale = reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))

    def round_step(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = round_step(rw)
        bh_w = round_step(bw / aspect)
        bh = round_step(rh)
        bw_h = round_step(bh * aspect)
        err_w = abs(bw / bh_w - aspect) if bh_w else math.inf
        err_h = abs(bw_h / bh - aspect) if bh else math.inf
        resized = (bw, int(bw / aspect + 0.5)) if err_w < err_h else (int(bh * aspect + 0.5), bh)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % step, resized[1] - resized[1] % step), resized


# ------------------------------------------------------------------------- area mode
def area_bucket_resolutions(
    resolution: int,
    align: int = 64,
    max_aspect: float = 4.0,
    multiple: int = VAE_FACTOR,
) -> list[tuple[int, int]]:
    """Buckets of about ``resolution ** 2`` pixels, sides multiples of ``align``
    (itself a multiple of ``multiple``: 8 for latent models, 4 for pixel-space ones).

    For each aligned width the height is the aligned value nearest ``resolution**2 /
    width``; pairs whose aspect ratio exceeds ``max_aspect`` either way are left out.
    The square (``resolution`` rounded to ``align``) is always in.
    """
    check_step(align, "align", multiple)
    if resolution < align:
        raise BucketError(f"bucketing.resolution={resolution} is smaller than bucketing.align={align}")
    if max_aspect < 1:
        raise BucketError(f"bucketing.max_aspect={max_aspect} must be >= 1")
    area = resolution * resolution
    side = max(align, int(round(resolution / align)) * align)
    resos = {(side, side)}
    width = align
    while width <= int(resolution * math.sqrt(max_aspect)) + align:
        height = max(align, int(round(area / width / align)) * align)
        if max(width / height, height / width) <= max_aspect:
            resos.add((width, height))
            resos.add((height, width))
        width += align
    return sorted(resos)


def area_assign(
    widths: Any,
    heights: Any,
    resolutions: Sequence[int] = (512,),
    *,
    weights: Sequence[float] | None = None,
    policy: Literal["random", "fit"] = "fit",
    align: int = 64,
    multiple: int = VAE_FACTOR,
    max_aspect: float = 4.0,
    seed: int = 0,
    epoch: int = 0,
    indices: Any = None,
) -> Assignment:
    """Assign sizes to area-normalised buckets over one or several resolutions.

    ``policy="fit"`` takes the largest resolution whose area the image reaches (the
    smallest one for smaller images); ``"random"`` draws one per image with ``weights``
    from ``(seed, epoch, index)`` (``indices`` default to ``0..N-1``), so each epoch can
    re-bucket. Within a resolution the bucket is the one nearest in log aspect ratio
    (ties to the narrower bucket).
    """
    w, h = _as_sizes(widths, heights)
    if not resolutions:
        raise BucketError("bucketing.resolutions is empty")
    res = np.asarray(sorted(set(int(r) for r in resolutions)), dtype=np.int64)
    tables = [np.asarray(area_bucket_resolutions(int(r), align, max_aspect, multiple), dtype=np.int64) for r in res]
    table = np.concatenate(tables)
    seg_start = np.cumsum([0] + [len(t) for t in tables])
    bad = (w <= 0) | (h <= 0)
    w_safe, h_safe = np.where(bad, 1, w), np.where(bad, 1, h)
    choice = _choose_resolution(w_safe * h_safe, res, resolutions, weights, policy, seed, epoch, indices)
    # Keys sort by (resolution, log aspect) so one searchsorted serves every resolution.
    log_ar = np.log(table[:, 0] / table[:, 1])
    seg_of = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    keys = seg_of * 100.0 + log_ar
    order = np.lexsort((log_ar, seg_of))
    sorted_keys = keys[order]
    values = choice * 100.0 + np.log(w_safe / h_safe)
    right = np.searchsorted(sorted_keys, values)
    lo, hi = seg_start[choice], seg_start[choice + 1] - 1
    right = np.clip(right, lo, hi)
    left = np.clip(right - 1, lo, hi)
    err_l = np.abs(sorted_keys[left] - values)
    err_r = np.abs(sorted_keys[right] - values)
    pick = np.where(err_l <= err_r, left, right)
    bucket = order[pick].astype(np.int64)
    chosen = table[bucket]
    resized = cover_size(w_safe, h_safe, chosen[:, 0], chosen[:, 1])
    ar_error = chosen[:, 0] / chosen[:, 1] - w_safe / h_safe
    bucket[bad] = -1
    return Assignment(bucket, resized, table, ar_error)


def _choose_resolution(
    areas: np.ndarray,
    res: np.ndarray,
    given: Sequence[int],
    weights: Sequence[float] | None,
    policy: str,
    seed: int,
    epoch: int,
    indices: Any = None,
) -> np.ndarray:
    if policy == "fit":
        # Largest resolution with res**2 <= area; images below the smallest take it.
        return np.clip(np.searchsorted(res * res, areas, side="right") - 1, 0, len(res) - 1)
    if policy != "random":
        raise BucketError(f"bucketing.resolution_policy={policy!r}: use 'fit' or 'random'")
    if weights is None:
        p = np.full(len(res), 1.0 / len(res))
    else:
        if len(weights) != len(given):
            raise BucketError(
                f"bucketing.weights has {len(weights)} entries for {len(given)} bucketing.resolutions"
            )
        merged: dict[int, float] = {}
        for r, wt in zip(given, weights):
            if wt < 0:
                raise BucketError(f"bucketing.weights: negative weight {wt} for resolution {r}")
            merged[int(r)] = merged.get(int(r), 0.0) + float(wt)
        p = np.asarray([merged[int(r)] for r in res])
        if p.sum() <= 0:
            raise BucketError("bucketing.weights sum to zero")
        p = p / p.sum()
    u = uniforms(seed, epoch, np.arange(len(areas)) if indices is None else indices, 3)
    return np.minimum(np.searchsorted(np.cumsum(p), u, side="right"), len(res) - 1)


# ------------------------------------------------------------------ per-sample noise
def uniforms(seed: int, epoch: int, indices: Any, salt: int) -> np.ndarray:
    """Uniform floats in ``[0, 1)``, one per index, a pure function of its arguments.

    A SplitMix64 hash of ``(seed, epoch, index, salt)``: the same value whether drawn
    for a million samples at once, for one sample in a DataLoader worker, or for a
    sample read from a stream.
    """
    x = np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64)
    mix = np.uint64((seed * 0x9E3779B1 + epoch * 0x85EBCA77 + salt * 0xC2B2AE3D) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15) + mix
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ---------------------------------------------------------------------- crop offsets
def crop_offsets(
    resized: Any,
    bucket_sizes: Any,
    *,
    random: bool = False,
    seed: int = 0,
    epoch: int = 0,
    indices: Any = None,
) -> np.ndarray:
    """``(N, 2)`` int64 crop ``(left, top)`` inside the resized image.

    Centre crop is ``trim // 2`` (kohya); a random crop is uniform over ``0..trim``
    inclusive, from ``(seed, epoch, index)`` so it does not depend on which worker loads
    the sample.
    """
    resized = np.asarray(resized, dtype=np.int64).reshape(-1, 2)
    bucket_sizes = np.asarray(bucket_sizes, dtype=np.int64).reshape(-1, 2)
    trim = np.maximum(resized - bucket_sizes, 0)
    if not random:
        return trim // 2
    if indices is None:
        indices = np.arange(len(resized))
    u = np.stack([uniforms(seed, epoch, indices, 1), uniforms(seed, epoch, indices, 2)], axis=1)
    return np.minimum(np.floor(u * (trim + 1)).astype(np.int64), trim)

