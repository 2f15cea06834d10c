"""The dataset and bucketing plugins through an Engine: loaders, hooks, bad samples, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hookengine import Engine
from hookengine.data.buckets import kohya_bucket_resolutions, kohya_select_bucket_reference
from hookengine.data.images import BadSampleError, open_image, resize_crop, to_tensor

from .conftest import broken_files, write_images

SETTINGS = dict(max_resolution=128, min_size=64, max_size=256, step=32)
# bucketing follows the dataset's remainder (default pad; tests that used bucketing's own
# remainder="pad" now rely on that default)


def _engine(run_dir=None, **dataset):
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("dataset", **dataset)
    return engine


def _epoch(loader, epoch=0, start=0):
    sampler = getattr(loader, "batch_sampler", None)
    for holder in (sampler, loader):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)
    for holder in (sampler, loader):
        if hasattr(holder, "set_start"):
            holder.set_start(start)
            break
    return list(loader)


def _train(engine, max_steps, seen, on_resume=None, stop_at=None):
    """Run the real loop on a one-parameter model; record the sample indices of each batch."""
    weight = torch.nn.Parameter(torch.zeros(1))
    module = torch.nn.Module()
    module.weight = weight
    engine.state.models["m"] = module
    engine.use("trainer", max_steps=max_steps, lr=0.01)

    @engine.attach("compute_loss")
    def loss(next_impl, batch):
        seen.append(batch["index"].tolist())
        return (module.weight * batch["image"].mean() - 1).pow(2).sum()

    if on_resume is not None:
        engine.on("resume", on_resume)
    if stop_at is not None:  # an interruption, as a killed run would leave it
        engine.on("step_end", lambda state: state.control.stop("test"), when=lambda s: s.clock.step == stop_at)
    engine.call("run")
    return engine


def test_imagefolder_bucketed_round_trip(tmp_path, sizes):
    rows = write_images(tmp_path / "imgs", sizes)
    engine = _engine(path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=3,
                     caption_column="text", require_caption=True)
    engine.use("bucketing", **SETTINGS)
    engine.fire("setup")
    data = engine.plugins["dataset"].datasets["train"]
    by_name = {r["file_name"]: r for r in rows}
    files = [Path(x["path"]).name for x in data["image"]]
    buckets = kohya_bucket_resolutions(128, 64, 256, 32)
    loader = engine.state.dataloaders["train"]
    batches = _epoch(loader)
    seen = []
    for batch in batches:
        assert batch["skipped"] == []
        target = {tuple(t) for t in batch["target_size_hw"].tolist()}
        assert len(target) == 1  # one bucket per batch
        th, tw = target.pop()
        assert tuple(batch["image"].shape) == (3, 3, th, tw)
        for k, index in enumerate(batch["index"].tolist()):
            row = by_name[files[index]]
            bucket, resized = kohya_select_bucket_reference(row["width"], row["height"], buckets)
            assert (tw, th) == bucket
            assert tuple(batch["original_size_hw"][k].tolist()) == (row["height"], row["width"])
            top, left = batch["crop_top_left"][k].tolist()
            assert (left, top) == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
            assert batch["text"][k] == row["text"]
            seen.append(index)
    assert set(seen) == set(range(len(rows)))  # pad: every sample, at least once
    # the pixels are the original resized and centre-cropped
    batch = batches[0]
    index = batch["index"][0].item()
    row = by_name[files[index]]
    bucket, resized = kohya_select_bucket_reference(row["width"], row["height"], buckets)
    offset = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    expected = to_tensor(resize_crop(open_image(str(tmp_path / "imgs" / files[index])), resized, bucket, offset))
    assert torch.allclose(batch["image"][0], expected)


def test_sizes_from_columns_without_opening_images(tmp_path):
    # size columns and images that do not exist: sizes come from the columns, so
    # building the sampler opens nothing
    import datasets

    engine = Engine(seed=0)
    plugin = engine.use("dataset", generator="tests.data.test_datasets:_sized_rows", gen_kwargs={"n": 200},
                        batch_size=4)
    bucketing = engine.use("bucketing", **SETTINGS)
    engine.fire("setup")
    assert isinstance(plugin.datasets["train"], datasets.Dataset)
    assert len(bucketing.widths) == 200
    assert len(engine.state.dataloaders["train"]) > 0


def _sized_rows(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"image": f"/nonexistent/{i}.png", "width": int(rng.integers(100, 900)),
               "height": int(rng.integers(100, 900))}


def test_streaming_imagefolder_bucketed(tmp_path, sizes):
    rows = write_images(tmp_path / "imgs", sizes)
    engine = _engine(path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2, streaming=True,
                     caption_column="text")
    engine.use("bucketing", **SETTINGS)
    engine.fire("setup")
    loader = engine.state.dataloaders["train"]
    batches = _epoch(loader)
    names = set()
    for batch in batches:
        shapes = {tuple(t) for t in batch["target_size_hw"].tolist()}
        assert len(shapes) == 1
        assert batch["image"].shape[0] == 2
        names.update(batch["text"])
    assert names == {r["text"] for r in rows}
    # resume: skipping 3 global batches gives the tail of the same epoch
    again = _epoch(loader, start=3)
    assert [b["text"] for b in again] == [b["text"] for b in batches[3:]]


def test_local_files_csv_json_parquet_text(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"x": list(range(10)), "y": [float(i) * 2 for i in range(10)]})
    table.to_csv(str(tmp_path / "d.csv"))
    table.to_json(str(tmp_path / "d.jsonl"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.txt").write_text("\n".join(f"line {i}" for i in range(10)))
    for builder, name in (("csv", "d.csv"), ("json", "d.jsonl"), ("parquet", "d.parquet")):
        engine = _engine(path=builder, data_files=str(tmp_path / name), batch_size=5, remainder="drop")
        engine.fire("setup")
        batches = _epoch(engine.state.dataloaders["train"])
        xs = sorted(x for b in batches for x in b["x"].tolist())
        assert xs == list(range(10)), builder
        assert all(torch.equal(b["y"], b["x"].double() * 2) for b in batches)
    engine = _engine(path="text", data_files=str(tmp_path / "d.txt"), batch_size=5, remainder="drop")
    engine.fire("setup")
    lines = sorted(t for b in _epoch(engine.state.dataloaders["train"]) for t in b["text"])
    assert lines == sorted(f"line {i}" for i in range(10))


def _numbers(n):
    for i in range(n):
        yield {"x": i}


def test_generator_and_streaming_generator():
    for streaming in (False, True):
        engine = Engine(seed=0)
        engine.use("dataset", generator="tests.data.test_datasets:_numbers", gen_kwargs={"n": 12},
                   batch_size=4, streaming=streaming, remainder="drop")
        engine.fire("setup")
        batches = _epoch(engine.state.dataloaders["train"])
        assert sorted(x for b in batches for x in b["x"].tolist()) == list(range(12))


def test_hooks_on_every_level():
    engine = Engine(seed=0)
    engine.use("dataset", generator="tests.data.test_datasets:_numbers", gen_kwargs={"n": 8}, batch_size=4,
               remainder="drop", shuffle=False)
    calls = {"plan": 0}

    @engine.attach("transform_sample")
    def square(next_impl, sample):
        sample = next_impl(sample)
        sample["x2"] = sample["x"] ** 2
        return sample

    @engine.attach("collate")
    def tag(next_impl, samples):
        batch = next_impl(samples)
        batch["n"] = len(samples)
        return batch

    @engine.attach("transform_batch")
    def double(next_impl, batch):
        batch = next_impl(batch)
        batch["x"] = batch["x"] * 2
        return batch

    @engine.attach("reshuffle")
    def reverse(next_impl, *args, **kwargs):
        calls["plan"] += 1
        plan = next_impl(*args, **kwargs)
        plan.batches = plan.batches[::-1].copy()
        return plan

    engine.fire("setup")
    batches = _epoch(engine.state.dataloaders["train"])
    assert [b["x"].tolist() for b in batches] == [[8, 10, 12, 14], [0, 2, 4, 6]]
    assert [b["x2"].tolist() for b in batches] == [[16, 25, 36, 49], [0, 1, 4, 9]]
    assert all(b["n"] == 4 for b in batches)
    assert calls["plan"] == 1


def test_broken_images_are_skipped_counted_and_named(tmp_path, run_dir):
    folder = tmp_path / "imgs"
    write_images(folder, [(200, 150), (150, 200), (300, 300), (256, 256)] * 3, captions=False)
    expected = broken_files(folder)
    engine = _engine(run_dir=run_dir, path="imagefolder", data_dir=str(folder), batch_size=2)
    engine.use("bucketing", **SETTINGS)
    seen = []
    _train(engine, max_steps=10, seen=seen)  # more than one epoch (about 8 batches)
    plugin = engine.plugins["dataset"]
    names = {Path(e["name"]).name for e in plugin.skipped}
    assert names == set(expected)
    assert engine.state.metrics["data/skipped"] == len(expected)
    assert engine.state.clock.step == 10  # training went on
    logged = [json.loads(line) for line in (run_dir / "skipped_samples.jsonl").read_text().splitlines()]
    assert {Path(e["name"]).name for e in logged} == set(expected)


def test_broken_image_raise_policy_names_the_file(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [(200, 150)] * 4, captions=False)
    broken_files(folder)
    (folder / "garbage.png").unlink()
    (folder / "zero.png").unlink()
    (folder / "empty.png").unlink()
    engine = _engine(path="imagefolder", data_dir=str(folder), batch_size=5, bad_samples="raise", remainder="pad")
    engine.fire("setup")
    with pytest.raises(BadSampleError, match="truncated.png"):
        _epoch(engine.state.dataloaders["train"])
    engine = _engine(path="imagefolder", data_dir=str(folder), batch_size=2, bad_samples="raise")
    (folder / "garbage.png").write_bytes(b"nope")
    engine.use("bucketing", **SETTINGS)
    with pytest.raises(ValueError, match="garbage.png"):
        engine.fire("setup")


def test_missing_caption_is_a_bad_sample(tmp_path):
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(64, 64)] * 4, captions=False)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({"file_name": row["file_name"], "text": "" if i == 2 else "ok"}) + "\n")
    (folder / rows[1]["file_name"].replace(".png", ".txt")).write_text("")
    engine = _engine(path="imagefolder", data_dir=str(folder), batch_size=4, caption_column="text",
                     require_caption=True, remainder="drop")
    engine.fire("setup")
    batch = _epoch(engine.state.dataloaders["train"])[0]
    assert len(batch["skipped"]) == 1 and "missing caption" in batch["skipped"][0][2]
    assert batch["image"].shape[0] == 3


def test_sidecar_caption_files(tmp_path):
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(64, 64)] * 2, captions=False)
    for row in rows:
        (folder / row["file_name"].replace(".png", ".txt")).write_text(f"side {row['file_name']}")
    # Found without being asked for (caption_column: auto); naming a column that does not
    # exist is now a setup error (tests/data/test_captions.py), so this test names none.
    engine = _engine(path="imagefolder", data_dir=str(folder), batch_size=2)
    engine.fire("setup")
    batch = _epoch(engine.state.dataloaders["train"])[0]
    assert sorted(batch["caption"]) == sorted(f"side {r['file_name']}" for r in rows)


def test_empty_data_set_is_a_clear_error(tmp_path):
    (tmp_path / "empty.csv").write_text("x,y\n")
    engine = _engine(path="csv", data_files=str(tmp_path / "empty.csv"))
    with pytest.raises(ValueError, match="empty"):
        engine.fire("setup")


def test_resume_mid_epoch_through_the_loop(tmp_path, sizes):
    from hookengine.training.checkpoint import load_tree, save_tree

    write_images(tmp_path / "imgs", sizes)
    # remainder is the dataset's option (one policy for the dataset and bucketing)
    options = dict(path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2, remainder="carry")
    bucketing = dict(random_crop=True, **SETTINGS)

    full: list = []
    engine = _engine(**options)
    engine.use("bucketing", **bucketing)
    _train(engine, max_steps=30, seen=full)

    first: list = []
    engine = _engine(**options)
    engine.use("bucketing", **bucketing)
    _train(engine, max_steps=30, seen=first, stop_at=17)
    save_tree(engine.state_dict(), tmp_path / "ckpt")

    rest: list = []
    engine = _engine(**options)
    engine.use("bucketing", **bucketing)
    _train(engine, max_steps=30, seen=rest, on_resume=lambda: engine.load_state_dict(load_tree(tmp_path / "ckpt")))
    assert first == full[:17]
    assert rest == full[17:]


def test_workers_give_the_same_batches(tmp_path, sizes):
    write_images(tmp_path / "imgs", sizes[:16])
    results = []
    for workers in (0, 2):
        engine = _engine(path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2, num_workers=workers,
                         persistent_workers=workers > 0)
        engine.use("bucketing", random_crop=True, flip_p=0.5, **SETTINGS)
        engine.fire("setup")
        loader = engine.state.dataloaders["train"]
        epochs = [_epoch(loader, e) for e in range(2)]
        results.append([[(b["index"].tolist(), b["crop_top_left"].tolist(), b["flipped"].tolist(),
                          float(b["image"].sum())) for b in batches] for batches in epochs])
    assert results[0] == results[1]
    assert results[0][0] != results[0][1]  # crops and order change with the epoch


def test_streaming_workers_give_the_same_batches(tmp_path, sizes):
    write_images(tmp_path / "imgs", sizes[:12])
    results = []
    for workers in (0, 2):
        engine = _engine(path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2, num_workers=workers,
                         streaming=True, caption_column="text", shuffle_buffer=8)
        engine.use("bucketing", **SETTINGS)
        engine.fire("setup")
        loader = engine.state.dataloaders["train"]
        results.append([[b["text"] for b in _epoch(loader, e, start=1)] for e in range(2)])
    assert results[0] == results[1]
    assert results[0][0] != results[0][1]  # the stream is reshuffled per epoch


def test_area_mode_rebuckets_per_epoch_and_order_of_use_does_not_matter(tmp_path, sizes):
    write_images(tmp_path / "imgs", sizes)
    engine = Engine(seed=0)
    # bucketing used before dataset: its wrappers still wrap the dataset's base slots
    engine.use("bucketing", mode="area", resolutions=[64, 128], weights=[1, 1], resolution_policy="random",
               align=16, max_aspect=3.0)
    engine.use("dataset", path="imagefolder", data_dir=str(tmp_path / "imgs"), batch_size=2)
    calls = []

    @engine.attach("rebucket")
    def spy(next_impl, epoch):
        calls.append(epoch)
        return next_impl(epoch)

    engine.fire("setup")
    loader = engine.state.dataloaders["train"]
    targets = []
    for epoch in range(2):
        by_index = {}
        for batch in _epoch(loader, epoch):
            for index, target in zip(batch["index"].tolist(), batch["target_size_hw"].tolist()):
                by_index[index] = tuple(target)
                area, bound = target[0] * target[1], max(target) * 16 / 2
                assert abs(area - 64 * 64) <= bound or abs(area - 128 * 128) <= bound
                assert target[0] % 16 == 0 and target[1] % 16 == 0
            assert tuple(batch["image"].shape[2:]) == tuple(batch["target_size_hw"][0].tolist())
        targets.append(by_index)
    assert 0 in calls and 1 in calls
    assert targets[0] != targets[1]  # resolutions drawn again for the new epoch
