"""A corpus of broken inputs: each gives a clear error naming the file, or a counted skip."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from hookengine import Engine


@pytest.fixture(scope="module")
def broken_images(tmp_path_factory) -> Path:
    """An imagefolder with good PNGs beside truncated, empty, CMYK, 16-bit and garbage files."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16 + 8 * i, 24, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    full = (folder / "good_0.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.new("CMYK", (16, 16), (0, 128, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "deep.png")
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))  # over PIL's decompression-bomb limit
    (folder / "huge.png").write_bytes(_png_header(10000, 10000))  # over dataset.max_pixels
    (folder / "good_1.txt").write_bytes(b"caf\xe9 in latin-1")  # a caption file that is not UTF-8
    (folder / "good_2.txt").write_text("a fine caption")
    return folder


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that claims ``width x height`` pixels in a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_broken_images_are_skipped_counted_and_named(broken_images: Path, tmp_path: Path) -> None:
    engine = Engine(seed=0, run_dir=tmp_path)
    data = engine.use("dataset", path="imagefolder", data_dir=str(broken_images), batch_size=2, bad_samples="skip")
    engine.runtime.accelerator  # noqa: B018 - start the runtime as a run would
    engine.fire("setup")
    images = []
    for batch in engine.state.dataloaders["train"]:
        engine.fire("batch_start", batch=batch)  # as the loop does: skipped samples get counted
        images.extend(batch.get("image", []))  # a batch of only bad samples has no images
    names = {Path(s["name"]).name: s["reason"] for s in data.skipped}
    assert {"truncated.png", "empty.png", "garbage.png"} <= set(names)
    assert (names["bomb.png"], names["huge.png"], names["good_1.txt"]) == (
        "decompression bomb", "too many pixels", "invalid UTF-8 caption")
    assert "good_0.png" not in names and "good_2.png" not in names
    assert (tmp_path / "skipped_samples.jsonl").read_text().count("\n") == len(data.skipped)
    assert engine.state.metrics["data/skipped"] == len(data.skipped)
    assert all(img.shape[0] == 3 and torch.isfinite(img).all() for img in images)  # CMYK and 16-bit converted


def test_a_broken_image_under_raise_names_the_file(broken_images: Path, tmp_path: Path) -> None:
    engine = Engine(seed=0, run_dir=tmp_path)
    engine.use("dataset", path="imagefolder", data_dir=str(broken_images), batch_size=16, bad_samples="raise",
               shuffle=False)
    engine.runtime.accelerator  # noqa: B018
    engine.fire("setup")
    with pytest.raises(Exception, match=r"(truncated|empty|garbage|bomb|huge)\.png"):
        for _ in engine.state.dataloaders["train"]:
            pass


def test_a_pickle_file_named_safetensors_is_refused(tmp_path: Path) -> None:
    from hookengine.models.loader import load_model
    from hookengine.testing.tiny_models import save_tiny_net

    folder = save_tiny_net(tmp_path / "net")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(pickle.dumps({"weight": torch.zeros(2)}))
    with pytest.raises(Exception, match=weights.name) as info:
        load_model(str(folder), cls="hookengine.testing.tiny_models:TinyNet")
    assert "safetensors" in str(info.value)


def test_a_tokenizer_folder_missing_files_is_a_clear_error(tmp_path: Path) -> None:
    from hookengine.models.loader import load_model
    from hookengine.testing.tiny_models import build_tiny_gpt2_tokenizer

    folder = tmp_path / "tokenizer"
    build_tiny_gpt2_tokenizer().save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(Exception, match=str(folder.name)):
        load_model(str(folder))


def test_an_empty_weights_file_and_an_empty_recipe(tmp_path: Path) -> None:
    from hookengine.training.checkpoint import CheckpointError, load_tree

    broken = tmp_path / "step-00000001"
    broken.mkdir()
    (broken / "tensors.safetensors").write_bytes(b"")
    (broken / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="step-00000001 cannot be read"):
        load_tree(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    from hookengine.cli import main

    assert main(["run", str(empty)]) == 2  # "no model to train: use a routine ...", no traceback
