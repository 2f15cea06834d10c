"""LoRA training on a Stable-Diffusion-shaped pipeline: hookengine vs the diffusers example loop.

The pipeline is built from configs (nothing downloaded), with SD 1.x's structure: a UNet
of four levels with channel widths ``W, 2W, 4W, 4W`` (cross-attention in the first three),
a four-level VAE (``0.4 W`` ... ``1.6 W``, 8x downsampling) and a CLIP text encoder with
77 tokens. ``--width 320`` is SD 1.x's shapes (UNet 320/640/1280/1280, two layers per
block, VAE 128..512, a 768-wide 12-layer text encoder, 64x64 latents from 512 px images);
the CPU default (``--width 32``, one layer per block, a 2-layer text encoder) keeps the
structure and the 64x64 latents and runs in under 3 minutes on 2 cores (first level without attention, as SDXL).

Four variants, each in a fresh process (so peak memory is its own), interleaved:

- ``raw``: a hand-written loop as in diffusers' ``train_text_to_image_lora.py``: VAE
  encode + ``latent_dist.sample()``, text encode, noise, UNet with a PEFT LoRA, MSE, AdamW
  over the LoRA weights;
- ``raw_cached``: the same loop with diffusers' ``--cache_latents`` pattern
  (``train_dreambooth_lora_sdxl.py``): ``latent_dist`` and the text embeddings of every
  batch computed once before training, ``latent_dist.sample()`` each step;
- ``hookengine``: the same work through the engine (diffusion routine + lora_sched),
  captions encoded by the routine;
- ``hookengine_cached``: the engine with ``cache_latents: true`` and
  ``cache_text_embeddings: disk``, reading a cache that one earlier run filled (timed
  separately as ``cache_fill_s``).

Each variant reports steps/s over the timed steps (after warm-up steps), the encoders'
share of a step (VAE encoder + text encoder time over step time, measured on a few more
steps with the device synchronised around each encoder call), and peak memory (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS).

Options for the GPU check: ``--bf16`` (autocast; the engine's ``mixed_precision``),
``--checkpointing`` (UNet gradient checkpointing), ``--compile`` (``torch.compile`` of the
UNet), ``--block-swap`` (engine only); the engine side uses the ``memory`` /
``block_swap`` plugins when they are installed, and says so when they are not.

Run: python bench/diffusion_lora.py [--steps 2 --repeats 1 --width 32]   (JSON line last)
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
from typing import Any

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VARIANTS = ("raw", "raw_cached", "hookengine", "hookengine_cached")


# ----------------------------------------------------------------- the pipeline
def medium_pipeline(width: int, seed: int = 0) -> Any:
    """An SD-1.x-shaped ``StableDiffusionPipeline`` scaled by ``width`` (320: SD 1.x's shapes)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hookengine.testing.tiny_models import build_tiny_clip_tokenizer

    full = width >= 320
    torch.manual_seed(seed)
    # SD 1.x has cross-attention from the first level on (8 heads); the scaled-down CPU
    # default starts it at the second level, as SDXL does, to stay within minutes on 2 cores.
    first = "CrossAttnDownBlock2D" if full else "DownBlock2D"
    text_width = 768 if full else max(64, width * 2)
    groups = 32 if width % 32 == 0 else 8
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2 if full else 1,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), norm_num_groups=groups,
        down_block_types=(first,) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + (first.replace("Down", "Up"),),
        cross_attention_dim=text_width, attention_head_dim=8 if full else 2,
    )
    vae_width = max(8, (width * 2 // 5) // 8 * 8)  # 128 at 320, as SD's VAE
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2 if full else 1,
        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32 if vae_width % 32 == 0 else 8, sample_size=512,
    )
    tokenizer = build_tiny_clip_tokenizer()  # a byte-level vocabulary: the text encoder's shapes are SD's
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
        num_hidden_layers=12 if full else 2, num_attention_heads=12 if full else 4, max_position_embeddings=77,
        projection_dim=text_width,
    ))
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_batches(count: int, batch: int, pixels: int, tokenizer: Any = None) -> list[dict]:
    """``count`` batches of random images in [-1, 1] with captions (and ``input_ids``)."""
    import torch

    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        prompts = [f"a photo of digit {(i * batch + j) % 10}" for j in range(batch)]
        item = {"pixel_values": torch.rand(batch, 3, pixels, pixels, generator=g) * 2 - 1, "caption": prompts,
                # what the dataset plugin records for files: the cache keys on it
                "sample_id": [f"bench:{i}:{j}" for j in range(batch)]}
        if tokenizer is not None:
            item["input_ids"] = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                          truncation=True, return_tensors="pt").input_ids
        batches.append(item)
    return batches


