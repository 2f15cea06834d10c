"""The ``dataset`` plugin: ``datasets.load_dataset`` with hooks on every level.

Slots (each a default implementation that a user wraps or replaces with
``engine.attach(name, fn)``):

=====================  ==============================================================
``load_dataset``       ``(spec) -> Dataset | IterableDataset | DatasetDict``
``decode_sample``      ``(sample) -> sample``: open and validate the image, check the caption
``transform_sample``   ``(sample) -> sample``: per-sample work; the default makes a tensor
``collate``            ``(samples) -> batch``
``transform_batch``    ``(batch) -> batch``
``batch_sampler``      ``(dataset, split) -> sampler``: the default shuffles per epoch
``reshuffle``          the per-epoch plan (same arguments as :func:`~.sampler.plan_epoch`)
``stream_bucket``      ``(sample) -> key``: groups a stream into batches (default: one group)
``make_dataloader``    ``(dataset, split) -> loader``
``required_keys``      ``(split) -> {key: who}``: batch keys other plugins need (checked at setup)
``data_options``       ``(split) -> dict``: the settings other data plugins share (one
                       ``batch_size``, ``remainder``, ``seed``... for the dataset and bucketing)
``record_skipped``     ``(entries)``: count, name and log skipped samples found elsewhere
=====================  ==============================================================

The loaders are built at the ``setup`` event (so plugins used after this one, such as
``bucketing``, have attached their hooks) and registered in ``state.dataloaders``. They
are never passed through ``accelerator.prepare``: samplers shard by rank themselves.

A bad sample (corrupt, truncated, zero-sized image, decompression bomb, an image over
``max_pixels``, a missing caption, a caption file that is not UTF-8...) is skipped or
raises, by ``bad_samples``. Skipped samples are counted in ``state.metrics``
(``data/skipped``), named in :attr:`DatasetPlugin.skipped`, logged, and appended to
``skipped_samples.jsonl`` in the run folder; training goes on.

What cannot be skipped is found at setup, before the first step: a configured column
(``image_column``, ``caption_column``, ``required_columns``) or a key another plugin
declared through ``required_keys`` that the data does not have is an error naming it
and the columns that exist.

Captions: whatever their source (a column, ``.txt``/``.caption`` files next to the
images), each sample carries its caption text under ``"caption"`` and batches have
``batch["caption"]``, a list of str.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import numpy as np

from ..core.points import BASE_PRIORITY, Point
from .images import BadSampleError, decode_image, describe_source, to_tensor

__all__ = ["DatasetPlugin", "Skipped", "MapDataset", "StreamBatches", "StreamItems", "default_collate"]

logger = logging.getLogger(__name__)

SLOTS = (
    "load_dataset",
    "decode_sample",
    "transform_sample",
    "collate",
    "transform_batch",
    "batch_sampler",
    "reshuffle",
    "stream_bucket",
    "make_dataloader",
    "required_keys",
    "data_options",
    "record_skipped",
)

# Caption columns looked for, in order, when caption_column is not given.
CAPTION_COLUMNS = ("caption", "text", "prompt")
# PIL's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS), without importing PIL.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class Skipped:
    """Marker returned for a bad sample under ``bad_samples="skip"``."""

    index: int
    name: str
    reason: str


# ------------------------------------------------------------------ sample plumbing
def _key(item: Any) -> tuple[int, int | None]:
    """Sampler items are an index or an ``(index, epoch)`` pair (epoch reaches workers)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


class _Pipeline:
    """The per-sample and per-batch hooks, callable inside DataLoader workers."""

    def __init__(self, call: Callable[..., Any], bad_samples: str, split: str = "train", stream: bool = False) -> None:
        self.call = call
        self.bad_samples = bad_samples
        self.split, self.stream = split, stream

    def sample(self, raw: dict[str, Any], index: int, epoch: int | None) -> Any:
        sample = dict(raw)
        sample["__index__"] = index
        sample["__split__"] = self.split
        if self.stream:
            sample["__stream__"] = True
        if epoch is not None:
            sample["__epoch__"] = epoch
        try:
            sample = self.call("decode_sample", sample)
            return self.call("transform_sample", sample)
        except BadSampleError as exc:
            if self.bad_samples == "raise":
                raise BadSampleError(
                    exc.name, exc.reason, f"sample {index}; set dataset.bad_samples=skip to skip such samples"
                ) from exc
            return Skipped(index, exc.name, exc.reason)

    def batch(self, samples: list[Any]) -> Any:
        skipped = [s for s in samples if isinstance(s, Skipped)]
        good = [s for s in samples if not isinstance(s, Skipped)]
        batch = self.call("transform_batch", self.call("collate", good)) if good else {}
        if isinstance(batch, dict):
            batch["skipped"] = [(s.index, s.name, s.reason) for s in skipped]
        return batch


