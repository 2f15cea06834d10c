"""The ``bucketing`` plugin: aspect-ratio buckets for the dataset plugin's loaders.

The algorithms (bucket lists, vectorised assignment, crop offsets, per-sample noise) are
in :mod:`hookengine.data.buckets`. Sizes are ``(width, height)`` as there; batches carry
the SDXL conditioning in ``(height, width)`` / ``(top, left)`` order under explicit names.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from .buckets import (
    VAE_FACTOR,
    Assignment,
    BucketError,
    _choose_resolution,
    _pair,
    area_assign,
    area_bucket_resolutions,
    check_step,
    cover_size,
    crop_offsets,
    kohya_assign,
    kohya_bucket_resolutions,
    uniforms,
)

__all__ = ["Bucketing", "MODE_OPTIONS"]

logger = logging.getLogger(__name__)

# The options of each mode; an option of the other mode is an error, not ignored.
MODE_OPTIONS = {
    "kohya": ("max_resolution", "min_size", "max_size", "step", "no_upscale"),
    "area": ("resolutions", "weights", "resolution_policy", "align", "max_aspect"),
}


def _default_step(max_resolution: tuple[int, int]) -> int:
    """kohya's 64 from 512 px up; smaller resolutions get a finer step (power of 2, >= 8)."""
    step = 64
    while step > VAE_FACTOR and step * 8 > min(max_resolution):
        step //= 2
    return step


