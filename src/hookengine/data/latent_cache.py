"""A cache of VAE latents and text-encoder outputs in safetensors files.

Each entry is keyed by everything that produced it: the content of the source file (its
SHA-256, not its name or date), the bucket, the crop, the flip and the encoder (a name
plus whatever identifies its weights and settings). Change any of them and the key
changes, so the entry is rebuilt; nothing stale is ever read. Files are written to a
temporary name and renamed, so a crash never leaves a half-written entry.

Identities that keys are made of: :func:`file_digest` (a file's bytes),
:func:`source_identity` (an image source as a data set gives it: path, size and
modification time, or the embedded bytes' digest), :func:`tensor_digest` (a tensor's
bytes) and :func:`module_digest` (a model's weights, buffers, class and config).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["LatentCache", "file_digest", "latent_key", "module_digest", "source_identity", "tensor_digest", "text_key"]

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (memoised by path, size and modification time)."""
    stat = os.stat(path)
    memo = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def source_identity(source: Any) -> str | None:
    """What identifies an image source without reading it whole.

    A file path (or ``datasets``' ``{"path", "bytes"}`` with no bytes): the resolved path,
    its size and modification time (ns); embedded bytes: their SHA-256; a PIL image:
    the digest of its mode, size and pixels. ``None`` when the source is none of these.
    """
    if isinstance(source, dict):
        data = source.get("bytes")
        if data:
            return "bytes:" + hashlib.sha256(data).hexdigest()
        source = source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return "bytes:" + hashlib.sha256(source).hexdigest()
    if isinstance(source, (str, os.PathLike)):
        path = os.path.realpath(source)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if hasattr(source, "tobytes") and hasattr(source, "mode") and hasattr(source, "size"):
        digest = hashlib.sha256(f"{source.mode}:{source.size}".encode())
        digest.update(source.tobytes())
        return "pixels:" + digest.hexdigest()
    return None


def _tensor_bytes(tensor: Any) -> Any:
    """A tensor's bytes as a numpy array (any dtype, bfloat16 included), on the CPU."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def tensor_digest(tensor: Any) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def module_digest(module: Any, *extra: Any) -> str:
    """SHA-256 of a model's content: class, config, every parameter and buffer (names,
    dtypes, shapes, bytes), and ``extra`` (e.g. a tokenizer's vocabulary).

    Two models with the same weights get the same digest whatever their file or name;
    a single changed weight gives another one.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    for item in extra:
        digest.update(json.dumps(item, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _key(parts: Mapping[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def latent_key(
    content: str,
    bucket: Sequence[int],
    crop: Sequence[int],
    flip: bool,
    encoder: str,
    **extra: Any,
) -> str:
    """The key of a VAE latent: file digest, bucket (w, h), crop (left, top), flip, encoder."""
    return _key({
        "kind": "latent", "content": content, "bucket": [int(v) for v in bucket],
        "crop": [int(v) for v in crop], "flip": bool(flip), "encoder": encoder, **extra,
    })


def text_key(text: str, encoder: str, **extra: Any) -> str:
    """The key of a text-encoder output: the text and the encoder."""
    return _key({"kind": "text", "text": text, "encoder": encoder, **extra})


class LatentCache:
    """Tensors stored as ``<root>/<key[:2]>/<key>.safetensors``.

    ``get_or_compute(key, fn)`` returns the stored tensors or computes, stores and
    returns ``fn()``. ``hits`` and ``misses`` count what happened; ``prune(keep)``
    removes entries that are no longer produced by anything.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def get(self, key: str) -> dict[str, Any] | None:
        """The tensors stored under ``key``, or ``None``; an unreadable file counts as missing."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a corrupt entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
        """Store ``tensors`` (contiguous CPU copies) under ``key``, atomically."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(data, tmp, metadata=dict(metadata or {}))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """Stored tensors for ``key``, else ``compute()`` stored and returned."""
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        tensors = dict(compute())
        self.put(key, tensors)
        return tensors

    def keys(self) -> set[str]:
        return {p.stem for p in self.root.glob("*/*.safetensors")}

    def prune(self, keep: set[str]) -> int:
        """Delete entries whose key is not in ``keep``; return how many."""
        removed = 0
        for key in self.keys() - set(keep):
            self.path(key).unlink(missing_ok=True)
            removed += 1
        return removed
