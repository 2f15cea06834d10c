"""Checks that need a CUDA device (run by scripts/gpu_check.sh when a GPU is lent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def engine_on_gpu(run_dir: Path, mixed_precision: str):
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir, mixed_precision=mixed_precision)
    engine.use("digits", batch_size=32)
    engine.use("supervised", model="hookengine.demo.digits:DigitsConvNet", accuracy=True)
    engine.use_defaults({"trainer": {"epochs": 6, "lr": 0.002}, "progress": {"enabled": False}})
    return engine


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_demo_trains_on_the_gpu_in_each_precision(tmp_path: Path, precision: str) -> None:
    engine = engine_on_gpu(tmp_path, precision)
    engine.run()
    model = engine.state.models["model"]
    assert next(model.parameters()).device.type == "cuda"
    assert engine.state.metric("val_accuracy") >= 0.9
    if precision == "fp16":
        assert engine.runtime.wraps_optimizer  # the gradient scaler goes through accelerate


def test_resume_on_the_gpu_restores_cuda_rng(tmp_path: Path) -> None:
    engine = engine_on_gpu(tmp_path / "a", "no")
    engine.run()
    state = engine.state_dict()
    assert "cuda" in state["rng"]