def _default_min_size(max_resolution: tuple[int, int], step: int) -> int:
    """Half the shorter side, down to the step (kohya's 256 at 512)."""
    return max(step, min(max_resolution) // 2 // step * step)


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

    Options of the other mode are errors naming the option and the mode (kohya mode
    never silently ignores ``resolutions``). What does not fill a batch follows the
    dataset plugin's ``remainder`` (one policy for the data, one default: ``pad``);
    ``RUN_DIR/buckets.json`` reports, for each epoch, what every process trained on and
    what was left out, repeated or carried.

    Args:
        mode: ``kohya`` or ``area``.
        max_resolution, min_size, max_size, step, no_upscale: kohya mode only
            (``max_resolution`` is one side or ``(width, height)``, default 512). Unset,
            the sizes scale with ``max_resolution`` (its shorter side ``s``, its longer
            ``l``): ``step`` is the power of 2 nearest below ``s / 8`` between 8 and 64,
            ``min_size`` is ``s / 2`` rounded down to the step, ``max_size`` is ``2 l``;
            at 512 these are kohya's defaults (64, 256, 1024). Settings that leave a
            single bucket (e.g. ``min_size`` above ``max_resolution``) are errors.
        resolutions, weights, resolution_policy, align, max_aspect: area mode only;
            several resolutions at once (default ``[512]``), drawn with ``weights``
            (``random``) or the largest that the image reaches (``fit``).
        batch_size: per process (default: the dataset plugin's).
        shuffle: shuffle inside buckets and across batches (default: the dataset plugin's).
        random_crop, flip_p, resampling: augmentation and the resize filter.
        seed: default the dataset plugin's seed (the engine's).
        width_column, height_column: read sizes from these columns when present (no
            image is opened); otherwise sizes come from the image headers.
        image_column: the image column (default: the dataset plugin's).
        splits: the loaders that are bucketed.
        bad_samples: ``skip`` or ``raise`` for unreadable images found while sizing
            (default: the dataset plugin's policy).
        size_threads: threads reading image headers for their sizes.
        pixel_space: the model works on pixels (no VAE): ``align`` may be a multiple of 4.
    """

    name = "bucketing"

    def __init__(
        self,
        mode: Literal["kohya", "area"] = "kohya",
        max_resolution: int | tuple[int, int] | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        step: int | None = None,
        no_upscale: bool | None = None,
        resolutions: list[int] | None = None,
        weights: list[float] | None = None,
        resolution_policy: Literal["fit", "random"] | None = None,
        align: int | None = None,
        max_aspect: float | None = None,
        batch_size: int | None = None,
        shuffle: bool | None = None,
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
        if mode not in MODE_OPTIONS:
            raise BucketError(f"bucketing.mode={mode!r}: use 'kohya' or 'area'")
        given = {"max_resolution": max_resolution, "min_size": min_size, "max_size": max_size, "step": step,
                 "no_upscale": no_upscale, "resolutions": resolutions, "weights": weights,
                 "resolution_policy": resolution_policy, "align": align, "max_aspect": max_aspect}
        other = "area" if mode == "kohya" else "kohya"
        for option in MODE_OPTIONS[other]:
            if given[option] is not None:
                raise BucketError(
                    f"bucketing.{option} does not apply to mode {mode!r} (it is an option of mode {other!r}); "
                    f"remove it, or set mode: {other}" + (" (kohya mode takes max_resolution)" if option == "resolutions" else "")
                )
        self.mode, self.no_upscale = mode, bool(no_upscale)
        # Latent models need sides divisible by the VAE's 8; pixel-space models only by 4.
        self.multiple = 4 if pixel_space else VAE_FACTOR
        self.max_resolution = _pair(512 if max_resolution is None else max_resolution, "max_resolution")
        self.step = _default_step(self.max_resolution) if step is None else step
        self.min_size = _default_min_size(self.max_resolution, self.step) if min_size is None else min_size
        self.max_size = 2 * max(self.max_resolution) if max_size is None else max_size
        self.resolutions = list(resolutions or [512])
        self.weights, self.resolution_policy = weights, resolution_policy or "fit"
        self.align = 64 if align is None else align
        self.max_aspect = 4.0 if max_aspect is None else max_aspect
        if batch_size is not None and batch_size < 1:
            raise BucketError(f"bucketing.batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle = batch_size, shuffle
        self.remainder: str | None = None  # the dataset plugin's, read when the sampler is built
        if not 0.0 <= flip_p <= 1.0:
            raise BucketError(f"bucketing.flip_p={flip_p} must be between 0 and 1")
        self.random_crop, self.flip_p, self.resampling = random_crop, flip_p, resampling
        self.seed = seed
        self.width_column, self.height_column, self.image_column = width_column, height_column, image_column
        self.splits = list(splits or ["train"])
        self.bad_samples, self.size_threads = bad_samples, size_threads
        self.table: np.ndarray | None = None
        if mode == "kohya":
            check_step(self.step)
            if not self.no_upscale:
                self.table = np.asarray(
                    kohya_bucket_resolutions(self.max_resolution, self.min_size, self.max_size, self.step)
                )
                self._check_table(given)
        else:
            for r in self.resolutions:
                area_bucket_resolutions(r, self.align, self.max_aspect, self.multiple)  # validates the settings now
            _choose_resolution(np.ones(1, dtype=np.int64), np.asarray(sorted(set(self.resolutions))),
                               self.resolutions, weights, self.resolution_policy, 0, 0)
        self.widths: np.ndarray | None = None
        self.heights: np.ndarray | None = None
        self.bad: list[tuple[int, str, str]] = []
        # split -> what buckets.json says (buckets, unusable samples, per-epoch accounting).
        self.reports: dict[str, dict[str, Any]] = {}
        self._data: dict[str, Any] = {}
        self._cache: dict[int, Assignment] = {}
        self.sampler: Any = None
        self.engine: Any = None

    def _check_table(self, given: dict[str, Any]) -> None:
        """Sizes that leave one bucket are a mistake (64 px buckets with min_size 256)."""
        assert self.table is not None
        square = int(self.table.max(initial=0)) if len(self.table) == 1 else None
        if square is not None and self.min_size != self.max_size:
            set_here = ", ".join(f"{k}={given[k]}" for k in ("min_size", "max_size", "step") if given[k] is not None)
            raise BucketError(
                f"bucketing: max_resolution={self.max_resolution[0] if self.max_resolution[0] == self.max_resolution[1] else self.max_resolution}"
                f" with min_size={self.min_size}, max_size={self.max_size}, step={self.step} leaves one bucket "
                f"({square}x{square}): every image would be cropped square; min_size must be at most half of "
                f"max_resolution for other aspect ratios" + (f" (set here: {set_here}; leave them unset to "
                                                             "scale with max_resolution)" if set_here else "")
            )

    # ------------------------------------------------------------------ setup
    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("rebucket", self._rebucket)
        engine.attach("batch_sampler", self._batch_sampler)
        engine.attach("decode_sample", self._decode_sample)
        engine.attach("transform_sample", self._transform_sample)
        engine.attach("stream_bucket", self._stream_bucket)

    def _data_options(self, split: str = "train") -> dict[str, Any]:
        """The dataset plugin's shared settings (its ``data_options`` slot), cached per split."""
        cache = self.__dict__.setdefault("_data_options_cache", {})
        if split not in cache:
            cache[split] = dict(self.engine.call("data_options", split)) if self.engine is not None else {}
        return cache[split]

    def _option(self, own: Any, name: str, default: Any, split: str = "train") -> Any:
        if own is not None:
            return own
        return self._data_options(split).get(name, default)

    @property
    def effective_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        from_data = self._data_options().get("seed") if self.engine is not None else None
        if from_data is not None:
            return int(from_data)
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
    def read_sizes(self, dataset: Any, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(widths, heights)`` from columns, else from image headers (bad ones: 0; so are
        images over the dataset's ``max_pixels`` that it would not decode)."""
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
        return self._header_sizes(dataset[image_column], self._option(None, "max_pixels", None, split))

    def _header_sizes(self, sources: list[Any], max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        from .images import BadSampleError, describe_source, image_size

        def one(item: tuple[int, Any]) -> tuple[int, int]:
            index, source = item
            try:
                return image_size(source, describe_source(source, f"sample {index}"), max_pixels)
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
        self._data[split] = dataset
        self.widths, self.heights = self.read_sizes(dataset, split)
        self._cache.clear()
        assignment = self.assignment_for(0)
        self._report_unusable(assignment, split)
        runtime = self.engine.runtime
        batch_size = self._option(self.batch_size, "batch_size", 1, split)
        self.remainder = self._option(None, "remainder", "pad", split)
        num_replicas = int(runtime.num_processes)
        self.reports[split] = {"split": split, "epochs": {}}
        self._log_buckets(assignment, batch_size * num_replicas, split)
        sampler = BucketBatchSampler(
            assignment.bucket,
            batch_size,
            num_replicas=num_replicas,
            rank=int(runtime.process_index),
            seed=self.effective_seed,
            shuffle=self._option(self.shuffle, "shuffle", True, split),
            remainder=self.remainder,
            rebucket=(lambda epoch: self.engine.call("rebucket", epoch).bucket) if self.epoch_dependent else None,
            planner=lambda *args, **kwargs: self.engine.call("reshuffle", *args, **kwargs),
            with_epoch=True,
            # After a resume on another world the sampler yields a share of the saved global batch.
            on_plan=lambda epoch, plan: self._report_epoch(epoch, plan, sampler.global_batch // num_replicas,
                                                           num_replicas, split),
        )
        if split == "train":
            self.sampler = sampler
        sampler.plan()  # epoch 0 now: its accounting is in buckets.json before the first step
        return sampler

    def _report_unusable(self, assignment: Assignment, split: str = "train") -> None:
        unusable = np.flatnonzero(assignment.bucket < 0)
        named = {index for index, _, _ in self.bad}
        for index in unusable.tolist():
            if index not in named:
                size = f"{int(self.widths[index])}x{int(self.heights[index])}"  # type: ignore[index]
                self.bad.append((index, f"sample {index}", f"no bucket for size {size}"))
        if not self.bad:
            return
        policy = self._option(self.bad_samples, "bad_samples", "skip", split)
        if policy == "raise":
            index, name, reason = self.bad[0]
            raise BucketError(f"{name}: {reason} (sample {index}; {len(self.bad)} such samples); "
                              "set bad_samples=skip to leave them out")
        # The dataset plugin counts, names and logs skipped samples (its record_skipped slot).
        self.engine.call("record_skipped", self.bad)

    def _log_buckets(self, assignment: Assignment, group: int, split: str = "train") -> None:
        counts = assignment.counts()
        small = {b: c for b, c in counts.items() if c < group}
        logger.info("bucketing: %d samples in %d buckets: %s", int((assignment.bucket >= 0).sum()), len(counts), counts)
        self.reports[split].update({
            "buckets": {f"{w}x{h}": c for (w, h), c in counts.items()},  # width x height
            "below_one_batch": {f"{w}x{h}": c for (w, h), c in small.items()},
            "remainder": self.remainder,
            "left_out": [{"sample": str(name), "reason": str(reason)} for _, name, reason in self.bad],
        })
        if small and self.remainder == "drop":
            logger.warning(
                "bucketing: %d buckets hold fewer samples than one batch (%d) and give no full batch "
                "this epoch under remainder='drop': %s", len(small), group, small,
            )

    def _report_epoch(self, epoch: int, plan: Any, batch_size: int, num_replicas: int, split: str) -> None:
        from .sampler import epoch_report

        names = lambda index: self._sample_name(split, index)  # noqa: E731
        self.reports[split]["epochs"][str(epoch)] = epoch_report(plan, epoch, batch_size, num_replicas, names)
        self._write_report(split)

    def _sample_name(self, split: str, index: int) -> str:
        """A sample's file when the data has image paths, else ``sample <index>``."""
        from .images import describe_source

        data = self._data.get(split)
        column = self._option(self.image_column, "image_column", "image", split)
        try:
            return describe_source(data[int(index)][column], f"sample {index}")
        except Exception:  # noqa: BLE001 - a name for a report only
            return f"sample {index}"

    def _write_report(self, split: str = "train") -> None:
        """``RUN_DIR/buckets.json`` (``buckets_<split>.json`` for other splits): samples per
        bucket, those left out as unusable, and per epoch what every process trained on
        and what was dropped, repeated or carried; for people."""
        import json
        from pathlib import Path

        state = self.engine.state
        if not state.run_dir or not state.is_main_process:
            return
        path = Path(state.run_dir) / ("buckets.json" if split == "train" else f"buckets_{split}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.reports[split], indent=1))

    # -------------------------------------------------------------- transform
    def _decode_sample(self, next_impl: Any, sample: dict[str, Any]) -> Any:
        """Tell the decoder the size the image is resized to: a large JPEG decodes reduced."""
        if (sample.get("__split__", "train") in self.splits and not sample.get("__stream__")
                and self.widths is not None and "__index__" in sample):
            index = int(sample["__index__"])
            assignment = self.assignment_for(int(sample.get("__epoch__", 0) or 0))
            if 0 <= index < len(assignment) and assignment.bucket[index] >= 0:
                sample["__decode_size__"] = tuple(int(v) for v in assignment.resized[index])
        return next_impl(sample)

    def _transform_sample(self, next_impl: Any, sample: dict[str, Any]) -> Any:
        if sample.get("__split__", "train") not in self.splits:
            return next_impl(sample)
        image_column = self._option(self.image_column, "image_column", "image")
        image = sample.get(image_column)
        if image is None or not hasattr(image, "size"):
            return next_impl(sample)
        index = int(sample["__index__"])
        epoch = int(sample.get("__epoch__", 0) or 0)
        # The file's size: a large JPEG may have been decoded at 1/2, 1/4 or 1/8 of it.
        width, height = sample.get("__original_size__") or image.size
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
