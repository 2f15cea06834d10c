"""Diffusion routine: equal to diffusers' example loops, trains through the engine, writes samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hookengine.demo.digit_scenes import digits_unet
from hookengine.routines.diffusion import DiffusionRoutine

from .conftest import quiet_engine, record_losses

DIFFUSION = "hookengine.routines.diffusion:DiffusionRoutine"
STEPS = 2


def sd_batches(tiny_sd: Path, count: int = STEPS, size: int = 2) -> list[dict[str, torch.Tensor]]:
    """Image/caption batches for the tiny SD pipeline: pixels in [-1, 1], tokenized captions."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    generator = torch.Generator().manual_seed(1)
    captions = ["a red square", "a blue circle", "two dots", "a line"]
    batches = []
    for i in range(count):
        pixels = torch.rand((size, 3, 32, 32), generator=generator) * 2 - 1
        text = [captions[(i * size + j) % len(captions)] for j in range(size)]
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        batches.append({"pixel_values": pixels, "input_ids": ids.input_ids})
    return batches


def script_losses(tiny_sd: Path, batches: list[dict], prediction_type: str, snr_gamma: float | None,
                  noise_offset: float, seed: int | None, lr: float,
                  rng_states: list[torch.Tensor] | None = None) -> list[float]:
    """diffusers' examples/text_to_image/train_text_to_image_lora.py, step by step. With a
    ``seed``, every random draw comes from a generator of that seed; without one, from the
    global RNG as in the script, set to ``rng_states[i]`` at the start of step ``i``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel

    noise_scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    unet.train()
    losses = []
    for i, batch in enumerate(batches):
        if rng_states is not None:
            torch.set_rng_state(rng_states[i])
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
        latents = latents * vae.config.scaling_factor
        # The script: torch.randn_like(latents), which keeps the latents' (channels-last) strides.
        noise = torch.randn_like(latents, generator=generator)
        if noise_offset:
            noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        noise_scheduler.register_to_config(prediction_type=prediction_type)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        if snr_gamma is None:
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        else:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            if noise_scheduler.config.prediction_type == "epsilon":
                weights = weights / snr
            else:
                weights = weights / (snr + 1)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "prediction_type, snr_gamma, noise_offset",
    [("epsilon", 5.0, 0.1), ("v_prediction", 5.0, 0.05), ("epsilon", None, 0.0)],
)
def test_sd_losses_equal_diffusers_example_loop(tiny_sd: Path, run_dir: Path, prediction_type: str,
                                                snr_gamma: float | None, noise_offset: float) -> None:
    batches = sd_batches(tiny_sd)
    engine = quiet_engine(run_dir, max_steps=STEPS, lr=1e-3, eval_at_phase_end=False)
    engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), prediction_type=prediction_type,
               snr_gamma=snr_gamma, noise_offset=noise_offset, seed=7, sample_at_phase_end=False)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    losses = record_losses(engine)
    engine.run()
    expected = script_losses(tiny_sd, batches, prediction_type, snr_gamma, noise_offset, seed=7, lr=1e-3)
    assert losses == expected  # bitwise: same draws, same operations
    assert len(set(losses)) == STEPS  # the weights moved


def test_sd_losses_equal_diffusers_example_loop_on_the_global_rng(tiny_sd: Path, run_dir: Path) -> None:
    """``seed: null``: every draw from the global RNG, in the script's calls and order (VAE
    sample, randn_like(latents), offset noise, timesteps). The tiny VAE's latents are
    channels-last on CPU, where randn(shape) and randn_like(latents) differ."""
    batches = sd_batches(tiny_sd)
    engine = quiet_engine(run_dir, max_steps=STEPS, lr=1e-3, eval_at_phase_end=False)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), prediction_type="epsilon",
                         snr_gamma=5.0, noise_offset=0.1, seed=None, sample_at_phase_end=False)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    states: list[torch.Tensor] = []
    clean_input = routine.clean_input

    def recording(batch, generator=None):
        assert generator is None
        states.append(torch.get_rng_state())
        return clean_input(batch, generator)

    routine.clean_input = recording
    losses = record_losses(engine)
    engine.run()
    assert len(states) == STEPS
    expected = script_losses(tiny_sd, batches, "epsilon", 5.0, 0.1, seed=None, lr=1e-3, rng_states=states)
    assert losses == expected


@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
def test_noise_and_timesteps_drawn_as_the_script_on_channels_last_latents(run_dir: Path, noise_offset: float) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
                         image_key=0, label_key=1, noise_offset=noise_offset, seed=None)
    engine.fire("setup")
    latents = torch.randn((3, 4, 8, 8)).contiguous(memory_format=torch.channels_last)
    state = torch.get_rng_state()
    noise = routine.draw_noise(latents)
    timesteps = routine.draw_timesteps(latents.shape[0], latents.device)
    torch.set_rng_state(state)
    # diffusers' train_text_to_image(_lora).py
    expected_noise = torch.randn_like(latents)
    if noise_offset:
        expected_noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    count = routine.noise_scheduler.config.num_train_timesteps
    expected_timesteps = torch.randint(0, count, (latents.shape[0],), device=latents.device).long()
    assert torch.equal(noise, expected_noise)
    assert torch.equal(timesteps, expected_timesteps)


def flow_losses_by_hand(unet: torch.nn.Module, batches: list[tuple], scheduler, weighting: str,
                        precondition: bool, seed: int) -> list[float]:
    """Flow matching as diffusers' train_dreambooth_lora_sd3.py does it (no optimizer)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    def get_sigmas(timesteps: torch.Tensor, n_dim: int) -> torch.Tensor:
        schedule_timesteps = scheduler.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = scheduler.sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    generator = torch.Generator().manual_seed(seed)
    losses = []
    for pixels, labels in batches:
        model_input = pixels * 2 - 1
        noise = torch.randn_like(model_input, generator=generator)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=weighting, batch_size=model_input.shape[0], logit_mean=0.0, logit_std=1.0,
            mode_scale=1.29, generator=generator,
        )
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        model_pred = unet(noisy_model_input, timesteps, class_labels=labels, return_dict=False)[0]
        if precondition:
            model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting_ = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=sigmas)
        target = model_input if precondition else noise - model_input
        loss = torch.mean((weighting_.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        losses.append(float(loss.mean()))
    return losses


@pytest.mark.parametrize(
    "sampling, weighting, precondition",
    [("logit_normal", "none", False), ("uniform", "cosmap", True), ("mode", "none", False)],
)
def test_flow_matching_loss_equals_sd3_script(run_dir: Path, sampling: str, weighting: str, precondition: bool) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hookengine import Engine

    generator = torch.Generator().manual_seed(3)
    batches = [(torch.rand((4, 1, 8, 8), generator=generator), torch.tensor([0, 3, 5, 9])) for _ in range(2)]
    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(
        DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
        noise_scheduler={"class": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
        timestep_sampling=sampling, loss_weighting=weighting, precondition_outputs=precondition,
        image_key=0, label_key=1, pixel_range=(0.0, 1.0), seed=11,
    )
    engine.fire("setup")
    assert routine.prediction_type == "flow_matching"
    with torch.no_grad():
        ours = [float(engine.call("compute_loss", batch)) for batch in batches]
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        weighting_scheme = {"uniform": weighting, "logit_normal": "logit_normal", "mode": "mode"}[sampling]
        theirs = flow_losses_by_hand(engine.state.models["unet"], batches, scheduler, weighting_scheme, precondition, seed=11)
    assert ours == theirs


def test_class_conditional_unet_trains_and_writes_sample_grids(run_dir: Path) -> None:
    from PIL import Image

    engine = quiet_engine(run_dir, max_steps=4, lr=2e-3, eval_every=2, eval_at_phase_end=False)
    engine.use("digits", batch_size=32)
    engine.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
               model_options={"width": 8}, image_key=0, label_key=1, pixel_range=(0.0, 1.0),
               sample_every=2, sample_steps=3, snr_gamma=5.0)
    evaluated: list[tuple[int, float]] = []
    engine.on("evaluate_end", lambda state, metrics: evaluated.append((state.clock.step, metrics["val_loss"])))
    written: list[Path] = []
    engine.on("samples_written", lambda state, path: written.append(path))
    engine.run()
    samples = run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0002.png", "step-0004.png"]
    assert written[-1] == samples / "step-0004.png"
    grid = Image.open(samples / "step-0004.png")
    assert grid.size == (4 * 64, 3 * 64)  # 10 classes in a 4x3 grid of 8x8 images shown at 64 px
    assert [step for step, _ in evaluated] == [2, 4]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in evaluated)
    assert engine.state.models["unet"].config.num_class_embeds == 10


def test_sampling_does_not_shift_training(run_dir: Path) -> None:
    """Samples and validation draw from their own generators: the training losses are the same."""
    def run(sample_every: int, eval_every: int, folder: Path) -> list[float]:
        folder.mkdir()
        engine = quiet_engine(folder, max_steps=3, eval_every=eval_every, eval_at_phase_end=False)
        engine.use("digits", batch_size=16)
        engine.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
                   model_options={"width": 8}, image_key=0, label_key=1, pixel_range=(0.0, 1.0),
                   sample_every=sample_every, sample_steps=2, sample_at_phase_end=False)
        losses = record_losses(engine)
        engine.run()
        return losses

    assert run(0, 0, run_dir / "a") == run(2, 2, run_dir / "b")


