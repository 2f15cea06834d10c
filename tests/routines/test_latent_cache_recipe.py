"""Latents and text embeddings cached by the diffusion routine, switched on from options.

A run with the caches equals a run without them (losses, bitwise), a second run reads
them (the VAE's encoder and the text encoder are never called), a changed VAE invalidates
them, a random flip keeps one entry per variant, resume stays bitwise, and the SD LoRA
example switches it on with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .conftest import quiet_engine, record_losses

DIFFUSION = "hookengine.routines.diffusion:DiffusionRoutine"
CAPTIONS = ["a red square", "a blue circle", "two dots"]


def captioned_images(folder: Path, count: int = 6) -> Path:
    """An imagefolder at two aspect ratios (two buckets), captions in ``metadata.jsonl``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i in range(count):
            size = (32, 32) if i % 2 else (48, 32)
            image = Image.new("RGB", size, (40 * i, 200 - 30 * i, 90))
            image.paste((255, 255, 255), (4 + i, 6, 14 + i, 20))  # not symmetric: a flip changes the pixels
            image.save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return folder


def run(tiny_sd: Path, run_dir: Path, data: Path, steps: int = 6, checkpoint: dict | None = None,
        change_vae: bool = False, **options) -> tuple[list[float], dict[str, list[int]], object]:
    """Losses, encoder calls (``vae``: its encoder; ``text``: the text encoder) and the routine."""
    plugins = {"checkpoint": checkpoint} if checkpoint else None
    engine = quiet_engine(run_dir, plugins, max_steps=steps, lr=1e-3, eval_at_phase_end=False)
    engine.use("dataset", path="imagefolder", data_dir=str(data), batch_size=2, shuffle=True)
    engine.use("bucketing", mode="area", resolutions=[32], align=8, max_aspect=2.0, flip_p=0.5)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), image_key="image", seed=3,
                         sample_at_phase_end=False, **options)
    calls: dict[str, list[int]] = {"vae": [], "text": []}

    def hook(state) -> None:
        vae = state.models["vae"]
        vae.encoder.register_forward_hook(lambda module, args, output: calls["vae"].append(args[0].shape[0]))
        state.models["text_encoder"].register_forward_hook(
            lambda module, args, output: calls["text"].append(args[0].shape[0]))
        if change_vae:
            with torch.no_grad():
                vae.encoder.conv_in.bias.add_(0.01)

    engine.on("setup", hook, priority="last")
    losses = record_losses(engine)
    engine.run()
    return losses, calls, routine


def test_cached_runs_equal_an_uncached_run_and_the_second_reads_the_cache(tiny_sd: Path, tmp_path: Path) -> None:
    data = captioned_images(tmp_path / "images")
    cache = {"cache_latents": True, "cache_text_embeddings": "disk", "cache_dir": str(tmp_path / "cache")}
    plain, plain_calls, _ = run(tiny_sd, tmp_path / "plain", data)
    first, first_calls, routine = run(tiny_sd, tmp_path / "first", data, **cache)
    second, second_calls, again = run(tiny_sd, tmp_path / "second", data, **cache)
    assert first == plain and second == plain  # bitwise: the same latents, noise and timesteps
    assert sum(plain_calls["vae"]) == 12 and sum(first_calls["vae"]) == 12  # 6 steps of 2 images
    assert second_calls == {"vae": [], "text": []}  # everything from the cache
    assert routine.latent_cache.misses > 6 and routine.latent_cache.hits + routine.latent_cache.misses == 12
    assert (again.latent_cache.hits, again.latent_cache.misses) == (12, 0)
    # flip_p=0.5 over two epochs: a flipped and an unflipped image are two entries.
    latents = [k for k in again.store.keys() if "parameters" in again.store.get(k)]
    assert len(latents) == routine.latent_cache.misses


def test_a_changed_vae_invalidates_the_cached_latents(tiny_sd: Path, tmp_path: Path) -> None:
    data = captioned_images(tmp_path / "images", count=4)
    cache = {"cache_latents": True, "cache_dir": str(tmp_path / "cache")}
    run(tiny_sd, tmp_path / "first", data, steps=2, **cache)
    _, same, _ = run(tiny_sd, tmp_path / "same", data, steps=2, **cache)
    changed, changed_calls, routine = run(tiny_sd, tmp_path / "changed", data, steps=2, change_vae=True, **cache)
    reference, _, _ = run(tiny_sd, tmp_path / "reference", data, steps=2, change_vae=True)
    assert same["vae"] == [] and sum(changed_calls["vae"]) == 4
    assert routine.latent_cache.misses == 4 and changed == reference


def test_resume_with_cached_latents_is_bitwise(tiny_sd: Path, tmp_path: Path) -> None:
    data = captioned_images(tmp_path / "images", count=4)
    cache = {"cache_latents": True, "cache_text_embeddings": "disk", "cache_dir": str(tmp_path / "cache")}
    unbroken, _, _ = run(tiny_sd, tmp_path / "whole", data, steps=4, **cache)
    folder = str(tmp_path / "ckpt")
    run(tiny_sd, tmp_path / "a", data, steps=2, checkpoint={"folder": folder}, **cache)
    resumed, calls, _ = run(tiny_sd, tmp_path / "b", data, steps=4, checkpoint={"folder": folder, "resume": "latest"},
                            **cache)
    assert resumed == unbroken[2:] and calls["vae"] == []


def test_the_sd_lora_example_switches_the_cache_on_with_one_line(tiny_sd: Path, tmp_path: Path) -> None:
    from hookengine import Engine
    from hookengine.recipe import apply_recipe, load_recipe

    recipe = Path(__file__).resolve().parents[2] / "examples" / "sd_lora" / "recipe.yaml"
    data = captioned_images(tmp_path / "images", count=4)
    common = [f"plugins.dataset.data_dir={data}", f"plugins.diffusion.pipeline={tiny_sd}", "trainer.max_steps=2",
              "checkpoint.every=0", "plugins.lr.warmup=1", "plugins.lora.save=[]"]
    losses = {}
    for name, line in (("off", []), ("on", ["plugins.diffusion.cache_latents=true"])):
        engine = Engine()
        apply_recipe(engine, load_recipe(recipe, [*common, f"run_dir={tmp_path / name}", *line]))
        losses[name] = record_losses(engine)
        engine.run()
    assert losses["on"] == losses["off"] and len(losses["on"]) == 2
    assert list((tmp_path / "on" / "cache").glob("*/*.safetensors"))


def test_random_crops_that_are_never_reused_are_reported(tiny_sd: Path, tmp_path: Path, caplog) -> None:
    """bucketing.random_crop draws a crop per epoch: each is its own entry, and the cache says it is not paying."""
    from PIL import Image

    data = tmp_path / "wide"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as metadata:
        for i in range(2):
            Image.new("RGB", (64, 32), (90 * i, 30, 200)).save(data / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": "a wide image"}) + "\n")
    engine = quiet_engine(tmp_path / "run", max_steps=3, lr=1e-3, eval_at_phase_end=False)
    engine.use("dataset", path="imagefolder", data_dir=str(data), batch_size=2)
    engine.use("bucketing", mode="area", resolutions=[32], align=8, max_aspect=1.0, random_crop=True)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), image_key="image", seed=3,
                         sample_at_phase_end=False, cache_latents=True)
    with caplog.at_level("WARNING", logger="hookengine.routines.diffusion"):
        engine.run()
    assert routine.latent_cache.hits == 0 and routine.latent_cache.misses == 6
    assert "reused no cached latent" in caplog.text and "random_crop" in caplog.text