class MapDataset:
    """A map-style torch data set over a Hugging Face ``Dataset`` with the sample hooks."""

    def __init__(self, data: Any, pipeline: _Pipeline) -> None:
        self.data = data
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: Any) -> Any:
        index, epoch = _key(item)
        try:
            raw = self.data[index]
        except UnicodeDecodeError as exc:  # arrow holds the bytes; Python cannot read the row
            if self.pipeline.bad_samples == "raise":
                raise BadSampleError(f"sample {index}", "invalid UTF-8 text", str(exc)) from None
            return Skipped(index, f"sample {index}", "invalid UTF-8 text")
        return self.pipeline.sample(raw, index, epoch)


class StreamBatches:
    """A batch sampler over an iterable (streaming) data set, grouped by ``key_fn``.

    It runs in the main process of every rank: it reads the stream in the same order on
    every rank (the raw records only; images stay undecoded), groups them by key, and when
    a group holds a *global* batch of ``batch_size * num_replicas`` records it yields this
    rank's slice. The records themselves are the "indices": :class:`StreamItems` decodes
    and transforms them, in DataLoader workers when there are some. So ranks draw from
    the same group at each step, get disjoint samples and the same number of steps, the
    batch order does not depend on the workers, and a resume skips ``start`` global
    batches without decoding anything. ``remainder``: ``drop`` or ``pad`` (repeat from the
    group) for groups left unfilled at the end of the stream; ``carry`` acts as ``drop``.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        key_fn: Callable[[dict[str, Any]], Any] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        remainder: str = "drop",
        seed: int = 0,
        shuffle_buffer: int = 0,
        bad_samples: str = "skip",
    ) -> None:
        self.data = data
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.key_fn = key_fn or (lambda sample: 0)
        self.remainder, self.seed, self.shuffle_buffer = remainder, seed, shuffle_buffer
        self.bad_samples = bad_samples
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch_index: int) -> None:
        self.start = int(batch_index)

    def _stream(self) -> Any:
        data = self.data
        if self.shuffle_buffer:
            data = data.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            data.set_epoch(self.epoch)
        return data

    def global_batches(self) -> Iterator[list[tuple[Any, ...]]]:
        """Every global batch of ``(position, epoch, record)`` items, in order.

        Records whose key cannot be read follow as ``("skipped", position, name, reason)``
        items, reported with the next batch of every rank.
        """
        group = self.batch_size * self.num_replicas
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        skipped: list[tuple[Any, ...]] = []
        for position, raw in enumerate(self._stream()):
            try:
                key = self.key_fn({**raw, "__index__": position, "__epoch__": self.epoch})
            except BadSampleError as exc:
                if self.bad_samples == "raise":
                    raise
                skipped.append(("skipped", position, exc.name, exc.reason))
                continue
            members = groups.setdefault(key, [])
            members.append((position, self.epoch, raw))
            if len(members) == group:
                del groups[key]
                yield members + skipped
                skipped = []
        for key, members in groups.items():
            if self.remainder == "pad":
                yield [members[i % len(members)] for i in range(group)] + skipped
                skipped = []
            elif members:
                logger.info("stream: %d samples of group %s do not fill a batch: left out", len(members), key)

    def __iter__(self) -> Iterator[list[tuple[Any, ...]]]:
        start, self.start = self.start, 0  # a start applies to one epoch only
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        group = self.batch_size * self.num_replicas
        for j, items in enumerate(self.global_batches()):
            if j >= start:
                yield items[lo:hi] + items[group:]


class StreamItems:
    """The "data set" of a streamed loader: each item is a record to decode and transform."""

    def __init__(self, pipeline: _Pipeline) -> None:
        self.pipeline = pipeline

    def __getitem__(self, item: tuple[Any, ...]) -> Any:
        if item[0] == "skipped":
            return Skipped(int(item[1]), str(item[2]), str(item[3]))
        position, epoch, raw = item
        return self.pipeline.sample(raw, int(position), int(epoch))


# --------------------------------------------------------------------------- collate
def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (same-shaped tensors, numbers); keep lists of the rest.

    ``__index__`` becomes ``index``; other ``__private__`` keys are dropped.
    """
    import torch

    batch: dict[str, Any] = {}
    if not samples:
        return batch
    for key in samples[0]:
        values = [s.get(key) for s in samples]
        name = "index" if key == "__index__" else key
        if key.startswith("__") and key != "__index__":
            continue
        batch[name] = _stack(values, torch)
    return batch


