"""The main job: `hookengine run` with no recipe (diffusion + LoRA on composed digits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# The demo takes 4-5 minutes alone on 2 cores; allow for a machine that is also busy.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "hookengine", "run", "--run-dir", str(run_dir), "--set", "progress.enabled=false"],
        capture_output=True, text=True, timeout=1700,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def digit_classifier():
    """A plain classifier trained on the real 8x8 digits (not on anything the demo made)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=3000).fit(digits.data, digits.target)


def accuracy(run_dir: Path, phase: str, classifier) -> float:
    from hookengine.demo.digit_scenes import classify_samples

    samples = load_file(str(run_dir / "samples" / f"{phase}.safetensors"))
    predicted = classify_samples(samples["images"], classifier)
    return float((predicted == samples["labels"].numpy()).mean())


def test_class_conditional_samples_are_the_digits_asked_for(demo_run: Path, digit_classifier) -> None:
    assert accuracy(demo_run, "base", digit_classifier) >= 0.6  # chance is 0.1
    assert accuracy(demo_run, "lora", digit_classifier) >= 0.6


def test_the_lora_phase_changes_the_style(demo_run: Path) -> None:
    base = load_file(str(demo_run / "samples" / "base.safetensors"))["images"]
    lora = load_file(str(demo_run / "samples" / "lora.safetensors"))["images"]
    # Grey before (channels equal); orange ink on navy paper after: red over blue in the
    # strokes, blue over red in the background.
    assert (base[:, 0] - base[:, 2]).abs().mean() < 0.05
    strokes = lora.mean(1) > lora.mean(1).flatten(1).median(1).values.view(-1, 1, 1)
    red, blue = lora[:, 0], lora[:, 2]
    assert (red - blue)[strokes].mean() > 0.2
    assert (blue - red)[~strokes].mean() > 0.05


def test_the_run_leaves_grids_metrics_plot_lora_files_and_a_checkpoint(demo_run: Path) -> None:
    grids = sorted((demo_run / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-1500.png", "step-1750.png"]  # before and after the LoRA phase
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"base", "lora"}
    assert any(r["kind"] == "eval" and "val_loss" in r for r in records)
    assert (demo_run / "loss.png").stat().st_size > 5000
    lora = demo_run / "lora" / "style"
    assert (lora / "peft" / "unet" / "adapter_model.safetensors").is_file()
    kohya = load_file(str(next(lora.glob("*kohya*.safetensors"))))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya)
    assert sorted(p.name for p in (demo_run / "checkpoints").iterdir()) == ["step-00001750"]


def test_buckets_of_three_aspect_ratios_hold_every_image(demo_run: Path) -> None:
    from hookengine.demo.digit_scenes import scenes

    report = json.loads((demo_run / "buckets.json").read_text())
    assert set(report["buckets"]) == {"8x16", "12x12", "16x8"}
    assert sum(report["buckets"].values()) == sum(1 for _ in scenes("train", tile=8))
    assert report["left_out"] == []
