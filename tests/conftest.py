"""Test settings: nothing reaches the network, nothing writes outside a test folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports transformers, datasets, keras or torch's inductor.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_scratch = Path(tempfile.mkdtemp(prefix="hookengine-tests-"))
os.environ.setdefault("KERAS_HOME", str(_scratch / "keras"))
os.environ.setdefault("HF_HOME", str(_scratch / "hf"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run folder for one test."""
    path = tmp_path / "run"
    path.mkdir()
    return path


# Tiny models, built once per session and shared by every test folder that needs them.
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
