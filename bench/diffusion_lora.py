"""LoRA training on a tiny Stable Diffusion pipeline: hookengine vs the diffusers example loop.

Three variants, each in a fresh process (so peak memory is its own), interleaved:
- ``raw``: a hand-written loop as in diffusers' ``train_text_to_image_lora.py``: VAE
  encode, text encode, noise, UNet with a PEFT LoRA, MSE, AdamW over the LoRA weights;
- ``hookengine``: the same work through the engine (diffusion routine + lora_sched);
- ``hookengine_cached``: the engine with VAE latents and text-encoder outputs cached to
  safetensors first (``hookengine.data.latent_cache``), as kohya's scripts do.

Run: python bench/diffusion_lora.py [--steps 60 --repeats 3]   (JSON line last)
Targets: hookengine ÷ raw >= 1.0; cached ÷ raw >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8
SIZE = 64  # pixels; the tiny VAE halves it to 32x32 latents
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_pipeline(folder: Path) -> None:
    from hookengine.testing.tiny_models import save_tiny_sd_pipeline

    save_tiny_sd_pipeline(folder)


def make_batches(folder: Path, steps: int) -> list[dict]:
    import torch
    from diffusers import StableDiffusionPipeline

    tokenizer = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True).tokenizer
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(steps):
        prompts = [f"a photo of digit {(i * BATCH + j) % 10}" for j in range(BATCH)]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        batches.append({"pixel_values": torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1, "input_ids": ids})
    return batches


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_raw(folder: Path, steps: int) -> float:
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    unet, vae, text_encoder, scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = make_batches(folder, steps)
    t0 = time.perf_counter()
    for batch in batches:
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(batch["input_ids"], return_dict=False)[0]
        prediction = unet(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps / (time.perf_counter() - t0)


def run_engine(folder: Path, steps: int, cached: bool) -> float:
    import torch

    from hookengine import Engine

    batches = make_batches(folder, steps)
    engine = Engine(seed=0, run_dir=Path(tempfile.mkdtemp()))
    routine = engine.use("diffusion", pipeline=str(folder))
    engine.use("lora_sched", model="unet", adapters={
        "bench": {"rank": 4, "alpha": 4, "targets": TARGETS, "options": {"init_lora_weights": "gaussian"}}})
    engine.use_defaults({"trainer": {"max_steps": steps, "lr": 1e-4, "eval_at_phase_end": False},
                         "checkpoint": {"save_at_end": False}, "logging": {"every": 1000, "plot": False},
                         "progress": {"enabled": False}})
    if cached:
        engine.on("setup", lambda state: state.dataloaders.update(train=cache(folder, batches, state)), priority=-50)
    else:
        engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    times = {}
    engine.on("phase_start", lambda state: times.setdefault("t0", time.perf_counter()))
    engine.on("phase_end", lambda state: times.setdefault("t1", time.perf_counter()), priority=100)
    engine.run()
    del routine
    return steps / (times["t1"] - times["t0"])


def cache(folder: Path, batches: list[dict], state) -> list[dict]:
    """Latents and text states through the latent cache, keyed by what produced them."""
    import torch

    from hookengine.data.latent_cache import LatentCache, latent_key

    store = LatentCache(Path(tempfile.mkdtemp()) / "cache")
    vae, text_encoder = state.models["vae"], state.models["text_encoder"]
    cached = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            key = latent_key(f"batch-{i}", bucket=(SIZE, SIZE), crop=(0, 0), flip=False, encoder=str(folder))
            tensors = store.get_or_compute(key, lambda: {
                "latents": vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor,
                "encoder_hidden_states": text_encoder(batch["input_ids"], return_dict=False)[0],
            })
            cached.append(tensors)
    return cached


def child(variant: str, folder: str, steps: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_flush_denormal(True)  # tiny random models drift into denormals, which are slow on CPUs
    rate = run_raw(Path(folder), steps) if variant == "raw" else run_engine(Path(folder), steps, variant == "hookengine_cached")
    print(json.dumps({"variant": variant, "steps_per_s": rate, "peak_mb": peak_memory_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    variants = ("raw", "hookengine", "hookengine_cached")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        make_pipeline(folder)
        for _ in range(args.repeats):
            for variant in variants:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", variant, str(folder)],
                                     capture_output=True, text=True, env=env, check=True)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rate = {v: statistics.median(r["steps_per_s"] for r in results[v]) for v in variants}
    peak = {v: statistics.median(r["peak_mb"] for r in results[v]) for v in variants}
    for v in variants:
        print(f"{v:18s} {rate[v]:7.2f} steps/s   peak {peak[v]:7.1f} MB")
    print(json.dumps({
        "bench": "diffusion_lora", "steps": args.steps, "steps_per_s": {v: round(rate[v], 3) for v in variants},
        "ratio": round(rate["hookengine"] / rate["raw"], 3),
        "ratio_cached": round(rate["hookengine_cached"] / rate["raw"], 3),
        "peak_mb": {v: round(peak[v], 1) for v in variants}, "targets": {"ratio": 1.0, "ratio_cached": 1.5},
    }))


if __name__ == "__main__":
    main()
