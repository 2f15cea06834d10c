"""Opening, validating and converting images; resize and crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hookengine.data.images import BadSampleError, image_size, open_image, resize_crop, to_tensor

from .conftest import broken_files


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_broken_files_raise_with_the_file_name(tmp_path):
    expected = broken_files(tmp_path)
    for name, word in expected.items():
        path = tmp_path / name
        with pytest.raises(BadSampleError) as info:
            open_image(str(path))
        assert str(path) in str(info.value)
        assert word in str(info.value)
    with pytest.raises(BadSampleError, match="missing file"):
        open_image(str(tmp_path / "nope.png"))


def test_header_size_without_decoding(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (123, 45)).save(path)
    assert image_size(str(path)) == (123, 45)
    assert image_size({"path": None, "bytes": path.read_bytes()}) == (123, 45)


def test_cmyk_converted_and_strict_mode(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    image = open_image(str(path))
    assert image.mode == "RGB" and image.size == (20, 10)
    r, g, b = image.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    with pytest.raises(BadSampleError, match="mode CMYK"):
        open_image(str(path), strict_modes=True)


def test_sixteen_bit_is_scaled_not_clipped():
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    rgb = open_image({"bytes": _png(image), "path": None})
    values = [rgb.getpixel((x, 0))[0] for x in range(3)]
    assert values == [0, 128, 255]  # clipping would give 0, 255, 255


def test_alpha_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = open_image(rgba)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (2, 2), (0, 128))
    assert open_image(la).getpixel((0, 0)) == (127, 127, 127)  # black at half alpha over white
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert open_image({"bytes": _png(palette), "path": None}).getpixel((0, 0)) == (255, 255, 255)


def test_resize_crop_and_tensor():
    image = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3) % 255)
    out = resize_crop(image, (80, 60), (64, 48), (8, 6), "nearest")
    assert out.size == (64, 48)
    # nearest 2x upscale: output (x, y) comes from source (x + 8) // 2, (y + 6) // 2
    assert out.getpixel((0, 0)) == image.getpixel((4, 3))
    tensor = to_tensor(out)
    assert tuple(tensor.shape) == (3, 48, 64)
    assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    with pytest.raises(ValueError, match="does not fit"):
        resize_crop(image, (80, 60), (64, 48), (20, 0))
