"""The diffusion routine: denoising losses with diffusers' schedulers, and samples.

Two kinds of model sets:

- a Stable-Diffusion-style set (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
  ``noise_scheduler``; SDXL-style adds ``text_encoder_2`` and ``tokenizer_2``), found in
  ``state.models`` by name or loaded from a pipeline folder; batches hold
  ``pixel_values`` (or precomputed ``latents``) and ``caption`` (text, tokenized and
  encoded here with the pipeline's own tokenizers and encoders, see
  :mod:`.captions`), ``input_ids`` or precomputed ``encoder_hidden_states``;
- a pixel-space ``UNet2DModel`` (class-conditional with ``num_class_embeds``, or not);
  batches hold ``pixel_values`` and maybe ``class_labels``; no VAE.

The loss follows diffusers' training scripts step by step (``train_text_to_image_lora.py``
for epsilon / v-prediction with min-SNR and noise offset; ``train_dreambooth_lora_sd3.py``
for flow matching), so with the same random draws it is the same number. Draws come from
a private ``torch.Generator`` when ``seed`` is given (checkpointed with the routine), else
from torch's global RNG as in the scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from ..core.points import BASE_PRIORITY, Point
from .base import Routine, built_by, samples_path
from .captions import TextEncoders, prepare_captions, tokenizer_identity
from .latent_caching import SAMPLE_ID, CachedLatents, latent_row_keys

__all__ = ["DiffusionRoutine", "image_grid", "save_image_grid", "samples_path"]

logger = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction", "flow_matching"]
# Our names for the timestep densities of diffusers' ``compute_density_for_timestep_sampling``.
_DENSITY = {"uniform": "none", "logit_normal": "logit_normal", "mode": "mode"}


class DiffusionRoutine(Routine):
    """Train a denoiser: noise prediction (epsilon), v-prediction or flow matching.

    Captions go through two slots a user may wrap: ``prepare_captions(captions, train)``
    (dropout and shuffling; e.g. add a trigger word) and ``encode_captions(captions)``
    (tokenize and encode; e.g. embeddings from elsewhere).

    Args:
        unet, vae, text_encoder, tokenizer: names of the components in ``state.models``.
        text_encoder_2, tokenizer_2: the second pair of an SDXL-style pipeline.
        noise_scheduler: name in ``state.models``, a folder with ``scheduler_config.json``,
            or a mapping ``{"class": "DDPMScheduler", **config}``; default: the pipeline's
            scheduler, else ``DDPMScheduler()`` (``FlowMatchEulerDiscreteScheduler()`` for
            flow matching).
        pipeline: a pipeline folder (``DiffusionPipeline.from_pretrained``, safetensors
            only) or the name of a pipeline in ``state.models``; its modules are
            registered in ``state.models`` under the names above.
        model, model_options: ``module:attr`` factory of the denoiser (with its keyword
            arguments) when no ``unet`` is in ``state.models`` (e.g. the demo's ``hookengine.demo.digit_scenes:digits_unet``).
        prediction_type: what the model predicts; default: the scheduler's
            ``prediction_type`` (flow matching for flow-matching schedulers).
        snr_gamma: min-SNR loss weighting (epsilon and v-prediction).
        noise_offset: scale of the per-channel offset noise.
        timestep_sampling: ``uniform``, ``logit_normal`` or ``mode`` (diffusers'
            ``compute_density_for_timestep_sampling``), with ``logit_mean``,
            ``logit_std`` and ``mode_scale``.
        loss_weighting: flow matching's ``compute_loss_weighting_for_sd3`` scheme.
        precondition_outputs: flow matching: train on ``x0 = noisy - sigma * pred``.
        train_text_encoder: leave the text encoder trainable (frozen by default).
        image_key, label_key, latents_key: where images, class labels and precomputed
            (already scaled) latents are in a batch (dict keys or tuple positions).
        caption_key: where the captions (a list of str) are in a batch; they are
            tokenized and encoded when the batch has no ``input_ids`` or
            ``encoder_hidden_states``.
        caption_dropout: probability that a training caption becomes the empty prompt
            (its embedding is computed once while the text encoders are frozen).
        shuffle_caption, keep_tokens, caption_separator: kohya's tag shuffling: split a
            caption on ``caption_separator``, keep the first ``keep_tokens`` tags in
            place, shuffle the others. Dropout and shuffles are drawn from
            ``(seed, batch, process, position)``, so a resumed run sees the same captions.
        cache_text_embeddings: remember each caption's embedding while the text encoders
            are frozen: ``true`` or ``memory`` in memory, ``disk`` in safetensors files
            under ``cache_dir``, keyed by the caption and the encoders' and tokenizers'
            content digest (another run with the same encoders reads them back).
        cache_latents: keep the VAE's latent distribution of every training image in
            safetensors files under ``cache_dir``, so the VAE encodes each image once.
            Each step still draws ``latent_dist.sample()`` from the cached mean and
            variance with the routine's generator (what diffusers' scripts do with
            ``--cache_latents``), so losses and resume are the same as without the
            cache, bitwise. Keys: the image file (path, size, modification time; or the
            pixels' digest when the batch does not come from files), the transform
            (bucket, crop, flip, original size, tensor shape, ``pixel_range``) and the
            VAE's content digest; a random crop or flip keeps one entry per variant. A
            transform of your own that the key does not see (e.g. colour jitter in
            ``transform_sample``) must not be combined with it.
        cache_dir: the folder of both caches (default ``RUN_DIR/cache``); share it
            between runs to reuse what an earlier run encoded.
        pixel_range: the range of the images in batches (mapped to [-1, 1]).
        seed: a private generator for noise and timesteps, ``seed + process index``
            (``None``: torch's global RNG, as the diffusers scripts).
        val_seed: seed of the evaluation draws (each evaluation sees the same noise).
        sample_every: write a sample grid every N optimizer steps (0: never).
        sample_at_phase_end: also write one when a phase of this routine ends.
        sample_prompts: prompts of the samples (text-conditioned models).
        sample_labels: class labels of the samples (default: every class).
        sample_steps: inference steps; sample_seed: the samples' generator seed.
        sample_options: more keyword arguments for the pipeline call.
        sample_size: ``(height, width)`` (or one side) of the samples; default: the
            size of the last training batch (the training resolution or bucket), else
            the model's default.
    """

    name = "diffusion"
    hook_points = [
        Point("prepare_captions", "slot", ("captions", "train"),
              "The captions a batch is conditioned on (training: caption dropout, tag shuffling).", "diffusion"),
        Point("encode_captions", "slot", ("captions",),
              "Captions -> text embeddings (.hidden, .pooled) with the pipeline's tokenizers and encoders.", "diffusion"),
    ]

    def __init__(
        self,
        unet: str = "unet",
        vae: str = "vae",
        text_encoder: str = "text_encoder",
        tokenizer: str = "tokenizer",
        text_encoder_2: str = "text_encoder_2",
        tokenizer_2: str = "tokenizer_2",
        noise_scheduler: str | dict[str, Any] = "noise_scheduler",
        pipeline: str | None = None,
        model: str | None = None,
        model_options: dict[str, Any] | None = None,
        prediction_type: PredictionType | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none",
        precondition_outputs: bool = False,
        train_text_encoder: bool = False,
        image_key: str | int = "pixel_values",
        label_key: str | int = "class_labels",
        latents_key: str | int = "latents",
        caption_key: str | int = "caption",
        caption_dropout: float = 0.0,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_separator: str = ",",
        cache_text_embeddings: bool | Literal["memory", "disk"] = False,
        cache_latents: bool = False,
        cache_dir: str | None = None,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
        seed: int | None = None,
        val_seed: int = 0,
        sample_every: int = 0,
        sample_at_phase_end: bool = True,
        sample_prompts: list[str] | None = None,
        sample_labels: list[int] | None = None,
        sample_steps: int = 20,
        sample_seed: int = 0,
        sample_options: dict[str, Any] | None = None,
        sample_size: int | tuple[int, int] | None = None,
    ) -> None:
        if snr_gamma is not None and prediction_type == "flow_matching":
            raise ValueError("diffusion.snr_gamma is min-SNR weighting for epsilon/v-prediction; flow matching uses loss_weighting")
        if pixel_range[0] >= pixel_range[1]:
            raise ValueError(f"diffusion.pixel_range must be (low, high) with low < high, got {pixel_range}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"diffusion.caption_dropout is a probability in [0, 1], got {caption_dropout}")
        if keep_tokens < 0:
            raise ValueError(f"diffusion.keep_tokens must be >= 0, got {keep_tokens}")
        self.names = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                      "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
        self.scheduler_option = noise_scheduler
        self.pipeline_option = pipeline
        self.model_ref, self.model_options = model, dict(model_options or {})
        self.prediction_option = prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.timestep_sampling = timestep_sampling
        self.density = {"logit_mean": logit_mean, "logit_std": logit_std, "mode_scale": mode_scale}
        self.loss_weighting = loss_weighting
        self.precondition_outputs = precondition_outputs
        self.train_text_encoder = train_text_encoder
        self.keys = {"image": image_key, "label": label_key, "latents": latents_key, "caption": caption_key}
        self.caption_options = {"dropout": caption_dropout, "shuffle": shuffle_caption, "keep_tokens": keep_tokens,
                                "separator": caption_separator}
        self.cache_text_embeddings = cache_text_embeddings
        self.cache_latents, self.cache_dir = cache_latents, cache_dir
        self.latent_cache: CachedLatents | None = None
        self.store: Any = None  # the on-disk LatentCache of both caches, made at build
        self._vae_key: tuple[int, str] | None = None  # (id of the VAE, its content digest)
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        self.sample_size = tuple(sample_size) if sample_size is not None else None
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1]))
        self.seed, self.val_seed = seed, val_seed
        self.sample_every = sample_every
        self.sample_at_phase_end = sample_at_phase_end
        self.sample_prompts = list(sample_prompts or [])
        self.sample_labels = sample_labels
        self.sample_steps = sample_steps
        self.sample_seed = sample_seed
        self.sample_options = dict(sample_options or {})
        self.pipeline: Any = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self.text_encoders: TextEncoders | None = None
        self.last_size: tuple[int, int] | None = None  # (height, width) of the last training batch
        self.noise_scheduler: Any = None
        self.generator: Any = None
        self._eval_generator: Any = None
        self._last_sampled: int | None = None

    # ------------------------------------------------------------------ wiring
    def setup(self, engine: Any) -> None:
        super().setup(engine)
        # Each evaluation draws the same noise: val losses are comparable over time.
        engine.attach("evaluate", self._fresh_eval_draws)
        engine.attach("prepare_captions", self._prepare_captions_slot, priority=BASE_PRIORITY)
        engine.attach("encode_captions", self._encode_captions_slot, priority=BASE_PRIORITY)
        engine.on("epoch_start", self._frozen_to_eval)
        if self.cache_latents:
            # Each sample's file identity travels with it into the batch (the cache key).
            engine.attach("decode_sample", self._record_sample_id)
            engine.on("epoch_end", self._check_reuse)
        if self.sample_every > 0:
            engine.on("step_end", self._sample_listener, every=self.sample_every)
        if self.sample_at_phase_end:
            engine.on("phase_end", self._sample_listener)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state and self.generator is not None:
            self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------- build
    def build(self, state: Any) -> None:
        import torch

        self.device = self.engine.runtime.device
        if self.pipeline_option is not None:
            self._adopt_pipeline(state, self.pipeline_option)
        if self.names["unet"] not in state.models:
            state.models[self.names["unet"]] = self._build_denoiser()
        for role in ("tokenizer", "tokenizer_2"):
            if self.names[role] in state.models:
                # Not an nn.Module either (checkpoints call state_dict on every model).
                setattr(self, role, state.models.pop(self.names[role]))
        self.noise_scheduler = self._make_scheduler(state)
        self.prediction_type = self._resolve_prediction_type()
        vae = self._component("vae")
        if vae is not None:
            vae.requires_grad_(False)
        for role in ("text_encoder", "text_encoder_2"):
            text_encoder = self._component(role)
            if text_encoder is not None:
                text_encoder.requires_grad_(self.train_text_encoder)
        if self.cache_latents or self.cache_text_embeddings == "disk":
            self._open_store(state)
        if self.seed is not None:
            # One stream per process: ranks must not draw the same noise for different images.
            seed = self.seed + self.engine.runtime.process_index
            self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _open_store(self, state: Any) -> None:
        from ..data.latent_cache import LatentCache

        folder = self.cache_dir or (Path(state.run_dir) / "cache" if state.run_dir else None)
        if folder is None:
            raise ValueError("diffusion.cache_latents / cache_text_embeddings=disk need diffusion.cache_dir (or a run_dir)")
        self.store = LatentCache(folder)
        if self.cache_latents:
            self.latent_cache = CachedLatents(self.store)

    def _check_reuse(self, state: Any) -> None:
        """After a later epoch that reused no cached latent, say why the cache is not paying."""
        cache = self.latent_cache
        if cache is None:
            return
        hits, misses = cache.hits - cache.epoch_start[0], cache.misses - cache.epoch_start[1]
        cache.epoch_start = (cache.hits, cache.misses)
        if state.clock.epoch >= 2 and misses and not hits and not cache.warned:
            cache.warned = True
            logger.warning(
                "diffusion.cache_latents: epoch %d reused no cached latent (%d new entries): every sample came "
                "with a new crop, flip or file (e.g. bucketing.random_crop draws a crop per epoch, and each "
                "variant is its own entry); set bucketing.random_crop: false or diffusion.cache_latents: false",
                state.clock.epoch - 1, misses,
            )

    def _record_sample_id(self, next_impl: Any, sample: dict[str, Any]) -> Any:
        """Put the identity of the sample's image file (read before decoding) in the sample."""
        from ..data.latent_cache import source_identity

        column = self.keys["image"] if isinstance(self.keys["image"], str) and self.keys["image"] in sample else "image"
        source = sample.get(column)
        identity = source_identity(source) if source is not None else None
        sample = next_impl(sample)
        if identity is not None and isinstance(sample, dict):
            sample[SAMPLE_ID] = identity
        return sample

    def _adopt_pipeline(self, state: Any, option: str) -> None:
        """Take a pipeline's modules into ``state.models``; keep tokenizer and scheduler here."""
        if option in state.models:
            # A pipeline is not an nn.Module (no state_dict): its modules replace it.
            pipeline = state.models.pop(option)
        else:
            pipeline = self._load_pipeline(option)
        self.pipeline = pipeline
        components = getattr(pipeline, "components", {})
        for role in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = components.get(role)
            if module is not None and self.names[role] not in state.models:
                state.models[self.names[role]] = module
        self.tokenizer = components.get("tokenizer")
        self.tokenizer_2 = components.get("tokenizer_2")

    @staticmethod
    def _load_pipeline(path: str) -> Any:
        from diffusers import DiffusionPipeline

        if not Path(path).is_dir():
            raise FileNotFoundError(f"diffusion.pipeline: {path!r} is neither a folder nor a model in state.models")
        return DiffusionPipeline.from_pretrained(path, use_safetensors=True)

    def _build_denoiser(self) -> Any:
        from ..core.plugins import resolve

        if self.model_ref is None:
            raise ValueError(
                f"diffusion: no model {self.names['unet']!r} in state.models; give pipeline=, "
                "model= (a module:attr factory) or load one with model_loader"
            )
        denoiser = resolve(self.model_ref, "model", "diffusion.model")(**self.model_options)
        return built_by(denoiser, self.model_ref, self.model_options)

    def _make_scheduler(self, state: Any) -> Any:
        """The training noise scheduler from the option, the pipeline, or a default."""
        import diffusers

        option = self.scheduler_option
        if isinstance(option, dict):
            config = dict(option)
            return _scheduler_class(config.pop("class", "DDPMScheduler"), "diffusion.noise_scheduler.class")(**config)
        if option in state.models:
            # A scheduler is not an nn.Module (no state_dict for checkpoints): take it out.
            return state.models.pop(option)
        config_file = Path(option) / "scheduler_config.json"
        if config_file.is_file():
            name = json.loads(config_file.read_text()).get("_class_name", "DDPMScheduler")
            return _scheduler_class(name, str(config_file)).from_pretrained(option)
        if self.pipeline is not None and getattr(self.pipeline, "scheduler", None) is not None:
            return self.pipeline.scheduler
        if self.prediction_option == "flow_matching":
            return diffusers.FlowMatchEulerDiscreteScheduler()
        return diffusers.DDPMScheduler()

    def _resolve_prediction_type(self) -> str:
        config = self.noise_scheduler.config
        flow = "FlowMatch" in type(self.noise_scheduler).__name__
        prediction = self.prediction_option or ("flow_matching" if flow else config.get("prediction_type", "epsilon"))
        if prediction == "flow_matching" and not flow:
            raise ValueError(
                f"diffusion.prediction_type=flow_matching needs a flow-matching scheduler, got {type(self.noise_scheduler).__name__}"
            )
        if prediction == "flow_matching" and self.snr_gamma is not None:
            raise ValueError("diffusion.snr_gamma is min-SNR weighting for epsilon/v-prediction; flow matching uses loss_weighting")
        if prediction != "flow_matching":
            if flow:
                raise ValueError(f"diffusion.prediction_type={prediction!r} does not fit {type(self.noise_scheduler).__name__}")
            if prediction not in ("epsilon", "v_prediction"):
                raise ValueError(f"diffusion: unsupported prediction_type {prediction!r}; use epsilon, v_prediction or flow_matching")
            # As the scripts do: samplers made from this config then predict the same thing.
            self.noise_scheduler.register_to_config(prediction_type=prediction)
        return prediction

    def _component(self, role: str) -> Any:
        return self.engine.state.models.get(self.names[role])

    def _frozen_to_eval(self, state: Any) -> None:
        # The loop puts every model in train mode; frozen encoders stay in eval mode.
        for role in ("vae", "text_encoder", "text_encoder_2"):
            module = self._component(role)
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                module.eval()

    # -------------------------------------------------------------------- loss
    def loss(self, batch: Any) -> Any:
        return self.denoising_loss(batch, self.generator, train=True)

    def metrics(self, batch: Any) -> dict[str, float]:
        import torch

        if self._eval_generator is None:
            self._eval_generator = torch.Generator(device=self.device).manual_seed(self.val_seed)
        return {"val_loss": float(self.denoising_loss(batch, self._eval_generator))}

    def _fresh_eval_draws(self, next_impl: Any, *args: Any, **kwargs: Any) -> Any:
        self._eval_generator = None
        return next_impl(*args, **kwargs)

    def denoising_loss(self, batch: Any, generator: Any = None, train: bool = False) -> Any:
        """The loss of one batch, drawing noise and timesteps from ``generator``
        (``train``: apply caption dropout and shuffling, remember the batch's size)."""
        clean = self.clean_input(batch, generator)
        if train:
            self.last_size = self._pixel_size(clean)
        noise = self.draw_noise(clean, generator)
        if self.prediction_type == "flow_matching":
            return self._flow_loss(batch, clean, noise, generator, train)
        timesteps = self.draw_timesteps(clean.shape[0], clean.device, generator)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        conditioning = self.conditioning(batch, train, clean)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(clean, noise, timesteps)
        prediction = self.predict(noisy, timesteps, conditioning)
        return self._weighted_mse(prediction, target, timesteps)

    def _flow_loss(self, batch: Any, clean: Any, noise: Any, generator: Any, train: bool = False) -> Any:
        import torch
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        timesteps, sigmas = self.draw_flow_timesteps(clean, generator)
        noisy = (1.0 - sigmas) * clean + sigmas * noise
        prediction = self.predict(noisy, timesteps, self.conditioning(batch, train, clean))
        if self.precondition_outputs:
            prediction = prediction * (-sigmas) + noisy
            target = clean
        else:
            target = noise - clean
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.loss_weighting, sigmas=sigmas)
        per_sample = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        return per_sample.mean()

    def _weighted_mse(self, prediction: Any, target: Any, timesteps: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float(), reduction="mean")
        from diffusers.training_utils import compute_snr

        # Min-SNR (arXiv 2303.09556, section 4.2 for epsilon; +1 for the velocity objective).
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()

    # ------------------------------------------------------------- the pieces
    def clean_input(self, batch: Any, generator: Any = None) -> Any:
        """What gets noised: VAE latents (scaled) or pixels in [-1, 1]."""
        import torch

        latents = _get(batch, self.keys["latents"])
        if latents is not None:
            return latents.to(self.device)
        pixels = _get(batch, self.keys["image"])
        if pixels is None:
            raise KeyError(f"diffusion: the batch has neither {self.keys['image']!r} nor {self.keys['latents']!r}")
        vae = self._component("vae")
        if vae is None:
            return self._to_unit_range(pixels.to(self.device).float())
        if self.latent_cache is not None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            parameters = self._cached_parameters(batch, pixels, vae)
            latents = DiagonalGaussianDistribution(parameters).sample(generator=generator)
        else:
            pixels = self._to_unit_range(pixels.to(self.device).float())
            with torch.no_grad():
                latents = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor if shift else latents * vae.config.scaling_factor

    def _cached_parameters(self, batch: Any, pixels: Any, vae: Any) -> Any:
        """The batch's latent distribution parameters, from the cache or the VAE (misses only)."""
        import torch

        if any(p.requires_grad for p in vae.parameters()):
            raise ValueError(
                f"diffusion.cache_latents: the VAE {self.names['vae']!r} is being trained, so cached latents "
                "would go stale; set cache_latents: false"
            )
        keys = latent_row_keys(batch, pixels, self._vae_digest(vae), self.pixel_range)

        def encode() -> Any:  # exactly what the uncached path runs
            unit = self._to_unit_range(pixels.to(self.device).float())
            with torch.no_grad():
                return vae.encode(unit.to(dtype=vae.dtype)).latent_dist.parameters

        assert self.latent_cache is not None
        return self.latent_cache.parameters(keys, encode, self.device)

    def _vae_digest(self, vae: Any) -> str:
        """The VAE's content digest (weights, config, dtype), computed once per VAE object."""
        from ..data.latent_cache import module_digest

        module = self.engine.runtime.unwrap(vae)
        if self._vae_key is None or self._vae_key[0] != id(module):
            self._vae_key = (id(module), module_digest(module, str(getattr(module, "dtype", ""))))
        return self._vae_key[1]

    def _to_unit_range(self, pixels: Any) -> Any:
        low, high = self.pixel_range
        if (low, high) == (-1.0, 1.0):
            return pixels
        return (pixels - low) / (high - low) * 2.0 - 1.0

    def draw_noise(self, clean: Any, generator: Any = None) -> Any:
        """Gaussian noise like ``clean``, plus the per-channel offset noise when asked.

        Drawn as diffusers' training scripts do: ``randn_like(latents)`` (it keeps the
        latents' strides, e.g. a VAE's channels-last output, which changes the values
        drawn), then the offset noise added in place, before the timesteps.
        """
        import torch

        if generator is None:
            noise = torch.randn_like(clean)
        else:  # randn_like's own draw (empty_like + normal_), from the private generator
            noise = torch.empty_like(clean).normal_(generator=generator)
        if self.noise_offset:
            offset = torch.randn((clean.shape[0], clean.shape[1], 1, 1), generator=generator, device=clean.device)
            noise += self.noise_offset * offset
        return noise

    def _density(self, batch_size: int, generator: Any) -> Any:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device = generator.device if generator is not None else "cpu"
        return compute_density_for_timestep_sampling(
            weighting_scheme=_DENSITY[self.timestep_sampling],
            batch_size=batch_size,
            device=device,
            generator=generator,
            **self.density,
        )

    def draw_timesteps(self, batch_size: int, device: Any, generator: Any = None) -> Any:
        """Integer timesteps of a DDPM-style scheduler, one per sample."""
        import torch

        count = self.noise_scheduler.config.num_train_timesteps
        if self.timestep_sampling == "uniform":
            return torch.randint(0, count, (batch_size,), device=device, generator=generator).long()
        u = self._density(batch_size, generator)
        return (u * count).long().clamp(max=count - 1).to(device)

    def draw_flow_timesteps(self, clean: Any, generator: Any = None) -> tuple[Any, Any]:
        """Flow-matching timesteps and their sigmas (shaped to broadcast over ``clean``)."""
        scheduler = self.noise_scheduler
        u = self._density(clean.shape[0], generator)
        indices = (u * scheduler.config.num_train_timesteps).long().cpu()
        timesteps = scheduler.timesteps[indices].to(clean.device)
        sigmas = scheduler.sigmas[indices].to(device=clean.device, dtype=clean.dtype)
        return timesteps, sigmas.reshape(-1, *([1] * (clean.ndim - 1)))

    def conditioning(self, batch: Any, train: bool = False, clean: Any = None) -> dict[str, Any]:
        """Keyword arguments for the denoiser: text embeddings and/or class labels.

        Text comes from precomputed ``encoder_hidden_states``, else ``input_ids`` (encoded
        with the text encoder), else captions (tokenized and encoded here; in training
        with caption dropout and shuffling). An SDXL-style UNet also gets
        ``added_cond_kwargs`` (pooled text embeddings and the size/crop ``time_ids``).
        """
        import torch

        conditioning: dict[str, Any] = {}
        hidden = _get(batch, "encoder_hidden_states")
        pooled = _get(batch, "pooled_prompt_embeds")
        input_ids = _get(batch, "input_ids")
        captions = _get(batch, self.keys["caption"])
        if hidden is None and input_ids is not None:
            text_encoder = self._component("text_encoder")
            if text_encoder is None:
                raise KeyError(f"diffusion: batches have input_ids but there is no {self.names['text_encoder']!r} model")
            frozen = not self.train_text_encoder
            with torch.no_grad() if frozen else contextlib.nullcontext():
                hidden = text_encoder(input_ids.to(self.device), return_dict=False)[0]
        elif hidden is None and captions is not None:
            if isinstance(captions, str):
                captions = [captions]
            captions = self.engine.call("prepare_captions", [("" if c is None else str(c)) for c in captions], train)
            embeddings = self.engine.call("encode_captions", captions)
            hidden, pooled = embeddings.hidden, embeddings.pooled
        if hidden is None and self._takes_text():
            raise KeyError(
                f"diffusion: the batch has no {self.keys['caption']!r}, 'input_ids' or 'encoder_hidden_states' "
                f"(keys: {_keys(batch)}); set dataset.caption_column or add .txt caption files"
            )
        if hidden is not None:
            conditioning["encoder_hidden_states"] = hidden.to(self.device)
        if self._takes_text_time():
            if pooled is None:
                raise KeyError(
                    "diffusion: this UNet (addition_embed_type='text_time', SDXL-style) needs pooled text embeddings: "
                    f"give captions ({self.keys['caption']!r}) or 'pooled_prompt_embeds' with 'encoder_hidden_states' "
                    f"(keys: {_keys(batch)})"
                )
            conditioning["added_cond_kwargs"] = {
                "text_embeds": pooled.to(self.device),
                "time_ids": self.time_ids(batch, clean).to(self.device, dtype=pooled.dtype),
            }
        labels = _get(batch, self.keys["label"])
        if labels is not None and self._takes_class_labels():
            conditioning["class_labels"] = labels.to(self.device)
        return conditioning

    def _prepare_captions_slot(self, next_impl: Any, captions: list[str], train: bool) -> list[str]:
        if not self.active():
            return next_impl(captions, train)
        return self.prepare_captions(captions) if train else captions

    def _encode_captions_slot(self, next_impl: Any, captions: list[str]) -> Any:
        return self.encode_captions(captions) if self.active() else next_impl(captions)

    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Training captions: dropout and kohya's shuffle, from (seed, batch, rank, position)."""
        return prepare_captions(
            captions, seed=self._caption_seed(), step=self.engine.state.clock.micro_step,
            rank=self.engine.runtime.process_index, **self.caption_options,
        )

    def encode_captions(self, captions: list[str]) -> Any:
        """Embeddings of ``captions`` with the pipeline's tokenizer(s) and text encoder(s)."""
        encoders = [self._component(role) for role in ("text_encoder", "text_encoder_2")]
        tokenizers = [self.tokenizer, self.tokenizer_2]
        pairs = [(t, e) for t, e in zip(tokenizers, encoders) if t is not None and e is not None]
        if not pairs:
            raise KeyError(
                f"diffusion: the batch has captions ({self.keys['caption']!r}) but no tokenizer and text encoder "
                f"({self.names['tokenizer']!r}, {self.names['text_encoder']!r}); give pipeline= or load them"
            )
        frozen = not self.train_text_encoder and not any(
            p.requires_grad for _, e in pairs for p in e.parameters()
        )
        text = self.text_encoders
        if text is None or len(text.encoders) != len(pairs) or text.frozen != frozen:
            disk = self.cache_text_embeddings == "disk" and frozen
            text = self.text_encoders = TextEncoders(
                [t for t, _ in pairs], [e for _, e in pairs], self.device, frozen=frozen,
                cache=bool(self.cache_text_embeddings), store=self.store if disk else None,
                encoder_key=self._text_digest(pairs) if disk else "",
            )
        text.encoders = [e for _, e in pairs]  # the current modules (they may have been re-wrapped)
        return text.encode(captions)

    def _text_digest(self, pairs: list[tuple[Any, Any]]) -> str:
        """The content digest of the (tokenizer, text encoder) pairs: weights and vocabularies."""
        from ..data.latent_cache import module_digest

        unwrap = self.engine.runtime.unwrap
        return ":".join(module_digest(unwrap(e), tokenizer_identity(t)) for t, e in pairs)

    def _caption_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(getattr(self.engine.runtime, "seed", 0) or 0)

    def _vae_scale(self) -> int:
        vae = self._component("vae")
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def _pixel_size(self, clean: Any) -> tuple[int, int]:
        """(height, width) in pixels of what ``clean_input`` returned."""
        scale = self._vae_scale()
        return int(clean.shape[-2]) * scale, int(clean.shape[-1]) * scale

    def time_ids(self, batch: Any, clean: Any = None) -> Any:
        """SDXL's ``time_ids``: original size, crop top-left and target size, ``(h, w)`` each.

        From the batch's ``original_size_hw``, ``crop_top_left`` and ``target_size_hw``
        (the bucketing plugin writes them) when there, else the batch's own size, no crop.
        """
        import torch

        height, width = self._pixel_size(clean) if clean is not None else (self.last_size or (0, 0))
        count = clean.shape[0] if clean is not None else 1
        default = torch.tensor([[height, width]] * count)
        parts = []
        for key, fallback in (("original_size_hw", default), ("crop_top_left", torch.zeros_like(default)),
                              ("target_size_hw", default)):
            value = _get(batch, key)
            parts.append(torch.as_tensor(value).reshape(count, 2) if value is not None else fallback)
        return torch.cat(parts, dim=1).float()

    def _unet_config(self) -> Any:
        unet = self.engine.runtime.unwrap(self._component("unet"))
        return getattr(unet, "config", {})

    def _takes_text(self) -> bool:
        return self._unet_config().get("cross_attention_dim") is not None

    def _takes_text_time(self) -> bool:
        return self._unet_config().get("addition_embed_type") == "text_time"

    def _takes_class_labels(self) -> bool:
        unet = self.engine.runtime.unwrap(self._component("unet"))
        config = getattr(unet, "config", {})
        return bool(config.get("num_class_embeds") or config.get("class_embed_type"))

    def predict(self, noisy: Any, timesteps: Any, conditioning: dict[str, Any]) -> Any:
        """The denoiser's output for a noisy batch."""
        return self._component("unet")(noisy, timesteps, **conditioning, return_dict=False)[0]

    # ----------------------------------------------------------------- samples
    def sample(
        self,
        labels: list[int] | None = None,
        prompts: list[str] | None = None,
        steps: int | None = None,
        seed: int | None = None,
    ) -> Any:
        """Generate images (a float tensor ``N, C, H, W`` in [0, 1]) with the current model.

        A text-conditioned set goes through its diffusers pipeline with ``prompts``; a
        pixel-space UNet runs a DDIM (or flow-matching Euler) loop over class ``labels``.
        """
        import torch

        from ..core.state import capture_rng, restore_rng

        steps = steps or self.sample_steps
        generator = torch.Generator(device=self.device).manual_seed(self.sample_seed if seed is None else seed)
        models = [m for m in self.engine.state.models.values() if hasattr(m, "eval")]
        modes = [m.training for m in models]
        rng = capture_rng()  # sampling must not shift the training RNG stream
        try:
            for m in models:
                m.eval()
            with torch.no_grad():
                if self._component("vae") is not None:
                    return self._sample_pipeline(prompts or self.sample_prompts or [""], steps, generator)
                return self._sample_pixels(labels, steps, generator)
        finally:
            restore_rng(rng)
            for m, mode in zip(models, modes):
                m.train(mode)

    def _sample_hw(self) -> tuple[int, int] | None:
        """The samples' (height, width): the option, else the last training batch's size."""
        return self.sample_size or self.last_size  # type: ignore[return-value]

    def _sample_pipeline(self, prompts: list[str], steps: int, generator: Any) -> Any:
        pipeline = self._inference_pipeline()
        size = self._sample_hw()
        options = {"height": size[0], "width": size[1]} if size else {}
        options.update(self.sample_options)
        out = pipeline(prompts, num_inference_steps=steps, generator=generator, output_type="pt", **options)
        return out.images.float().cpu()

    def _inference_pipeline(self) -> Any:
        """A pipeline over the current (unwrapped) modules."""
        unwrap = self.engine.runtime.unwrap
        modules = {role: unwrap(self._component(role)) for role in ("unet", "vae", "text_encoder")}
        if self._component("text_encoder_2") is not None:
            modules["text_encoder_2"] = unwrap(self._component("text_encoder_2"))
        if self.pipeline is not None:
            pipeline = type(self.pipeline)(**{**self.pipeline.components, **modules})
        else:
            from diffusers import StableDiffusionPipeline

            if self.tokenizer is None:
                raise ValueError(f"diffusion: sampling from prompts needs a tokenizer ({self.names['tokenizer']!r})")
            pipeline = StableDiffusionPipeline(
                **modules, tokenizer=self.tokenizer, scheduler=self.noise_scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample_pixels(self, labels: list[int] | None, steps: int, generator: Any) -> Any:
        import torch

        unet = self.engine.runtime.unwrap(self._component("unet"))
        config = unet.config
        classes = config.get("num_class_embeds")
        if labels is None:
            labels = self.sample_labels if self.sample_labels is not None else list(range(classes or 8))
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        size = self._sample_hw() or size
        scheduler = self._inference_scheduler(steps)
        x = torch.randn((len(labels), config.in_channels, *size), generator=generator, device=self.device)
        x = x * scheduler.init_noise_sigma
        extra = {"class_labels": torch.tensor(labels, device=self.device)} if classes else {}
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            output = unet(model_input, t.to(self.device), **extra, return_dict=False)[0]
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)

    def _inference_scheduler(self, steps: int) -> Any:
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        cls = FlowMatchEulerDiscreteScheduler if self.prediction_type == "flow_matching" else DDIMScheduler
        scheduler = cls.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def write_samples(self, state: Any) -> Path:
        """Sample and write a grid to ``RUN_DIR/samples/step-XXXX.png``; returns the path."""
        path = samples_path(state, "png")
        save_image_grid(self.sample(), path)
        self.engine.fire("samples_written", path=path)
        return path


# ----------------------------------------------------------------------- helpers
def _scheduler_class(name: str, where: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "add_noise") and not hasattr(cls, "scale_noise"):
        raise ValueError(f"{where}: {name!r} is not a diffusers noise scheduler class (e.g. DDPMScheduler)")
    return cls


def _keys(batch: Any) -> str:
    """The keys of a batch, for error messages."""
    if hasattr(batch, "keys"):
        return ", ".join(str(k) for k in batch.keys())
    return f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (list, tuple)) else type(batch).__name__


def _get(batch: Any, key: str | int) -> Any:
    """``batch[key]`` for dict batches and tuple batches; ``None`` when it is not there."""
    if isinstance(key, int):
        return batch[key] if isinstance(batch, (list, tuple)) and -len(batch) <= key < len(batch) else None
    if hasattr(batch, "get"):
        return batch.get(key)
    return None


def image_grid(images: Any, columns: int | None = None, min_tile: int = 64) -> Any:
    """A PIL image of ``images`` (``N, C, H, W`` floats in [0, 1]) in a grid.

    Tiny images are enlarged (nearest neighbour) so each tile is at least ``min_tile`` pixels.
    """
    import math

    import numpy as np
    from PIL import Image

    n, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(min_tile / max(height, width)))
    array = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = array[i].transpose(1, 2, 0)
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_image_grid(images: Any, path: str | Path, columns: int | None = None) -> Path:
    """Write :func:`image_grid` as a PNG (to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image_grid(images, columns).save(partial, format="PNG")
    partial.replace(path)
    return path
