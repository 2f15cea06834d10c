"""Tiny models built once per session and saved into a session folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler)."""
    from hookengine.testing import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny GPT-2 causal LM with its tokenizer in the same folder."""
    from hookengine.testing import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-lm")


@pytest.fixture(scope="session")
def tiny_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved TinyNet (a class that only ``module:Class`` can find)."""
    from hookengine.testing import save_tiny_net

    return save_tiny_net(tmp_path_factory.mktemp("models") / "tiny-net")