def _stack(values: list[Any], torch: Any) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and all(
        isinstance(v, torch.Tensor) and v.shape == first.shape for v in values
    ):
        return torch.stack(values)
    if isinstance(first, (bool, int, float, np.integer, np.floating)) and all(
        isinstance(v, (bool, int, float, np.integer, np.floating)) for v in values
    ):
        return torch.tensor(values)
    if isinstance(first, (tuple, list)) and first and all(
        isinstance(v, (tuple, list)) and len(v) == len(first) and all(isinstance(x, (int, float)) for x in v)
        for v in values
    ):
        return torch.tensor(values)
    return values


# ---------------------------------------------------------------------------- plugin
class DatasetPlugin:
    """Data sets through ``datasets.load_dataset``, with hooks on every level.

    Args:
        path: what ``load_dataset`` loads: a hub name (read through the cache), a
            builder (``csv``, ``json``, ``parquet``, ``text``, ``imagefolder``) or a folder.
        config: the data set configuration name (``load_dataset``'s ``name``).
        data_files, data_dir: as in ``load_dataset``.
        generator, gen_kwargs: ``module:attr`` of a generator function for
            ``Dataset.from_generator`` (``IterableDataset.from_generator`` when streaming),
            and its arguments.
        split, val_split: the splits for the ``train`` and ``val`` loaders.
        streaming: load an iterable data set (never fully downloaded or decoded).
        load_options: more keyword arguments for ``load_dataset``.
        image_column: the image column (default: ``image`` when the data has one). A
            column given here that the data lacks is an error at setup.
        caption_column: the caption column. Default (auto): the first of ``caption``,
            ``text``, ``prompt`` among the columns of an image data set, else caption
            files next to the images when there are any. A column given here that the
            data lacks is an error at setup; ``false``: no captions. Whatever the source,
            the text is delivered as ``sample["caption"]`` / ``batch["caption"]`` (list of
            str; ``""`` for an image without one), and an empty caption in the column is
            read from the image's caption file when there is one.
        caption_extension: the caption files' extension(s), tried in order
            (``<image stem><extension>``, kohya's layout). A caption file that is not valid
            UTF-8 makes its sample a bad sample, named by the file.
        require_caption: a sample without a caption is a bad sample.
        required_columns: more columns the data must have (checked at setup, named with
            the columns that exist), e.g. the ``label`` a routine reads.
        max_pixels: an image of more pixels is a bad sample (default: PIL's own
            decompression-bomb warning threshold, about 89.5 million); a JPEG that a 1/2,
            1/4 or 1/8 scale brings under it is decoded at that scale instead (never whole).
            ``null``: no limit but PIL's (twice that; above it the image is a bad sample).
        batch_size, val_batch_size: samples per batch on each process.
        shuffle: reshuffle per epoch from ``(seed, epoch)``.
        remainder: what happens to samples that do not fill a batch (``drop``, ``pad``,
            ``carry``; see :mod:`hookengine.data.sampler`). The one policy of the data:
            the ``bucketing`` plugin follows it too.
        num_workers, persistent_workers, pin_memory, prefetch_factor: DataLoader
            settings (``pin_memory`` defaults to whether CUDA is available).
        bad_samples: ``skip`` (count, name, go on) or ``raise``.
        strict_modes: treat images that are not RGB or L (CMYK, 16-bit, alpha) as bad
            instead of converting them.
        image_tensor: turn the image into a ``(3, H, W)`` tensor in ``[-1, 1]``.
        seed: shuffling seed (default: the engine's seed).
        shuffle_buffer: buffer of ``IterableDataset.shuffle`` when streaming (0: off),
            reshuffled per epoch from ``(seed, epoch)``.
    """

    name = "dataset"
    hook_points = [
        Point("required_keys", "slot", ("split",),
              "Batch keys plugins need from a split, {key: who}; a missing one fails at setup.", "dataset"),
        Point("data_options", "slot", ("split",),
              "The data settings other data plugins share (batch_size, remainder, seed...).", "dataset"),
        Point("record_skipped", "slot", ("entries",),
              "Count, name and log skipped samples [(index, name, reason)], each once per run.", "dataset"),
    ]

    def __init__(
        self,
        path: str | None = None,
        config: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        data_dir: str | None = None,
        generator: str | None = None,
        gen_kwargs: dict[str, Any] | None = None,
        split: str = "train",
        val_split: str | None = None,
        streaming: bool = False,
        load_options: dict[str, Any] | None = None,
        image_column: str | None = None,
        caption_column: str | bool | None = None,
        caption_extension: str | list[str] = [".txt", ".caption"],  # noqa: B006 - never mutated
        require_caption: bool = False,
        required_columns: list[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        remainder: Literal["drop", "pad", "carry"] = "pad",
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        bad_samples: Literal["skip", "raise"] = "skip",
        strict_modes: bool = False,
        image_tensor: bool = True,
        seed: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        if path is None and generator is None:
            raise ValueError("dataset: give dataset.path (name, builder or folder) or dataset.generator")
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"dataset.num_workers must be >= 0, got {num_workers}")
        self.path, self.config, self.data_files, self.data_dir = path, config, data_files, data_dir
        self.generator, self.gen_kwargs = generator, gen_kwargs or {}
        self.split, self.val_split, self.streaming = split, val_split, streaming
        self.load_options = load_options or {}
        if caption_column is True:
            raise ValueError("dataset.caption_column: give a column name, or false for no captions")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"dataset.max_pixels must be >= 1 (or null), got {max_pixels}")
        self.explicit_image_column = image_column
        self.image_column = image_column or "image"
        self.caption_column = caption_column
        extensions = [caption_extension] if isinstance(caption_extension, str) else list(caption_extension)
        self.caption_extensions = tuple(e if e.startswith(".") else "." + e for e in extensions)
        self.require_caption = require_caption
        self.required_columns = list(required_columns or [])
        self.max_pixels = max_pixels
        self.replaced_utf8 = False  # a csv with bytes that are not UTF-8 was read replaced
        # split -> ("column", name) or ("files", None) or None, resolved at setup.
        self.captions: dict[str, tuple[str, str | None] | None] = {}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.shuffle, self.remainder = shuffle, remainder
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.bad_samples, self.strict_modes, self.image_tensor = bad_samples, strict_modes, image_tensor
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.datasets: dict[str, Any] = {}
        self.loaders: dict[str, Any] = {}
        self.skipped: list[dict[str, Any]] = []
        self._seen_skips: set[tuple[int, str]] = set()
        self.engine: Any = None

    # ------------------------------------------------------------------- setup
    def setup(self, engine: Any) -> None:
        self.engine = engine
        for slot in SLOTS:
            # Base implementations: plugins that wrap them work whatever the order of use.
            engine.attach(slot, getattr(self, f"_{slot}"), priority=BASE_PRIORITY)
        engine.on("setup", self.build)
        engine.on("batch_start", self._on_batch)

    @property
    def effective_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(getattr(self.engine.runtime, "seed", 0) or 0) if self.engine else 0

    def spec(self) -> dict[str, Any]:
        """What ``load_dataset`` is asked for (passed to the ``load_dataset`` slot)."""
        return {
            "path": self.path,
            "name": self.config,
            "data_files": self.data_files,
            "data_dir": self.data_dir,
            "streaming": self.streaming,
            "generator": self.generator,
            "gen_kwargs": self.gen_kwargs,
            **self.load_options,
        }

    def build(self, state: Any = None) -> dict[str, Any]:
        """Load the data and register the loaders (once; the ``setup`` event calls it)."""
        if self.loaders:
            return self.loaders
        engine = self.engine
        loaded = engine.call("load_dataset", self.spec())
        for split_name, wanted in (("train", self.split), ("val", self.val_split)):
            if wanted is None:
                continue
            data = self._pick_split(loaded, wanted, split_name)
            self.datasets[split_name] = self._prepare_columns(data, split_name)
            self.loaders[split_name] = engine.call("make_dataloader", self.datasets[split_name], split_name)
            self._check_required_keys(self.datasets[split_name], split_name)
            engine.state.dataloaders[split_name] = self.loaders[split_name]
        self._apply_sampler_state()
        return self.loaders

    def _pick_split(self, loaded: Any, wanted: str, role: str) -> Any:
        if not _is_dict_of_splits(loaded):
            return loaded
        if wanted not in loaded:
            key = "split" if role == "train" else "val_split"
            raise KeyError(f"dataset.{key}={wanted!r}: the data set has splits {sorted(loaded)}")
        return loaded[wanted]

    def describe(self, split: str = "train") -> str:
        """The data set in messages: its path or generator, and the split."""
        wanted = self.split if split == "train" else self.val_split
        where = self.data_files or self.data_dir
        return f"{self.path or self.generator!r}" + (f" ({where})" if where else "") + f" (split {wanted!r})"

    def _prepare_columns(self, data: Any, split: str = "train") -> Any:
        """Keep images undecoded (we decode and validate them), check for emptiness, check
        the configured columns and find where captions come from."""
        import datasets

        features = getattr(data, "features", None) or {}
        if self.image_column in features and isinstance(features[self.image_column], datasets.Image):
            data = data.cast_column(self.image_column, datasets.Image(decode=False))
        if not isinstance(data, datasets.IterableDataset) and len(data) == 0:
            raise ValueError(f"dataset: the data set {self.describe(split)} is empty")
        columns = column_names(data)
        for option, column in (("image_column", self.explicit_image_column),
                               ("caption_column", self.caption_column or None),
                               *(("required_columns", c) for c in self.required_columns)):
            if column is not None and column not in columns:
                raise ValueError(
                    f"dataset.{option}: the data set {self.describe(split)} has no column {column!r}; "
                    f"its columns are {columns}"
                )
        self.captions[split] = self._find_captions(data, columns)
        if self.require_caption and self.captions[split] is None:
            raise ValueError(
                f"dataset.require_caption: the data set {self.describe(split)} has no caption column "
                f"(looked for {list(CAPTION_COLUMNS)}; its columns are {columns}) and no caption files "
                f"({', '.join(self.caption_extensions)}) next to its images; set dataset.caption_column"
            )
        return data

    def _find_captions(self, data: Any, columns: list[str]) -> tuple[str, str | None] | None:
        """Where captions come from: ``("column", name)``, ``("files", None)`` or ``None``."""
        if self.caption_column is False:
            return None
        if self.caption_column:
            return ("column", str(self.caption_column))
        if self.image_column not in columns:
            return None  # not an image data set: a "text" column is not a caption
        found = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if found is not None:
            return ("column", found)
        return ("files", None) if self._any_caption_file(data) else None

    def _any_caption_file(self, data: Any) -> bool:
        """Whether any image has a caption file (one directory listing per folder)."""
        import datasets

        if isinstance(data, datasets.IterableDataset):
            paths = (source_path(record.get(self.image_column)) for record in data.take(1))
        else:
            paths = _image_paths(data, self.image_column)
        listings: dict[str, set[str]] = {}
        for path in paths:
            if not path:
                continue
            folder, stem = os.path.split(os.path.splitext(path)[0])
            if folder not in listings:
                try:
                    listings[folder] = set(os.listdir(folder or "."))
                except OSError:
                    listings[folder] = set()
            if any(stem + ext in listings[folder] for ext in self.caption_extensions):
                return True
        return False

    def _check_required_keys(self, data: Any, split: str) -> None:
        """Every key a plugin declared (``required_keys``) must reach the batches."""
        needed: dict[str, str] = dict(self.engine.call("required_keys", split) or {})
        if not needed:
            return
        captions = {"caption"} if self.captions.get(split) else set()
        provided = set(column_names(data)) | captions | {"index", "skipped"}
        missing = [key for key in needed if key not in provided]
        if missing:  # a transform may add keys: look at one real batch before failing
            provided |= set(self._probe_keys(data, split))
            missing = [key for key in needed if key not in provided]
        if missing:
            named = ", ".join(f"{key!r} (needed by {needed[key]})" for key in missing)
            raise ValueError(
                f"dataset: the batches of {self.describe(split)} have no {named}; the data's columns are "
                f"{column_names(data)}" + (" (+ 'caption')" if captions else "")
            )

    def _probe_keys(self, data: Any, split: str, tries: int = 4) -> list[str]:
        """The keys of a batch of one sample (the first good one of the first few)."""
        import datasets

        pipeline = _Pipeline(self.engine.call, "skip", split, stream=isinstance(data, datasets.IterableDataset))
        try:
            if isinstance(data, datasets.IterableDataset):
                records = list(enumerate(data.take(tries)))
            else:
                records = [(i, data[i]) for i in range(min(tries, len(data)))]
            for index, raw in records:
                sample = pipeline.sample(raw, index, 0)
                if not isinstance(sample, Skipped):
                    batch = pipeline.batch([sample])
                    return list(batch) if isinstance(batch, dict) else []
        except Exception:  # noqa: BLE001 - a probe: the real error, if any, comes with the data
            return []
        return []

    # -------------------------------------------------------------- slot defaults
    def _load_dataset(self, next_impl: Any, spec: dict[str, Any]) -> Any:
        import datasets

        spec = dict(spec)
        generator, gen_kwargs = spec.pop("generator", None), spec.pop("gen_kwargs", None) or {}
        if generator is not None:
            from ..core.plugins import resolve

            fn = resolve(generator) if isinstance(generator, str) else generator
            cls = datasets.IterableDataset if spec.get("streaming") else datasets.Dataset
            return cls.from_generator(fn, gen_kwargs=gen_kwargs)
        path = spec.pop("path")
        spec = {k: v for k, v in spec.items() if v is not None}
        where = spec.get("data_files") or spec.get("data_dir") or path
        try:
            return datasets.load_dataset(path, **spec)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"dataset.path={path!r}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - sorted below; anything else propagates unchanged
            bad = _unicode_error(exc)
            if bad is not None and path == "csv" and "encoding_errors" not in spec:
                # A few rows with bytes that are not UTF-8 must not stop the run: read them
                # replaced (U+FFFD), and the samples whose caption has one are skipped, named.
                logger.warning("dataset: %s is not all valid UTF-8 (%s); the rows concerned will be skipped",
                               where, bad)
                self.replaced_utf8 = True
                return datasets.load_dataset(path, **spec, encoding_errors="replace")
            if bad is not None:
                raise ValueError(f"dataset: {where} holds a file that is not valid UTF-8 ({bad}); convert it "
                                 "to UTF-8 (in a csv file, such rows are skipped instead)") from exc
            if not isinstance(exc, ValueError) or "no data" not in str(exc):
                raise
            raise ValueError(f"dataset: the data set {path!r} ({where}) is empty: {exc}") from exc

    def _decode_sample(self, next_impl: Any, sample: dict[str, Any]) -> dict[str, Any]:
        name = f"sample {sample.get('__index__')}"
        path = None
        # A plugin that knows the size the image is needed at (bucketing) puts it here.
        needed_size = sample.pop("__decode_size__", None)
        if self.image_column in sample:
            source = sample[self.image_column]
            name = describe_source(source, name)
            path = source_path(source)
            image, size = decode_image(source, name=name, strict_modes=self.strict_modes,
                                       max_pixels=self.max_pixels, min_size=needed_size)
            sample[self.image_column] = image
            sample["__name__"] = name
            sample["__original_size__"] = size  # of the file; the image may be decoded reduced
        captions = self.captions.get(str(sample.get("__split__", "train")))
        if captions is not None:
            kind, column = captions
            caption = caption_text(sample.get(column), name, self.replaced_utf8) if kind == "column" else ""
            if not caption and path is not None:
                caption = read_caption_file(path, self.caption_extensions) or ""
            sample["caption"] = caption
            if self.require_caption and not caption.strip():
                where = f"column {column!r} is empty" if kind == "column" else "no caption file"
                raise BadSampleError(name, "missing caption", where)
        return sample

    def _transform_sample(self, next_impl: Any, sample: dict[str, Any]) -> dict[str, Any]:
        if self.image_tensor and hasattr(sample.get(self.image_column), "convert"):
            sample[self.image_column] = to_tensor(sample[self.image_column])
        return sample

    def _collate(self, next_impl: Any, samples: list[dict[str, Any]]) -> Any:
        return default_collate(samples)

    def _transform_batch(self, next_impl: Any, batch: Any) -> Any:
        return batch

    def _reshuffle(self, next_impl: Any, *args: Any, **kwargs: Any) -> Any:
        from .sampler import plan_epoch

        return plan_epoch(*args, **kwargs)

    def _stream_bucket(self, next_impl: Any, sample: dict[str, Any], split: str = "train") -> Any:
        return 0

    def _record_skipped(self, next_impl: Any, entries: list[tuple[int, str, str]]) -> None:
        self.record_skipped(entries)

    def _required_keys(self, next_impl: Any, split: str) -> dict[str, str]:
        return {}

    def _data_options(self, next_impl: Any, split: str = "train") -> dict[str, Any]:
        return {
            "batch_size": self.batch_size if split == "train" else self.val_batch_size,
            "remainder": self.remainder if split == "train" else "pad",
            "shuffle": self.shuffle if split == "train" else False,
            "seed": self.effective_seed,
            "bad_samples": self.bad_samples,
            "image_column": self.image_column,
            "max_pixels": self.max_pixels,
        }

    def _world(self) -> tuple[int, int]:
        runtime = self.engine.runtime
        return int(runtime.num_processes), int(runtime.process_index)

    def _batch_sampler(self, next_impl: Any, dataset: Any, split: str) -> Any:
        num_replicas, rank = self._world()
        if split != "train":
            from .shuffle import EpochBatchSampler

            return EpochBatchSampler(
                len(dataset), self.val_batch_size, seed=self.effective_seed, shuffle=False,
                num_replicas=num_replicas, rank=rank,
            )
        from .sampler import BucketBatchSampler

        return BucketBatchSampler(
            np.zeros(len(dataset), dtype=np.int64),
            self.batch_size,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.effective_seed,
            shuffle=self.shuffle,
            remainder=self.remainder,
            planner=self.planner,
            with_epoch=True,
        )

    def planner(self, *args: Any, **kwargs: Any) -> Any:
        """The ``reshuffle`` slot, in the form a :class:`BucketBatchSampler` calls."""
        return self.engine.call("reshuffle", *args, **kwargs)

    def _make_dataloader(self, next_impl: Any, dataset: Any, split: str) -> Any:
        import datasets
        import torch
        from torch.utils.data import DataLoader

        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin}
        streaming = isinstance(dataset, datasets.IterableDataset)
        if self.num_workers:
            # Safe: every sampler item carries its epoch, so old workers see the new one.
            options["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                options["prefetch_factor"] = self.prefetch_factor
        pipeline = _Pipeline(self.engine.call, self.bad_samples, split, stream=streaming)
        if streaming:
            num_replicas, rank = self._world()
            sampler = StreamBatches(
                dataset,
                self.batch_size if split == "train" else self.val_batch_size,
                key_fn=lambda sample: self.engine.call("stream_bucket", sample, split),
                num_replicas=num_replicas,
                rank=rank,
                remainder=self.remainder if split == "train" else "pad",
                seed=self.effective_seed,
                shuffle_buffer=self.shuffle_buffer if split == "train" and self.shuffle else 0,
                bad_samples=self.bad_samples,
            )
            return DataLoader(StreamItems(pipeline), batch_sampler=sampler, collate_fn=pipeline.batch, **options)
        sampler = self.engine.call("batch_sampler", dataset, split)
        return DataLoader(MapDataset(dataset, pipeline), batch_sampler=sampler, collate_fn=pipeline.batch, **options)

    # ----------------------------------------------------------- skipped samples
    def _on_batch(self, state: Any, batch: Any = None) -> None:
        if not isinstance(batch, dict):
            return
        skipped = batch.get("skipped") or []
        if skipped:
            self.record_skipped(skipped)
        if len(batch) == 1 and "skipped" in batch:  # every sample of the batch was bad
            state.control.skip_step()

    def record_skipped(self, entries: list[tuple[int, str, str]]) -> None:
        """Count, name and log skipped samples (each once per run)."""
        state = self.engine.state
        fresh = []
        for index, name, reason in entries:
            if (int(index), str(name)) in self._seen_skips:
                continue
            self._seen_skips.add((int(index), str(name)))
            fresh.append({"index": int(index), "name": str(name), "reason": str(reason)})
        if not fresh:
            return
        self.skipped.extend(fresh)
        state.metrics["data/skipped"] = float(len(self.skipped))
        for entry in fresh:
            logger.warning("dataset: skipped %s (%s)", entry["name"], entry["reason"])
            key = "data/skipped/" + entry["reason"].replace(" ", "_")
            state.metrics[key] = float(state.metrics.get(key, 0.0)) + 1.0
        if state.run_dir and state.is_main_process:
            os.makedirs(state.run_dir, exist_ok=True)  # a fresh run: nothing has made the folder yet
            with open(os.path.join(state.run_dir, "skipped_samples.jsonl"), "a", encoding="utf-8") as handle:
                for entry in fresh:
                    handle.write(json.dumps(entry) + "\n")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skipped": list(self.skipped)}
        loader = self.loaders.get("train")
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "state_dict"):
            state["sampler"] = sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = list(state.get("skipped", []))
        self._seen_skips = {(e["index"], e["name"]) for e in self.skipped}
        self._pending_sampler_state = state.get("sampler")
        self._apply_sampler_state()

    def _apply_sampler_state(self) -> None:
        # A checkpoint may be loaded before the loaders exist: applied once they do.
        sampler = getattr(self.loaders.get("train"), "batch_sampler", None)
        pending = getattr(self, "_pending_sampler_state", None)
        if pending is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(pending)
            self._pending_sampler_state = None


