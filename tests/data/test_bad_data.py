"""Bad data never stops a run: bombs, huge images, bad captions are skipped and named; a
missing column is found at setup, named with the columns that exist."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from hookengine import Engine
from hookengine.data.images import BadSampleError, decode_image, image_size

from .conftest import write_images


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG claiming ``width x height`` pixels (a few bytes; PIL reads the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def _run(engine: Engine) -> list[dict]:
    engine.fire("setup")
    batches = []
    for batch in engine.state.dataloaders["train"]:
        engine.fire("batch_start", batch=batch)  # as the loop does: skipped samples are recorded
        batches.append(batch)
    return batches


def test_a_decompression_bomb_is_a_bad_sample_not_a_crash(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))
    for read in (image_size, decode_image):
        with pytest.raises(BadSampleError, match="bomb.png: decompression bomb"):
            read(str(bomb))


def test_bombs_and_huge_images_are_skipped_and_named_in_a_fresh_run_folder(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, [(32, 24)] * 5, captions=False)
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))   # over PIL's own limit
    (folder / "huge.png").write_bytes(_png_header(10000, 10000))   # only PIL's warning: over max_pixels
    run_dir = tmp_path / "fresh" / "run"  # does not exist yet: nothing else makes it before the first step
    engine = Engine(seed=0, run_dir=run_dir)
    data = engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=7, remainder="pad")
    batches = _run(engine)
    reasons = {Path(s["name"]).name: s["reason"] for s in data.skipped}
    assert reasons == {"bomb.png": "decompression bomb", "huge.png": "too many pixels"}
    assert sum(len(b["image"]) for b in batches) == 5
    lines = [json.loads(x) for x in (run_dir / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(Path(x["name"]).name for x in lines) == ["bomb.png", "huge.png"]


def test_max_pixels_skips_big_pngs_and_decodes_big_jpegs_reduced(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)).save(folder / "big.png")
    _jpeg(folder / "big.jpg", 400, 300)
    _jpeg(folder / "small.jpg", 80, 60)
    engine = Engine(seed=0)
    data = engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=3, shuffle=False,
                      max_pixels=40_000, image_tensor=False, remainder="pad")
    batches = _run(engine)
    assert [(Path(s["name"]).name, s["reason"]) for s in data.skipped] == [("big.png", "too many pixels")]
    sizes = sorted(image.size for image in batches[0]["image"])
    # 400x300 = 120,000 pixels: decoded at 1/2 (200x150 = 30,000), never whole
    assert (200, 150) in sizes and (80, 60) in sizes and (400, 300) not in sizes
    # the reduced decode is the image, not a crop: it matches a full decode shrunk by 2
    full = Image.open(folder / "big.jpg").convert("RGB").resize((200, 150), Image.Resampling.BOX)
    reduced = next(image for image in batches[0]["image"] if image.size == (200, 150))
    assert np.abs(np.asarray(full, dtype=float) - np.asarray(reduced, dtype=float)).mean() < 4


def test_bucketing_decodes_a_large_jpeg_at_the_size_it_needs(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    _jpeg(folder / "photo.jpg", 1024, 768)
    calls = []
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=1, image_tensor=False)
    engine.use("bucketing", max_resolution=128)

    @engine.attach("transform_sample", priority="first")
    def look(next_impl, sample):
        calls.append((sample["image"].size, sample["__original_size__"]))
        return next_impl(sample)

    batch = _run(engine)[0]
    decoded, original = calls[0]
    assert original == (1024, 768)
    assert decoded == (256, 192)  # 1/4: the smallest JPEG scale still covering the 128-px bucket's resize
    assert batch["original_size_hw"].tolist() == [[768, 1024]]  # conditioning keeps the file's size
    assert tuple(batch["image"][0].size) == tuple(batch["target_size_hw"][0].tolist()[::-1])


def test_a_caption_file_that_is_not_utf8_is_skipped_and_named(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 3, captions=False)
    for i, row in enumerate(rows):
        text = f"caption {i}".encode() if i != 1 else b"caf\xe9 latin-1 \xff"
        (folder / row["file_name"].replace(".png", ".txt")).write_bytes(text)
    engine = Engine(seed=0)
    data = engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=3, shuffle=False)
    batches = _run(engine)
    assert [(Path(s["name"]).name, s["reason"]) for s in data.skipped] == [("img0001.txt", "invalid UTF-8 caption")]
    assert batches[0]["caption"] == ["caption 0", "caption 2"]


def test_a_caption_column_with_invalid_utf8_bytes_is_skipped(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "d"
    write_images(folder, [(16, 16)] * 2, captions=False)
    table = datasets.Dataset.from_dict({"image": [str(folder / "img0000.png"), str(folder / "img0001.png")],
                                        "caption": [b"fine", b"\xff\xfe broken"]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    engine = Engine(seed=0)
    data = engine.use("dataset", path="parquet", data_files=str(tmp_path / "d.parquet"), batch_size=2)
    batches = _run(engine)
    assert [s["reason"] for s in data.skipped] == ["invalid UTF-8 caption"]
    assert batches[0]["caption"] == ["fine"]


@pytest.mark.parametrize("option, value", [("image_column", "picture"), ("caption_column", "prompt"),
                                           ("required_columns", ["label"])])
def test_a_configured_column_that_does_not_exist_fails_at_setup(tmp_path: Path, option, value) -> None:
    (tmp_path / "d.csv").write_text("image,text\na.png,one\nb.png,two\n")
    engine = Engine(seed=0)
    engine.use("dataset", path="csv", data_files=str(tmp_path / "d.csv"), **{option: value})
    missing = value[0] if isinstance(value, list) else value
    with pytest.raises(ValueError, match=rf"dataset\.{option}: .*d\.csv.* no column '{missing}'; "
                                         r"its columns are \['image', 'text'\]"):
        engine.fire("setup")


def test_a_key_a_routine_needs_is_checked_at_setup_not_at_the_first_step(tmp_path: Path) -> None:
    """The supervised case: an imagefolder without class folders has no 'label' column."""
    folder = tmp_path / "imgs"
    write_images(folder, [(16, 16)] * 4, captions=False)
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=2)

    # what a routine does to declare the keys it reads (the point is the dataset's)
    engine.attach("required_keys", lambda next_impl, split: {**next_impl(split), "image": "my_routine.inputs",
                                                              "label": "my_routine.targets"})
    with pytest.raises(ValueError, match=r"no 'label' \(needed by my_routine\.targets\).*columns are \['image'\]"):
        engine.fire("setup")


def test_a_required_key_made_by_a_transform_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, [(16, 16)] * 4, captions=False)
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=2)
    engine.attach("required_keys", lambda next_impl, split: {**next_impl(split), "pixel_values": "my_routine"})

    @engine.attach("transform_sample")
    def rename(next_impl, sample):
        sample = next_impl(sample)
        sample["pixel_values"] = sample.pop("image")
        return sample

    engine.fire("setup")
    assert "pixel_values" in next(iter(engine.state.dataloaders["train"]))


def test_the_supervised_routine_missing_its_label_fails_at_setup(tmp_path: Path) -> None:
    """Today's trap: KeyError 'label' at the first step; now one line at setup."""
    folder = tmp_path / "imgs"
    write_images(folder, [(8, 8)] * 4, captions=False)  # no class folders: no 'label' column
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=2)
    engine.use("supervised", model="torch.nn:Flatten", inputs="image", targets="label")
    with pytest.raises(ValueError, match=r"no 'label' \(needed by plugins\.supervised\.targets\).*columns are \['image'\]"):
        engine.fire("setup")


