"""LoRA and model scheduler tests: tiny models, the digits demo, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine import Engine
from hookengine.sched.lora import LoraScheduler
from hookengine.sched.model import ModelScheduler

torch.set_num_threads(1)

# The demo convnet: 0 Conv2d, 2 Conv2d, 6 Linear(512, 64), 9 Linear(64, 10).
DIGITS_MODEL = "hookengine.demo.digits:DigitsConvNet"


def digits_engine(
    run_dir: Path,
    *,
    lora: dict[str, Any] | None = None,
    model_sched: dict[str, Any] | None = None,
    phases: list[dict[str, Any]] | None = None,
    max_steps: int | None = None,
    checkpoint: dict[str, Any] | None = None,
    lr: float = 0.01,
) -> Engine:
    """The digits demo with lora_sched / model_sched (plugin classes, as a recipe would use them)."""
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("digits", batch_size=32)
    engine.use("supervised", model=DIGITS_MODEL)
    if lora is not None:
        engine.use(LoraScheduler, name="lora_sched", **{"model": "model", **lora})
    if model_sched is not None:
        engine.use(ModelScheduler, name="model_sched", **model_sched)
    trainer: dict[str, Any] = {"lr": lr, "eval_at_phase_end": False}
    if phases is not None:
        trainer["phases"] = phases
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    # logging every step: with fewer steps than its period and no evaluation, the logger
    # (metrics.py) fails at run_end on a missing metrics.jsonl.
    defaults = {"trainer": trainer, "progress": {"enabled": False}, "checkpoint": checkpoint or {}, "logging": {"every": 1}}
    engine.use_defaults(defaults)
    return engine


def stop_at(engine: Engine, step: int) -> None:
    """Stop the run after optimizer step ``step`` (the final checkpoint is still written)."""
    engine.on("step_end", lambda state: state.control.stop("test"), once=step)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def sd_pipe(tiny_sd: Path) -> Any:
    """A fresh tiny pipeline loaded from the saved folder."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)


@pytest.fixture
def lm(tiny_lm: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
