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

__all__ = ["Bucketing"]

logger = logging.getLogger(__name__)


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