def test_a_csv_with_a_caption_that_is_not_utf8_skips_that_row(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(8, 8)] * 3, captions=False)
    lines = [b"image,text"] + [f"{folder / r['file_name']},caption {i}".encode() for i, r in enumerate(rows)]
    lines[2] = f"{folder / rows[1]['file_name']},".encode() + b"caf\xe9 in latin-1"
    (tmp_path / "d.csv").write_bytes(b"\n".join(lines) + b"\n")
    engine = Engine(seed=0)
    data = engine.use("dataset", path="csv", data_files=str(tmp_path / "d.csv"), batch_size=3, shuffle=False)
    batches = _run(engine)
    assert [(Path(s["name"]).name, s["reason"]) for s in data.skipped] == [(rows[1]["file_name"], "invalid UTF-8 caption")]
    assert batches[0]["caption"] == ["caption 0", "caption 2"]


def test_a_json_row_that_is_not_utf8_is_skipped(tmp_path: Path) -> None:
    """pyarrow keeps the bytes; reading the row raised UnicodeDecodeError at that step before."""
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(8, 8)] * 3, captions=False)
    with open(tmp_path / "d.jsonl", "wb") as handle:
        for i, row in enumerate(rows):
            text = f"caption {i}".encode() if i != 2 else b"caf\xe9"
            handle.write(b'{"image": "' + str(folder / row["file_name"]).encode() + b'", "text": "' + text + b'"}\n')
    engine = Engine(seed=0)
    data = engine.use("dataset", path="json", data_files=str(tmp_path / "d.jsonl"), batch_size=3, shuffle=False)
    batches = _run(engine)
    assert [(s["name"], s["reason"]) for s in data.skipped] == [("sample 2", "invalid UTF-8 text")]
    assert batches[0]["caption"] == ["caption 0", "caption 1"]


def test_an_imagefolder_metadata_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(8, 8)] * 2, captions=False)
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "' + rows[0]["file_name"].encode() + b'", "text": "caf\xe9"}\n')
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder))
    with pytest.raises(ValueError, match=r"imgs holds a file that is not valid UTF-8 \(byte 0xe9"):
        engine.fire("setup")


def test_bucketing_leaves_images_over_max_pixels_out_of_the_plan(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    write_images(folder, [(64, 64)] * 4, captions=False)
    Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8)).save(folder / "big.png")
    _jpeg(folder / "big.jpg", 300, 200)  # a 1/2 scale brings it under the limit: kept
    engine = Engine(seed=0, run_dir=tmp_path / "run")
    data = engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=5, max_pixels=20_000)
    engine.use("bucketing", max_resolution=64)
    batches = _run(engine)
    assert [(Path(s["name"]).name, s["reason"]) for s in data.skipped] == [("big.png", "too many pixels")]
    assert all(b["skipped"] == [] for b in batches)  # never planned into a batch
    assert len({i for b in batches for i in b["index"].tolist()}) == 5  # 4 PNGs and the JPEG
    report = json.loads((tmp_path / "run" / "buckets.json").read_text())
    assert [Path(x["sample"]).name for x in report["left_out"]] == ["big.png"]