def column_names(data: Any) -> list[str]:
    """The columns of a data set; for a stream without known features, its first record's."""
    names = getattr(data, "column_names", None)
    if names is None:
        first = next(iter(data.take(1)), None) if hasattr(data, "take") else None
        names = list(first) if isinstance(first, dict) else []
    return list(names)


def _image_paths(data: Any, column: str) -> Iterator[str | None]:
    """The file paths of an image column, read from arrow: embedded bytes are never loaded."""
    import pyarrow as pa

    table = getattr(data, "data", None)
    if table is None or not hasattr(table, "column"):
        yield from (source_path(source) for source in data[column])
        return
    for chunk in table.column(column).chunks:
        if pa.types.is_struct(chunk.type):
            if chunk.type.get_field_index("path") < 0:
                continue
            chunk = chunk.field("path")
        if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            yield from chunk.to_pylist()


def source_path(source: Any) -> str | None:
    """The file path of an image source (a path, or ``datasets``' ``{"path", "bytes"}``)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return getattr(source, "filename", None) or None


def caption_text(value: Any, name: str, replaced: bool = False) -> str:
    """A caption value as text; bytes or text that are not valid UTF-8 are a bad sample
    (with ``replaced``: the file was read with bad bytes replaced by U+FFFD, so text
    holding one was not valid UTF-8 either)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise BadSampleError(name, "invalid UTF-8 caption", f"byte {exc.start}: {exc.reason}") from None
    text = value if isinstance(value, str) else str(value)
    if replaced and "\ufffd" in text:
        raise BadSampleError(name, "invalid UTF-8 caption", f"bytes that are not UTF-8 in {text[:60]!r}")
    try:
        text.encode("utf-8")  # lone surrogates: bytes that were not UTF-8, escaped
    except UnicodeEncodeError as exc:
        raise BadSampleError(name, "invalid UTF-8 caption", f"character {exc.start}: {exc.reason}") from None
    return text.strip()


def read_caption_file(image_path: str, extensions: tuple[str, ...]) -> str | None:
    """The caption in the first ``<image stem><extension>`` file that exists, else ``None``.

    A file that is not valid UTF-8 is a bad sample named by the file (a UTF-8 BOM is fine).
    """
    stem = os.path.splitext(image_path)[0]
    for extension in extensions:
        caption_path = stem + extension
        try:
            with open(caption_path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BadSampleError(caption_path, "unreadable caption file", str(exc)) from None
        try:
            return data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            raise BadSampleError(caption_path, "invalid UTF-8 caption", f"byte {exc.start}: {exc.reason}") from None
    return None


def _unicode_error(exc: BaseException | None) -> str | None:
    """The UnicodeDecodeError behind ``exc`` (datasets wraps it), described, or ``None``."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, UnicodeDecodeError):
            return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}: {exc.reason}"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _is_dict_of_splits(obj: Any) -> bool:
    import datasets

    return isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict, dict))
