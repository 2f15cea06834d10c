"""Images: read sizes from headers, open and validate, convert modes, resize and crop.

Every failure raises :class:`BadSampleError` naming the file (or the sample), so a data
set policy can skip the sample, count it and name it, or stop with a clear message:
decompression bombs (PIL's own limit) and images over a pixel limit included. A JPEG over
the limit, or larger than the size it is needed at, is decoded at 1/2, 1/4 or 1/8 of its
size (``Image.draft``: the decoder skips the detail) instead of whole.
PIL, NumPy and torch are imported inside the functions.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

__all__ = [
    "BadSampleError",
    "describe_source",
    "image_size",
    "decode_image",
    "open_image",
    "resize_crop",
    "to_tensor",
    "RESAMPLING",
]

# Names accepted for the resampling filter (PIL's names, lower case).
RESAMPLING = ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest")


class BadSampleError(ValueError):
    """A sample cannot be used (corrupt or truncated image, zero size, no caption...).

    Attributes:
        name: the file or sample that failed.
        reason: a short reason, used as the metric and log key.
    """

    def __init__(self, name: str, reason: str, detail: str = "") -> None:
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))


def describe_source(source: Any, fallback: str = "<image>") -> str:
    """A readable name for an image source: its path when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict):
        return str(source.get("path") or fallback)
    return str(getattr(source, "filename", "") or fallback)


def _open_raw(source: Any, name: str) -> Any:
    """A lazily opened PIL image (header read, pixels not yet decoded)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    try:
        if isinstance(source, dict):
            if source.get("bytes") is not None:
                return Image.open(io.BytesIO(source["bytes"]))
            if source.get("path"):
                return Image.open(source["path"])
            raise BadSampleError(name, "no image", "the image entry has neither bytes nor a path")
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source))
        if isinstance(source, (str, os.PathLike)):
            return Image.open(source)
    except FileNotFoundError as exc:
        raise BadSampleError(name, "missing file", str(exc)) from None
    except Image.DecompressionBombError as exc:  # PIL's limit: 2 x Image.MAX_IMAGE_PIXELS
        raise BadSampleError(name, "decompression bomb", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadSampleError(name, "cannot open image", f"{type(exc).__name__}: {exc}") from None
    if source is None:
        raise BadSampleError(name, "no image", "the sample has no image")
    raise BadSampleError(name, "no image", f"unsupported image value of type {type(source).__name__}")


def image_size(source: Any, name: str | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decoding).

    With ``max_pixels``, an image that :func:`decode_image` would refuse ("too many
    pixels": over the limit, and not a JPEG that a reduced scale brings under it) is
    refused here already, before it is planned into a batch.
    """
    name = name or describe_source(source)
    image = _open_raw(source, name)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSampleError(name, "zero size", f"{width}x{height}")
    _limit_scale(width, height, _can_draft(image), max_pixels, name)
    return int(width), int(height)


def _can_draft(image: Any) -> bool:
    return getattr(image, "format", None) == "JPEG" and callable(getattr(image, "draft", None))


