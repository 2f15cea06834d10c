"""Helpers for tests, demos and benchmarks: tiny models built from configs, offline.

Everything heavy is imported inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from .tiny_models import (
    TinyNet,
    build_tiny_causal_lm,
    build_tiny_clip_tokenizer,
    build_tiny_gpt2_tokenizer,
    build_tiny_mlp,
    build_tiny_sd_pipeline,
    save_tiny_causal_lm,
    save_tiny_net,
    save_tiny_sd_pipeline,
)

__all__ = [
    "TinyNet",
    "build_tiny_causal_lm",
    "build_tiny_clip_tokenizer",
    "build_tiny_gpt2_tokenizer",
    "build_tiny_mlp",
    "build_tiny_sd_pipeline",
    "save_tiny_causal_lm",
    "save_tiny_net",
    "save_tiny_sd_pipeline",
]
