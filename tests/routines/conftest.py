"""Tiny models built once per session, and small helpers shared by the routine tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def quiet_engine(run_dir: Path, plugins: dict[str, Any] | None = None, **trainer: Any) -> Any:
    """An engine with the default plugins, no progress bar, and the given trainer options."""
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    # logging.every=1: with fewer steps than `every` and no evaluation, the logger's plot
    # step finds no metrics file (reported to the lead; not ours to fix here).
    options = {"trainer": trainer, "progress": {"enabled": False}, "logging": {"every": 1}, **(plugins or {})}
    engine.use_defaults(options)
    return engine


def record_losses(engine: Any) -> list[float]:
    """The loss of every optimizer step, as floats."""
    losses: list[float] = []
    engine.on("step_end", lambda state, loss: losses.append(float(loss)))
    return losses
