"""Aspect-ratio bucketing: the algorithms (pure, vectorised with NumPy) and the plugin.

Two modes:

- ``kohya`` reproduces kohya-ss/sd-scripts: the bucket list of ``make_bucket_resolutions``
  (max resolution, min/max side, step), the choice of the bucket with the smallest
  aspect-ratio error (an image whose exact size is a bucket keeps it), resize to cover
  the bucket (rounding half up) then crop, and the ``no_upscale`` mode whose buckets are
  the image sizes rounded down to the step.
- ``area`` normalises every bucket to a pixel area (``resolution ** 2``), for one or several
  target resolutions at once (chosen per image at random with weights, or the largest one
  that fits), with sides aligned to 8/16/32/64.

Sizes are ``(width, height)`` throughout this module, as in kohya. Batches carry the
SDXL conditioning in ``(height, width)`` / ``(top, left)`` order under explicit names.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
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
    "Bucketing",
]

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------- plugin
class Bucketing:
    """Aspect-ratio bucketing as a plugin: a bucket batch sampler and resize + crop.

    It wraps the ``dataset`` plugin's slots: ``batch_sampler`` (a
    :class:`~hookengine.data.sampler.BucketBatchSampler` for the bucketed splits),
    ``transform_sample`` (resize to cover the bucket, crop, maybe flip, and add the crop
    conditioning), ``stream_bucket`` (the group of a streamed sample); and attaches the
    slot ``rebucket(epoch) -> Assignment`` that a user can wrap.

    Each bucketed sample gets ``original_size_hw`` (height, width before resizing),
    ``crop_top_left`` (top, left of the crop in the resized image, mirrored when
    flipped), ``target_size_hw`` (the bucket) and ``flipped``.

    Args:
        mode: ``kohya`` or ``area``.
        max_resolution, min_size, max_size, step, no_upscale: kohya's settings
            (``max_resolution`` is one side or ``(width, height)``).
        resolutions, weights, resolution_policy, align, max_aspect: area mode; several
            resolutions at once, drawn with ``weights`` (``random``) or the largest that
            the image reaches (``fit``).
        batch_size: per process (default: the dataset plugin's).
        remainder: ``drop``, ``pad`` or ``carry`` for what does not fill a batch.
        random_crop, flip_p, resampling: augmentation and the resize filter.
        seed: default the engine's seed.
        width_column, height_column: read sizes from these columns when present (no
            image is opened); otherwise sizes come from the image headers.
        image_column: the image column (default: the dataset plugin's).
        splits: the loaders that are bucketed.
        bad_samples: ``skip`` or ``raise`` for unreadable images found while sizing
            (default: the dataset plugin's policy).
        pixel_space: the model works on pixels (no VAE): ``align`` may be a multiple of 4.
    """

    name = "bucketing"

    def __init__(
        self,
        mode: Literal["kohya", "area"] = "kohya",
        max_resolution: int | tuple[int, int] = 512,
        min_size: int = 256,
        max_size: int = 1024,
        step: int = 64,
        no_upscale: bool = False,
        resolutions: list[int] | None = None,
        weights: list[float] | None = None,
        resolution_policy: Literal["fit", "random"] = "fit",
        align: int = 64,
        max_aspect: float = 4.0,
        batch_size: int | None = None,
        remainder: Literal["drop", "pad", "carry"] = "drop",
        shuffle: bool = True,
        random_crop: bool = False,
        flip_p: float = 0.0,
        resampling: str = "lanczos",
        seed: int | None = None,
        width_column: str = "width",
        height_column: str = "height",
        image_column: str | None = None,
        splits: list[str] | None = None,
        bad_samples: Literal["skip", "raise"] | None = None,
        size_threads: int = 8,
        pixel_space: bool = False,
    ) -> None:
        self.mode, self.no_upscale = mode, no_upscale
        # Latent models need sides divisible by the VAE's 8; pixel-space models only by 4.
        self.multiple = 4 if pixel_space else VAE_FACTOR
        self.max_resolution = _pair(max_resolution, "max_resolution")
        self.min_size, self.max_size, self.step = min_size, max_size, step
        self.resolutions = list(resolutions or [self.max_resolution[0]])
        self.weights, self.resolution_policy = weights, resolution_policy
        self.align, self.max_aspect = align, max_aspect
        if batch_size is not None and batch_size < 1:
            raise BucketError(f"bucketing.batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.remainder, self.shuffle = batch_size, remainder, shuffle
        if not 0.0 <= flip_p <= 1.0:
            raise BucketError(f"bucketing.flip_p={flip_p} must be between 0 and 1")
        self.random_crop, self.flip_p, self.resampling = random_crop, flip_p, resampling
        self.seed = seed
        self.width_column, self.height_column, self.image_column = width_column, height_column, image_column
        self.splits = list(splits or ["train"])
        self.bad_samples, self.size_threads = bad_samples, size_threads
        self.table: np.ndarray | None = None
        if mode == "kohya":
            check_step(step)
            if not no_upscale:
                self.table = np.asarray(kohya_bucket_resolutions(self.max_resolution, min_size, max_size, step))
        elif mode == "area":
            for r in self.resolutions:
                area_bucket_resolutions(r, align, max_aspect, self.multiple)  # validates the settings now
            _choose_resolution(np.ones(1, dtype=np.int64), np.asarray(sorted(set(self.resolutions))),
                               self.resolutions, weights, resolution_policy, 0, 0)
        else:
            raise BucketError(f"bucketing.mode={mode!r}: use 'kohya' or 'area'")
        self.widths: np.ndarray | None = None
        self.heights: np.ndarray | None = None
        self.bad: list[tuple[int, str, str]] = []
        self._cache: dict[int, Assignment] = {}
        self.sampler: Any = None
        self.engine: Any = None

    # ------------------------------------------------------------------ setup
    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("rebucket", self._rebucket)
        engine.attach("batch_sampler", self._batch_sampler)
        engine.attach("transform_sample", self._transform_sample)
        engine.attach("stream_bucket", self._stream_bucket)

    def _dataset_plugin(self) -> Any:
        plugins = getattr(self.engine, "plugins", {}) if self.engine is not None else {}
        return next((p for p in plugins.values() if hasattr(p, "record_skipped")), None)

    def _option(self, own: Any, name: str, default: Any) -> Any:
        if own is not None:
            return own
        return getattr(self._dataset_plugin(), name, default)

    @property
    def effective_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(getattr(getattr(self.engine, "runtime", None), "seed", 0) or 0)

    @property
    def epoch_dependent(self) -> bool:
        """Whether buckets change per epoch (area mode drawing resolutions at random)."""
        return self.mode == "area" and self.resolution_policy == "random" and len(set(self.resolutions)) > 1

    # ------------------------------------------------------------- assignment
    def assign(self, widths: Any, heights: Any, *, epoch: int = 0, indices: Any = None) -> Assignment:
        """Buckets, resized sizes and aspect errors for these image sizes."""
        if self.mode == "kohya":
            return kohya_assign(
                widths, heights, None if self.table is None else [tuple(b) for b in self.table],
                no_upscale=self.no_upscale, max_resolution=self.max_resolution, step=self.step,
            )
        return area_assign(
            widths, heights, self.resolutions, weights=self.weights, policy=self.resolution_policy,
            align=self.align, max_aspect=self.max_aspect, multiple=self.multiple, seed=self.effective_seed,
            epoch=epoch, indices=indices,
        )

    def assignment_for(self, epoch: int) -> Assignment:
        """The assignment of the whole data set in ``epoch`` (cached)."""
        if self.widths is None or self.heights is None:
            raise BucketError("bucketing: no sizes yet (the bucketed loader is built at the setup event)")
        key = epoch if self.epoch_dependent else 0
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.assign(self.widths, self.heights, epoch=key)
        return self._cache[key]

    def _rebucket(self, next_impl: Any, epoch: int) -> Assignment:
        return self.assignment_for(epoch)

    # ------------------------------------------------------------------ sizes
    def read_sizes(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(widths, heights)`` from columns, else from image headers (bad ones: 0)."""
        columns = getattr(dataset, "column_names", None) or []
        if self.width_column in columns and self.height_column in columns:
            table = dataset.with_format("numpy")
            return (np.asarray(table[self.width_column], dtype=np.int64),
                    np.asarray(table[self.height_column], dtype=np.int64))
        image_column = self._option(self.image_column, "image_column", "image")
        if image_column not in columns:
            raise BucketError(
                f"bucketing: the data set has neither size columns ({self.width_column!r}, "
                f"{self.height_column!r}) nor an image column {image_column!r}; its columns are {columns}"
            )
        return self._header_sizes(dataset[image_column])

    def _header_sizes(self, sources: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        from .images import BadSampleError, describe_source, image_size

        def one(item: tuple[int, Any]) -> tuple[int, int]:
            index, source = item
            try:
                return image_size(source, describe_source(source, f"sample {index}"))
            except BadSampleError as exc:
                self.bad.append((index, exc.name, exc.reason))
                return 0, 0

        with ThreadPoolExecutor(max(1, self.size_threads)) as pool:
            sizes = list(pool.map(one, enumerate(sources)))
        self.bad.sort()  # threads finish in any order; reports must not
        array = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        return array[:, 0], array[:, 1]

    # ---------------------------------------------------------------- sampler
    def _batch_sampler(self, next_impl: Any, dataset: Any, split: str) -> Any:
        if split not in self.splits:
            return next_impl(dataset, split)
        from .sampler import BucketBatchSampler

        self.bad = []
        self.widths, self.heights = self.read_sizes(dataset)
        self._cache.clear()
        assignment = self.assignment_for(0)
        self._report_unusable(assignment)
        runtime = self.engine.runtime
        dataset_plugin = self._dataset_plugin()
        batch_size = self._option(self.batch_size, "batch_size", 1)
        self.sampler = BucketBatchSampler(
            assignment.bucket,
            batch_size,
            num_replicas=int(runtime.num_processes),
            rank=int(runtime.process_index),
            seed=self.effective_seed,
            shuffle=self.shuffle,
            remainder=self.remainder,
            rebucket=(lambda epoch: self.engine.call("rebucket", epoch).bucket) if self.epoch_dependent else None,
            planner=getattr(dataset_plugin, "planner", None),
            with_epoch=True,
        )
        self._log_buckets(assignment, batch_size * int(runtime.num_processes))
        return self.sampler

    def _report_unusable(self, assignment: Assignment) -> None:
        unusable = np.flatnonzero(assignment.bucket < 0)
        named = {index for index, _, _ in self.bad}
        for index in unusable.tolist():
            if index not in named:
                size = f"{int(self.widths[index])}x{int(self.heights[index])}"  # type: ignore[index]
                self.bad.append((index, f"sample {index}", f"no bucket for size {size}"))
        if not self.bad:
            return
        policy = self._option(self.bad_samples, "bad_samples", "skip")
        if policy == "raise":
            index, name, reason = self.bad[0]
            raise BucketError(f"{name}: {reason} (sample {index}; {len(self.bad)} such samples); "
                              "set bad_samples=skip to leave them out")
        plugin = self._dataset_plugin()
        if plugin is not None:
            plugin.record_skipped(self.bad)
        else:
            logger.warning("bucketing: %d samples left out, first: %s (%s)", len(self.bad), self.bad[0][1], self.bad[0][2])

    def _log_buckets(self, assignment: Assignment, group: int) -> None:
        counts = assignment.counts()
        small = {b: c for b, c in counts.items() if c < group}
        logger.info("bucketing: %d samples in %d buckets: %s", int((assignment.bucket >= 0).sum()), len(counts), counts)
        self._write_report(counts, small)
        if small and self.remainder != "pad":
            logger.warning(
                "bucketing: %d buckets hold fewer samples than one batch (%d) and give no full batch "
                "this epoch under remainder=%r: %s", len(small), group, self.remainder, small,
            )

    def _write_report(self, counts: dict[Any, int], small: dict[Any, int]) -> None:
        """``RUN_DIR/buckets.json``: samples per bucket and those left out, for people."""
        import json
        from pathlib import Path

        state = self.engine.state
        if not state.run_dir or not state.is_main_process:
            return
        report = {
            "buckets": {f"{w}x{h}": c for (w, h), c in counts.items()},  # width x height
            "below_one_batch": {f"{w}x{h}": c for (w, h), c in small.items()},
            "left_out": [{"sample": str(name), "reason": str(reason)} for _, name, reason in self.bad],
        }
        path = Path(state.run_dir) / "buckets.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))

    # -------------------------------------------------------------- transform
    def _transform_sample(self, next_impl: Any, sample: dict[str, Any]) -> Any:
        if sample.get("__split__", "train") not in self.splits:
            return next_impl(sample)
        image_column = self._option(self.image_column, "image_column", "image")
        image = sample.get(image_column)
        if image is None or not hasattr(image, "size"):
            return next_impl(sample)
        index = int(sample["__index__"])
        epoch = int(sample.get("__epoch__", 0) or 0)
        width, height = image.size
        if sample.get("__stream__") or self.widths is None:
            assignment = self.assign([width], [height], epoch=epoch, indices=[index])
            row = 0
        else:
            assignment, row = self.assignment_for(epoch), index
        bucket = assignment.buckets[assignment.bucket[row]]
        resized = assignment.resized[row]
        if self.widths is not None and not sample.get("__stream__") and (
            width != self.widths[index] or height != self.heights[index]  # type: ignore[index]
        ):  # the size columns were wrong: cover the bucket from the real size
            resized = cover_size(np.asarray([width]), np.asarray([height]), bucket[:1], bucket[1:])[0]
        left, top = crop_offsets(resized, bucket, random=self.random_crop, seed=self.effective_seed,
                                 epoch=epoch, indices=[index])[0]
        from .images import resize_crop

        image = resize_crop(image, resized, bucket, (left, top), self.resampling)
        flipped = bool(self.flip_p and uniforms(self.effective_seed, epoch, [index], 4)[0] < self.flip_p)
        if flipped:
            from PIL import Image

            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = int(resized[0]) - int(left) - int(bucket[0])  # the crop as seen in the flipped image
        sample[image_column] = image
        sample["original_size_hw"] = (int(height), int(width))
        sample["crop_top_left"] = (int(top), int(left))
        sample["target_size_hw"] = (int(bucket[1]), int(bucket[0]))
        sample["flipped"] = flipped
        return next_impl(sample)

    def _stream_bucket(self, next_impl: Any, sample: dict[str, Any], split: str = "train") -> Any:
        if split not in self.splits:
            return next_impl(sample, split)
        if self.width_column in sample and self.height_column in sample:
            width, height = int(sample[self.width_column]), int(sample[self.height_column])
        else:
            from .images import describe_source, image_size

            source = sample.get(self._option(self.image_column, "image_column", "image"))
            width, height = image_size(source, describe_source(source))
        assignment = self.assign([width], [height], epoch=int(sample.get("__epoch__", 0) or 0),
                                 indices=[int(sample.get("__index__", 0))])
        if assignment.bucket[0] < 0:
            from .images import BadSampleError

            raise BadSampleError(str(sample.get("__name__", "stream sample")), f"no bucket for size {width}x{height}")
        w, h = assignment.buckets[assignment.bucket[0]]
        return int(w), int(h)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The dataset plugin applies the same sampler state when its loaders exist.
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
