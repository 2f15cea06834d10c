"""Tiny models built from configs and saved locally: no hub, no network, a few seconds.

Each ``build_*`` function returns the objects; each ``save_*`` function writes them into a
folder with ``save_pretrained`` (safetensors) and returns the folder. The configurations are
the smallest that the libraries accept; weights are seeded, so two builds
with the same seed are equal.

torch is imported here (``TinyNet`` is an ``nn.Module``); diffusers and transformers are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TinyNet",
    "build_tiny_causal_lm",
    "build_tiny_clip_tokenizer",
    "build_tiny_gpt2_tokenizer",
    "build_tiny_mlp",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "save_tiny_causal_lm",
    "save_tiny_net",
    "save_tiny_sd_pipeline",
    "save_tiny_sdxl_pipeline",
]


# ------------------------------------------------------------------ tokenizers
def _byte_unicode_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 and CLIP use for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_tiny_clip_tokenizer() -> Any:
    """A byte-level ``CLIPTokenizer`` with 518 tokens (256 bytes, their ``</w>`` forms, 2 specials)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_unicode_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    # model_max_length matches the text encoder (pipelines pad and truncate to it).
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_gpt2_tokenizer() -> Any:
    """A byte-level ``GPT2Tokenizer`` with 257 tokens (256 bytes and ``<|endoftext|>``)."""
    from transformers import GPT2Tokenizer

    vocab = {token: index for index, token in enumerate(_byte_unicode_alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[])


# ------------------------------------------------------------ stable diffusion
def build_tiny_sd_pipeline(seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` with a tiny UNet, VAE, CLIP text encoder and tokenizer.

    About 570 KB of weights; no safety checker and no feature extractor.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=518,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            # The tokenizer's two special tokens (the defaults point outside this vocabulary).
            bos_token_id=516,
            eos_token_id=517,
            pad_token_id=517,
        )
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_clip_tokenizer(),
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny Stable Diffusion pipeline and save it (safetensors) into ``folder``."""
    folder = Path(folder)
    build_tiny_sd_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_clip_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    # The tokenizer's two special tokens (the defaults point outside this vocabulary).
    return CLIPTextConfig(vocab_size=518, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=516, eos_token_id=517, pad_token_id=517, **extra)


def build_tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """A ``StableDiffusionXLPipeline``: two tiny CLIP encoders (the second with projection),
    a tiny UNet with SDXL's ``text_time`` conditioning, the tiny VAE, DDPM."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids, then the pooled text (32)
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_tiny_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config()),
        tokenizer=build_tiny_clip_tokenizer(),
        tokenizer_2=build_tiny_clip_tokenizer(),
        unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        add_watermarker=False,
    )


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and save it (safetensors) into ``folder``."""
    folder = Path(folder)
    build_tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


# ------------------------------------------------------------------ causal LM
def build_tiny_causal_lm(seed: int = 0, architecture: str = "gpt2") -> tuple[Any, Any]:
    """A tiny causal LM (``"gpt2"`` or ``"llama"``) and a matching byte-level tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = build_tiny_gpt2_tokenizer()
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if architecture == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **special)
    elif architecture == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **special,
        )
    else:
        raise ValueError(f"architecture must be 'gpt2' or 'llama', got {architecture!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def save_tiny_causal_lm(folder: str | Path, seed: int = 0, architecture: str = "gpt2") -> Path:
    """Save a tiny causal LM and its tokenizer together into ``folder``."""
    folder = Path(folder)
    model, tokenizer = build_tiny_causal_lm(seed, architecture)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------- plain torch model
def build_tiny_mlp(width: int = 64, depth: int = 4, seed: int = 0) -> nn.Sequential:
    """An ``nn.Sequential`` of ``depth`` ``Linear(width, width)`` layers with ReLUs between.

    Each layer holds ``(width * width + width) * 4`` bytes in float32, so byte budgets
    in cache tests are easy to reason about.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index in range(depth):
        layers.append(nn.Linear(width, width))
        if index < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TinyNet(nn.Module):
    """A small MLP with its own ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors).

    Its ``config.json`` names no transformers architecture, so loaders must be told the class
    (``hookengine.testing.tiny_models:TinyNet``); that is what it is for.
    """

    config_name = "config.json"
    weights_name = "model.safetensors"

    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.config = {"width": width, "depth": depth}
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.config_name).write_text(json.dumps(self.config))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / self.weights_name))
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, subfolder: str | None = None, torch_dtype: Any = None, **_: Any
    ) -> "TinyNet":
        """Load from a folder written by :meth:`save_pretrained` (safetensors only)."""
        from safetensors.torch import load_file

        folder = Path(folder) / (subfolder or "")
        config = json.loads((folder / cls.config_name).read_text())
        model = cls(**config)
        model.load_state_dict(load_file(str(folder / cls.weights_name)))
        return model.to(torch_dtype) if torch_dtype is not None else model


def save_tiny_net(folder: str | Path, width: int = 16, depth: int = 2, seed: int = 0) -> Path:
    """Build a seeded :class:`TinyNet` and save it into ``folder``."""
    torch.manual_seed(seed)
    return TinyNet(width, depth).save_pretrained(folder)
