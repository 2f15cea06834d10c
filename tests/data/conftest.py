"""Generated images for the data tests (nothing is downloaded)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest


def write_images(folder: Path, sizes: list[tuple[int, int]], captions: bool = True, seed: int = 0) -> list[dict]:
    """PNG files of the given (width, height), plus a metadata.jsonl with captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h) in enumerate(sizes):
        name = f"img{i:04d}.png"
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file_name": name, "text": f"a picture number {i}", "width": w, "height": h})
    if captions:
        with open(folder / "metadata.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps({k: row[k] for k in ("file_name", "text")}) + "\n")
    return rows


def zero_size_png() -> bytes:
    """A PNG whose header declares a width of 0 (no tool writes one; hand-built)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def broken_files(folder: Path) -> dict[str, str]:
    """Broken images of every kind; returns file name -> expected reason word."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "tmp_full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (folder / "empty.png").write_bytes(b"")
    (folder / "zero.png").write_bytes(zero_size_png())
    return {"truncated.png": "truncated", "garbage.png": "cannot open", "empty.png": "cannot open",
            "zero.png": ""}


@pytest.fixture
def sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(7)
    return [(int(w), int(h)) for w, h in zip(rng.integers(40, 400, 36), rng.integers(40, 400, 36))]
