"""Latent cache: keyed by content, bucket, crop, flip and encoder; rebuilt on any change."""

from __future__ import annotations

import os

import torch

from hookengine.data.latent_cache import LatentCache, file_digest, latent_key, text_key


def test_hit_miss_and_rebuild_on_every_key_part(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"first content")
    cache = LatentCache(tmp_path / "cache")
    calls = []

    def encode():
        calls.append(1)
        return {"latent": torch.full((4, 8, 8), float(len(calls)))}

    base = dict(content=file_digest(image), bucket=(64, 64), crop=(0, 0), flip=False, encoder="vae-a")
    first = cache.get_or_compute(latent_key(**base), encode)
    again = cache.get_or_compute(latent_key(**base), encode)
    assert torch.equal(first["latent"], again["latent"]) and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    for change in (dict(bucket=(64, 32)), dict(crop=(1, 0)), dict(flip=True), dict(encoder="vae-b")):
        cache.get_or_compute(latent_key(**{**base, **change}), encode)
    assert len(calls) == 5
    image.write_bytes(b"new content, same name")  # content changes: a new key
    assert file_digest(image) != base["content"]
    cache.get_or_compute(latent_key(**{**base, "content": file_digest(image)}), encode)
    assert len(calls) == 6


def test_text_keys_corrupt_entries_and_prune(tmp_path):
    cache = LatentCache(tmp_path)
    key = text_key("a cat", encoder="clip-l")
    assert key != text_key("a cat", encoder="clip-g") and key != text_key("a dog", encoder="clip-l")
    cache.put(key, {"hidden": torch.ones(2, 3)})
    assert key in cache
    cache.path(key).write_bytes(b"broken")  # a corrupt file is rebuilt, never trusted
    out = cache.get_or_compute(key, lambda: {"hidden": torch.zeros(2, 3)})
    assert torch.equal(out["hidden"], torch.zeros(2, 3))
    other = text_key("x", encoder="e")
    cache.put(other, {"t": torch.ones(1)})
    assert cache.prune({key}) == 1 and cache.keys() == {key}
    assert not list(tmp_path.glob("*/*.tmp"))


def test_identities_follow_content_and_files(tmp_path):
    from hookengine.data.latent_cache import module_digest, source_identity, tensor_digest

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b)  # content, not the object
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert module_digest(a) != module_digest(b)
    assert module_digest(a.to(torch.bfloat16)) != module_digest(b.to(torch.float32))
    x = torch.zeros(2, 3)
    assert tensor_digest(x) == tensor_digest(x.clone()) != tensor_digest(x.reshape(3, 2))
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    first = source_identity(str(image))
    assert first == source_identity({"path": str(image), "bytes": None}) and first.startswith("file:")
    os.utime(image, ns=(1, 1))
    assert source_identity(str(image)) != first  # modification time
    assert source_identity({"path": "x.png", "bytes": b"one"}) == source_identity(b"one")
    assert source_identity(str(tmp_path / "missing.png")) is None and source_identity(3) is None