def test_pipeline_samples_from_prompts(tiny_sd: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), sample_prompts=["a cat", "a dog"],
                         sample_steps=2, sample_options={"guidance_scale": 1.0})
    engine.fire("setup")
    assert {"unet", "vae", "text_encoder"} <= set(engine.state.models)
    assert not any(p.requires_grad for p in engine.state.models["vae"].parameters())
    first = routine.sample()
    assert first.shape == (2, 3, 32, 32) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, routine.sample())  # seeded
    path = routine.write_samples(engine.state)
    assert path == run_dir / "samples" / "step-0000.png" and path.is_file()


def test_unknown_prediction_type_for_scheduler_is_a_clear_error(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
               prediction_type="flow_matching", noise_scheduler={"class": "DDPMScheduler"})
    with pytest.raises(ValueError, match="flow-matching scheduler, got DDPMScheduler"):
        engine.fire("setup")
    assert DiffusionRoutine.name == "diffusion"
    assert digits_unet(num_classes=None).config.num_class_embeds is None


def test_resume_continues_the_private_noise_stream(run_dir: Path) -> None:
    """The routine's generator is checkpointed: a resumed run draws what an unbroken one draws."""
    def run(folder: Path, steps: int, resume: bool) -> list[float]:
        checkpoint = {"folder": str(run_dir / "ckpt"), "resume": "latest" if resume else None}
        engine = quiet_engine(folder, {"checkpoint": checkpoint}, max_steps=steps, eval_at_phase_end=False)
        engine.use("digits", batch_size=16)
        engine.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet",
                   model_options={"width": 8}, image_key=0, label_key=1, pixel_range=(0.0, 1.0),
                   seed=5, noise_offset=0.1, sample_at_phase_end=False)
        losses = record_losses(engine)
        engine.run()
        return losses

    run(run_dir / "first", 2, resume=False)
    resumed = run(run_dir / "second", 4, resume=True)
    (run_dir / "ckpt").rename(run_dir / "ckpt-old")
    unbroken = run(run_dir / "whole", 4, resume=False)
    assert resumed == unbroken[2:]


def test_components_from_the_model_loader_and_a_scheduler_folder(tiny_sd: Path, run_dir: Path) -> None:
    from diffusers import DDPMScheduler

    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("model_loader", models={"sd": str(tiny_sd)})
    routine = engine.use(DIFFUSION, name="diffusion", pipeline="sd", noise_scheduler=str(tiny_sd / "scheduler"),
                         prediction_type="v_prediction")
    engine.fire("setup")
    assert sorted(engine.state.models) == ["text_encoder", "unet", "vae"]  # the pipeline object gave way
    assert isinstance(routine.noise_scheduler, DDPMScheduler)
    assert routine.noise_scheduler.config.prediction_type == "v_prediction"
    assert routine.tokenizer is not None
    other = Engine(seed=0, run_dir=run_dir)
    other.use(DIFFUSION, name="diffusion", model="hookengine.demo.digit_scenes:digits_unet", noise_scheduler={"class": "Nope"})
    with pytest.raises(ValueError, match="'Nope' is not a diffusers noise scheduler class"):
        other.fire("setup")
