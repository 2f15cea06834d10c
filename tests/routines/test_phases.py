"""Routines in phases: a recipe picks the routine of each phase; validation every N steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hookengine import Engine


def test_recipe_phases_switch_between_classifier_and_diffusion(run_dir: Path) -> None:
    recipe = {
        "name": "phases",
        "run_dir": str(run_dir),
        "plugins": {
            "digits": {"use": "digits", "batch_size": 16},
            "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet"},
            "denoiser": {
                "use": "hookengine.routines.diffusion:DiffusionRoutine",
                "model": "hookengine.demo.digit_scenes:digits_unet",
                "model_options": {"width": 8},
                "image_key": 0, "label_key": 1, "pixel_range": [0, 1], "sample_steps": 2,
            },
        },
        "phases": [
            {"name": "classify", "steps": 2, "routine": "classifier"},
            {"name": "denoise", "steps": 3, "routine": "denoiser"},
        ],
        "trainer": {"eval_every": 1},
        "logging": {"every": 1},
        "progress": {"enabled": False},
    }
    engine = Engine(seed=0)
    snapshots: dict[str, torch.Tensor] = {}

    def snapshot(state, phase) -> None:
        snapshots[phase.name] = torch.cat([p.detach().flatten().clone() for p in state.models["unet"].parameters()])

    engine.on("phase_end", snapshot)
    evaluated: list[tuple[str, int]] = []
    engine.on("evaluate_end", lambda state, metrics: evaluated.append((state.clock.phase, state.clock.step)))
    initial: list[torch.Tensor] = []
    engine.on("setup", lambda state: initial.append(
        torch.cat([p.detach().flatten().clone() for p in state.models["unet"].parameters()])), priority=-10)
    engine.run(recipe)
    assert torch.equal(snapshots["classify"], initial[0])  # the UNet did not train in the classifier phase
    assert not torch.equal(snapshots["denoise"], initial[0])
    # Only the diffusion phase's end writes a sample grid.
    assert [p.name for p in (run_dir / "samples").iterdir()] == ["step-0005.png"]
    # Validation loss every step, from the routine of the phase that runs, and in metrics.jsonl.
    assert [step for phase, step in evaluated if phase == "classify"][:2] == [1, 2]
    assert [step for phase, step in evaluated if phase == "denoise"][:3] == [3, 4, 5]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval" and r["phase"] == "denoise"][:3] == [3, 4, 5]
    assert all("val_loss" in r for r in records if r["kind"] == "eval")