# ------------------------------------------------------------------ measuring
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class EncoderTimer:
    """Time spent in the VAE encoder and the text encoder while ``active`` (device synchronised)."""

    def __init__(self, modules: list[Any]) -> None:
        self.active, self.total, self._start = False, 0.0, 0.0
        for module in modules:
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, module: Any, args: Any) -> None:
        if self.active:
            sync()
            self._start = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        if self.active:
            sync()
            self.total += time.perf_counter() - self._start


class StepClock:
    """Timestamps at the step boundaries: warm-up, timed steps, measured steps."""

    def __init__(self, options: argparse.Namespace, timer: EncoderTimer) -> None:
        self.warmup, self.steps, self.measure = options.warmup, options.steps, options.measure
        self.timer, self.marks = timer, {}

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.measure

    def after_step(self, done: int) -> None:
        if done in (self.warmup, self.warmup + self.steps, self.total):
            sync()
            self.marks[done] = time.perf_counter()
        if done == self.warmup + self.steps:
            self.timer.active = True

    def result(self) -> dict:
        timed = self.marks[self.warmup + self.steps] - self.marks[self.warmup]
        measured = self.marks[self.total] - self.marks[self.warmup + self.steps]
        return {"steps_per_s": self.steps / timed, "step_ms": 1000 * timed / self.steps,
                "encoder_share": self.timer.total / measured}


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------- variants
def run_raw(folder: Path, steps: int, batch: int, options: argparse.Namespace, cached: bool) -> dict:
    """diffusers' ``train_text_to_image_lora.py`` loop (with ``--cache_latents``: the SDXL script's cache)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    unet, vae, text_encoder, scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    vae.eval(), text_encoder.eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    if options.checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(unet) if options.compile else unet
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if options.bf16 else contextlib.nullcontext
    timer = EncoderTimer([vae.encoder, text_encoder])
    clock = StepClock(options, timer)
    batches = make_batches(clock.total, batch, options.pixels, pipe.tokenizer)
    if cached:  # the script's pass over the data before training
        with torch.no_grad(), autocast():
            cache = [(vae.encode(b["pixel_values"].to(device)).latent_dist,
                      text_encoder(b["input_ids"].to(device), return_dict=False)[0]) for b in batches]
    unet.train()
    for done, batch_data in enumerate(batches, start=1):
        with autocast():
            if cached:
                dist, states = cache[done - 1]
                latents = dist.sample() * vae.config.scaling_factor
            else:
                with torch.no_grad():
                    latents = vae.encode(batch_data["pixel_values"].to(device)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    states = text_encoder(batch_data["input_ids"].to(device), return_dict=False)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = model(noisy, timesteps, states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.after_step(done)
    return clock.result()


def engine_plugins(options: argparse.Namespace) -> dict[str, dict]:
    """The engine side of ``--checkpointing`` / ``--compile`` / ``--block-swap``."""
    plugins: dict[str, dict] = {}
    memory: dict[str, Any] = {}
    if options.checkpointing:
        memory["gradient_checkpointing"] = {"unet": True}
    if options.compile:
        memory["compile"] = "model"
        memory["compile_models"] = ["unet"]
    if memory:
        plugins["memory"] = {"use": "hookengine.sched.memory:MemoryPlugin", **memory}
    if options.block_swap:
        plugins["block_swap"] = {"use": "hookengine.sched.block_swap:BlockSwap", **json.loads(options.block_swap)}
    return plugins


def run_engine(folder: Path, steps: int, batch: int, options: argparse.Namespace, cache_dir: str | None,
               fill: bool = False) -> dict:
    from diffusers import StableDiffusionPipeline

    from hookengine import Engine

    total = options.warmup + steps + options.measure
    if cache_dir:  # captions: the routine encodes only those not in the cache
        batches = make_batches(total, batch, options.pixels)
    else:  # token ids, as the example loop gets them (its data loader tokenizes)
        tokenizer = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True).tokenizer
        batches = [{k: v for k, v in b.items() if k != "caption"}
                   for b in make_batches(total, batch, options.pixels, tokenizer)]
    engine = Engine(seed=0, run_dir=Path(tempfile.mkdtemp()), mixed_precision="bf16" if options.bf16 else "no")
    cache = {"cache_latents": True, "cache_text_embeddings": "disk", "cache_dir": cache_dir} if cache_dir else {}
    routine = engine.use("diffusion", pipeline=str(folder), prediction_type="epsilon",
                         sample_at_phase_end=False, **cache)
    engine.use("lora_sched", model="unet", adapters={
        "bench": {"rank": 4, "alpha": 4, "targets": TARGETS, "options": {"init_lora_weights": "gaussian"}}})
    for name, plugin in engine_plugins(options).items():
        plugin = dict(plugin)
        engine.use(plugin.pop("use"), name=name, **plugin)
    engine.use_defaults({"trainer": {"max_steps": total, "lr": 1e-4, "eval_at_phase_end": False},
                         "checkpoint": {"save_at_end": False}, "logging": {"every": 1000, "plot": False},
                         "progress": {"enabled": False}})
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    holder: dict[str, Any] = {}

    def hook(state: Any) -> None:
        holder["timer"] = timer = EncoderTimer([state.models["vae"].encoder, state.models["text_encoder"]])
        holder["clock"] = StepClock(options, timer)

    engine.on("setup", hook, priority="last")
    engine.on("step_end", lambda state: holder["clock"].after_step(state.clock.step))
    t0 = time.perf_counter()
    engine.run()
    if fill:
        return {"cache_fill_s": time.perf_counter() - t0}
    result = holder["clock"].result()
    if routine.latent_cache is not None:
        result["cache_hits"] = routine.latent_cache.hits
    return result


def child(variant: str, folder: str, options: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_flush_denormal(True)  # random models drift into denormals, which are slow on CPUs
    cache_dir = os.environ["BENCH_CACHE_DIR"]
    if variant in ("raw", "raw_cached"):
        result = run_raw(Path(folder), options.steps, options.batch, options, variant == "raw_cached")
    else:
        result = run_engine(Path(folder), options.steps, options.batch, options,
                            cache_dir if variant != "hookengine" else None, fill=variant == "fill")
    print(json.dumps({"variant": variant, **result, "peak_mb": peak_memory_mb()}))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20 if cuda else 2, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1, help="steps before the timed ones")
    parser.add_argument("--measure", type=int, default=3 if cuda else 1, help="steps after them, encoders timed")
    parser.add_argument("--repeats", type=int, default=3 if cuda else 1)
    parser.add_argument("--width", type=int, default=320 if cuda else 32, help="UNet base channels (320: SD 1.x)")
    parser.add_argument("--batch", type=int, default=4 if cuda else 1)
    parser.add_argument("--pixels", type=int, default=512, help="image side (the VAE makes 1/8 of it)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--block-swap", default=None, help="JSON options of the block_swap plugin (engine only)")
    parser.add_argument("--pipeline", default=None, help="a folder to keep the built pipeline in (reused when there)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"))
    return parser.parse_args(argv)


def main() -> None:
    options = parse()
    if options.child:
        child(options.child[0], options.child[1], options)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    variants = [v for v in options.variants.split(",") if v]
    passed = [a for a in sys.argv[1:]]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    extra: dict[str, Any] = {}

    def spawn(variant: str, folder: Path) -> dict:
        out = subprocess.run([sys.executable, __file__, *passed, "--child", variant, str(folder)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(options.pipeline or Path(tmp) / "pipe")
        env["BENCH_CACHE_DIR"] = str(Path(tmp) / "cache")  # fresh per invocation: the fill run fills it
        if not (folder / "model_index.json").is_file():
            medium_pipeline(options.width).save_pretrained(folder, safe_serialization=True)
        if "hookengine_cached" in variants:
            extra["cache_fill_s"] = round(spawn("fill", folder)["cache_fill_s"], 2)
        for _ in range(options.repeats):
            for variant in variants:
                results[variant].append(spawn(variant, folder))
    summary = {v: {key: statistics.median(r[key] for r in results[v])
                   for key in ("steps_per_s", "step_ms", "encoder_share", "peak_mb")} for v in variants}
    for v in variants:
        s = summary[v]
        print(f"{v:18s} {s['steps_per_s']:7.2f} steps/s  {s['step_ms']:8.1f} ms/step  "
              f"encoders {100 * s['encoder_share']:5.1f}% of a step  peak {s['peak_mb']:8.1f} MB")
    rate = {v: summary[v]["steps_per_s"] for v in variants}
    ratios = {}
    for name, (a, b) in {"hookengine/raw": ("hookengine", "raw"), "hookengine_cached/raw_cached": (
            "hookengine_cached", "raw_cached"), "raw_cached/raw": ("raw_cached", "raw"),
            "hookengine_cached/raw": ("hookengine_cached", "raw")}.items():
        if a in rate and b in rate:
            ratios[name] = round(rate[a] / rate[b], 3)
            print(f"{name:30s} {ratios[name]:.3f}")
    flags = {k: getattr(options, k) for k in ("bf16", "checkpointing", "compile", "block_swap")}
    print(json.dumps({
        "bench": "diffusion_lora", "width": options.width, "pixels": options.pixels, "batch": options.batch,
        "steps": options.steps, "repeats": options.repeats, "flags": flags, **extra,
        "steps_per_s": {v: round(rate[v], 3) for v in variants},
        "encoder_share": {v: round(summary[v]["encoder_share"], 3) for v in variants},
        "peak_mb": {v: round(summary[v]["peak_mb"], 1) for v in variants}, "ratios": ratios,
    }))


if __name__ == "__main__":
    main()
