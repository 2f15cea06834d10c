"""VAE latents of training batches through the on-disk latent cache.

What is stored is the VAE's latent *distribution* (``latent_dist.parameters``: mean and
log-variance, as the encoder returns them), not one sample of it. Each step draws
``latent_dist.sample(generator)`` from it with the routine's generator, as diffusers'
example scripts do with ``--cache_latents`` (``train_dreambooth_lora_sdxl.py`` keeps
``vae.encode(...).latent_dist`` and calls ``.sample()`` every step). So a run reading
the cache draws the same latents, noise and timesteps as a run encoding every step:
same losses, bitwise, and the same random stream on resume. (kohya's scripts instead
store one fixed sample; that would change the losses.)

Keys (:func:`latent_row_keys`): the sample's identity (its file's path, size and
modification time as the data set plugin read it, else the digest of its pixels), the
transform that made the pixels (the bucket, crop, flip and original size that the
bucketing plugin records, the tensor's shape and dtype, the pixel range) and the VAE's
content digest. A random crop or flip is one entry per variant (each variant has its
own key).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..data.latent_cache import LatentCache, latent_key, tensor_digest

__all__ = ["CachedLatents", "SAMPLE_ID", "latent_row_keys"]

# The batch key under which the diffusion routine records each sample's identity.
SAMPLE_ID = "sample_id"
# Per-sample transform fields (the bucketing plugin writes them) that enter the key.
TRANSFORM_KEYS = ("original_size_hw", "crop_top_left", "target_size_hw", "flipped")


def _row(value: Any, index: int) -> Any:
    item = value[index]
    return item.tolist() if hasattr(item, "tolist") else item


def latent_row_keys(batch: Any, pixels: Any, encoder: str, pixel_range: tuple[float, float]) -> list[str]:
    """One cache key per sample of ``batch`` (``pixels`` is its image tensor, ``B, C, H, W``)."""
    count = int(pixels.shape[0])
    get = batch.get if hasattr(batch, "get") else (lambda key: None)
    identities = get(SAMPLE_ID)
    transforms = {key: get(key) for key in TRANSFORM_KEYS if get(key) is not None}
    keys = []
    for i in range(count):
        identity = identities[i] if identities is not None else None
        if identity is None:  # no file behind it: the pixels themselves are the identity
            identity = "tensor:" + tensor_digest(pixels[i])
        transform = {name: _row(value, i) for name, value in transforms.items()}
        crop = transform.pop("crop_top_left", (0, 0))
        bucket = transform.pop("target_size_hw", tuple(pixels.shape[-2:]))
        keys.append(latent_key(
            identity, bucket=bucket, crop=crop, flip=bool(transform.pop("flipped", False)), encoder=encoder,
            pixels=[str(pixels.dtype), list(pixels.shape[1:])], pixel_range=list(pixel_range), **transform,
        ))
    return keys


def _dim_order(tensor: Any) -> list[int]:
    """The tensor's memory layout: its dimensions from the largest stride to the smallest."""
    return sorted(range(tensor.ndim), key=lambda d: (-tensor.stride(d), d))


def _with_layout(tensor: Any, order: Sequence[int]) -> Any:
    """``tensor`` with the memory layout ``order`` (e.g. channels-last), same values."""
    order = list(order)
    if order == list(range(tensor.ndim)):
        return tensor.contiguous()
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return tensor.permute(order).contiguous().permute(inverse)


class CachedLatents:
    """Latent distributions of batches, read from a :class:`LatentCache` or encoded once.

    Args:
        cache: where the entries are (``<root>/<key[:2]>/<key>.safetensors``).

    ``hits`` and ``misses`` count samples.
    """

    def __init__(self, cache: LatentCache) -> None:
        self.cache = cache
        self.hits = 0
        self.misses = 0
        self.epoch_start = (0, 0)  # (hits, misses) when the current epoch began
        self.warned = False
        self._layouts: dict[int, list[int]] = {}  # batch size -> the layout the VAE gave it here

    def parameters(self, keys: list[str], encode: Callable[[], Any], device: Any) -> Any:
        """The batch's ``latent_dist.parameters`` (``B, 2C, h, w``) on ``device``.

        ``encode()`` runs the VAE on the whole batch. It is called when any row is not in
        the cache, and its own tensor is returned: the same values and memory layout as
        without a cache (a VAE's output rows do not depend on the other rows of a batch,
        but they may on the batch's size, as its memory layout does: on CPUs a batch of
        one comes out contiguous and larger ones channels-last). The missing rows are
        stored with the batch size and layout they were encoded at. When every row is
        cached, the rows are stacked in the layout recorded for this batch size, which
        the random draws that follow depend on.
        """
        import torch

        found = [self.cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = encode()
            order = torch.tensor(_dim_order(computed))
            size = torch.tensor(len(keys))
            for i in missing:
                self.cache.put(keys[i], {"parameters": computed[i], "dim_order": order, "batch_size": size})
            self._layouts[len(keys)] = order.tolist()
            return computed
        same = [e for e in found if int(e.get("batch_size", -1)) == len(keys)]
        layout = same[0]["dim_order"].tolist() if same else self._layouts.get(len(keys), found[0]["dim_order"].tolist())
        stacked = torch.stack([entry["parameters"].to(device) for entry in found])
        return _with_layout(stacked, layout)