def _limit_scale(width: int, height: int, can_draft: bool, max_pixels: int | None, name: str) -> int:
    """The reduced scale (1, 2, 4, 8) that brings an image under ``max_pixels``, or refuse it."""
    if max_pixels is None or width * height <= max_pixels:
        return 1
    fits = [s for s in (2, 4, 8) if -(-width // s) * -(-height // s) <= max_pixels] if can_draft else []
    if not fits:
        raise BadSampleError(name, "too many pixels",
                             f"{width}x{height} = {width * height} pixels, over max_pixels={max_pixels}")
    return fits[0]


def open_image(
    source: Any,
    *,
    name: str | None = None,
    strict_modes: bool = False,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = None,
    min_size: Sequence[int] | None = None,
) -> Any:
    """Open, fully decode and validate an image; return it in RGB.

    Truncated or corrupt files and zero sizes raise :class:`BadSampleError`. Other
    modes are converted: CMYK through PIL, 16- and 32-bit greyscale scaled (not clipped)
    to 8 bits, alpha composited over ``background``. With ``strict_modes`` any mode but
    RGB and L is a bad sample instead. ``max_pixels`` and ``min_size``: see
    :func:`decode_image`.
    """
    return decode_image(source, name=name, strict_modes=strict_modes, background=background,
                        max_pixels=max_pixels, min_size=min_size)[0]


def decode_image(
    source: Any,
    *,
    name: str | None = None,
    strict_modes: bool = False,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = None,
    min_size: Sequence[int] | None = None,
) -> tuple[Any, tuple[int, int]]:
    """:func:`open_image`, returning ``(image, (width, height) of the file)``.

    An image of more than ``max_pixels`` pixels is a bad sample ("too many pixels"),
    unless its format decodes at a reduced scale (JPEG) to at most ``max_pixels``: then
    it is decoded reduced. ``min_size`` (width, height) is the size the image is needed
    at (a bucket's resize target): a JPEG at least twice as large is decoded at the
    smallest reduced scale that still covers it. So the returned image may be smaller
    than the file; the second value is always the file's size.
    """
    name = name or describe_source(source)
    image = _open_raw(source, name)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSampleError(name, "zero size", f"{width}x{height}")
    _reduce(image, name, max_pixels, min_size)
    try:
        image.load()  # decodes every pixel: truncation and corruption surface here
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadSampleError(name, "corrupt or truncated image", f"{type(exc).__name__}: {exc}") from None
    if image.mode in ("RGB", "L"):
        return (image.convert("RGB") if image.mode == "L" else image), (int(width), int(height))
    if strict_modes:
        raise BadSampleError(name, "unsupported mode", f"mode {image.mode}; expected RGB or L")
    return _to_rgb(image, background), (int(width), int(height))


def _reduce(image: Any, name: str, max_pixels: int | None, min_size: Sequence[int] | None) -> None:
    """Ask the decoder for a reduced scale (JPEG's 1/2, 1/4, 1/8), or refuse the image."""
    width, height = image.size
    can_draft = _can_draft(image)
    scale = 1
    if min_size is not None:  # the largest scale that still covers the size asked for
        want_w, want_h = max(1, int(min_size[0])), max(1, int(min_size[1]))
        scale = next(s for s in (8, 4, 2, 1) if width // s >= want_w and height // s >= want_h or s == 1)
    scale = max(scale, _limit_scale(width, height, can_draft, max_pixels, name))
    if can_draft and scale > 1:
        # draft() may be called once; it picks the largest power of 2 <= min(w // rw, h // rh).
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
    if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
        raise BadSampleError(name, "too many pixels",
                             f"{width}x{height} = {width * height} pixels, over max_pixels={max_pixels}")


def _to_rgb(image: Any, background: Sequence[int]) -> Any:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1


def _high_depth_to_rgb(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I" (32-bit) and "F": scale by the range actually used
        top = float(pixels.max()) if pixels.size and pixels.max() > 255 else 255.0
    scaled = np.clip(np.round(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def resize_crop(
    image: Any,
    resized: Sequence[int],
    bucket: Sequence[int],
    offset: Sequence[int],
    resampling: str = "lanczos",
) -> Any:
    """Resize to ``resized`` (width, height), then crop ``bucket`` at ``offset`` (left, top)."""
    from PIL import Image

    if resampling not in RESAMPLING:
        raise ValueError(f"resampling={resampling!r}: use one of {RESAMPLING}")
    rw, rh = int(resized[0]), int(resized[1])
    bw, bh = int(bucket[0]), int(bucket[1])
    left, top = int(offset[0]), int(offset[1])
    if left < 0 or top < 0 or left + bw > rw or top + bh > rh:
        raise ValueError(f"crop {bw}x{bh} at ({left}, {top}) does not fit in the resized {rw}x{rh}")
    if image.size != (rw, rh):
        image = image.resize((rw, rh), resample=getattr(Image.Resampling, resampling.upper()))
    if (bw, bh) != (rw, rh):
        image = image.crop((left, top, left + bw, top + bh))
    return image


def to_tensor(image: Any) -> Any:
    """A ``(3, H, W)`` float32 tensor in ``[-1, 1]`` (the usual VAE input range)."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)
