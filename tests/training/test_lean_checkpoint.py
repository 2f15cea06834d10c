"""Lean checkpoints: a run with a frozen base saves what trains plus a reference to the base;
resume stays bitwise, a changed base is refused, teachers are never saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine import Engine
from hookengine.core.model_state import BaseModelChanged

torch.set_num_threads(1)

UNET_TARGETS = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"]
STEPS = 4


def sd_batches(tiny_sd: Path, count: int = STEPS) -> list[dict[str, torch.Tensor]]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        ids = tokenizer(["a red square", "two dots"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append({"pixel_values": torch.rand((2, 3, 32, 32), generator=generator) * 2 - 1, "input_ids": ids})
    return out


def lora_engine(run_dir: Path, pipeline: Path, batches: list[dict[str, Any]], steps: int = STEPS,
                **checkpoint: Any) -> tuple[Engine, list[float]]:
    """A LoRA run on the tiny SD UNet, from the pipeline folder (the recipe reloads the base)."""
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("hookengine.routines.diffusion:DiffusionRoutine", name="diffusion", pipeline=str(pipeline), seed=7,
               sample_at_phase_end=False)
    engine.use("lora_sched", model="unet", adapters={"a": {"targets": UNET_TARGETS, "rank": 4, "alpha": 8}})
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    losses: list[float] = []
    engine.on("step_end", lambda loss: losses.append(float(loss)))
    engine.use_defaults({"trainer": {"max_steps": steps, "lr": 1e-3, "eval_at_phase_end": False},
                         "progress": {"enabled": False}, "logging": {"every": 1}, "checkpoint": checkpoint})
    return engine, losses


def stop_at(engine: Engine, step: int) -> None:
    engine.on("step_end", lambda state: state.control.stop("test"), once=step)


def newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def test_lora_checkpoint_holds_the_adapter_and_optimizer_not_the_base(tiny_sd: Path, run_dir: Path) -> None:
    engine, _ = lora_engine(run_dir, tiny_sd, sd_batches(tiny_sd, 1), steps=1)
    engine.run()
    unet = engine.state.models["unet"]
    adapter = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".a." in n or n.endswith(".a"))
    base = sum(p.numel() * p.element_size() for m in ("unet", "vae", "text_encoder") for p in engine.state.models[m].parameters())
    assert adapter and base > 30 * adapter
    size = (newest(run_dir) / "tensors.safetensors").stat().st_size
    # adapter + AdamW's two moments, plus buffers and small bookkeeping
    assert size < 2 * (3 * adapter), (size, adapter, base)
    meta = json.loads((newest(run_dir) / "state.json").read_text())
    refs = meta["model_refs"]
    assert set(refs) == {"unet", "vae", "text_encoder"}
    assert refs["unet"]["source"].endswith("unet") or str(tiny_sd) in refs["unet"]["source"]
    assert len(refs["unet"]["frozen_hash"]) == 64
    assert all(".a." in k or k.endswith(".a") for k in meta["models"]["unet"])


def test_lora_resume_is_bitwise_and_a_changed_base_is_refused(tiny_sd: Path, tmp_path: Path) -> None:
    batches = sd_batches(tiny_sd)
    reference, reference_losses = lora_engine(tmp_path / "reference", tiny_sd, batches)
    reference.run()

    run = tmp_path / "run"
    first, first_losses = lora_engine(run, tiny_sd, batches)
    stop_at(first, 2)
    first.run()
    assert first.state.clock.step == 2
    second, second_losses = lora_engine(run, tiny_sd, batches, resume="latest")
    second.run()
    assert first_losses + second_losses == reference_losses
    a, b = reference.state.models["unet"].state_dict(), second.state.models["unet"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The same run on a base whose UNet differs in one weight: refused, naming the model.
    changed = tmp_path / "changed-sd"
    shutil.copytree(tiny_sd, changed)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(changed / "unet")
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    unet.save_pretrained(changed / "unet")
    third, _ = lora_engine(tmp_path / "third", changed, batches, resume=str(newest(run)))
    # (the checkpoint plugin may wrap it in its CheckpointError, a RuntimeError too)
    with pytest.raises(RuntimeError, match="model 'unet': its frozen base is not the one") as error:
        third.run()
    assert isinstance(error.value, BaseModelChanged) or isinstance(error.value.__cause__, BaseModelChanged)


def test_distillation_checkpoint_never_holds_the_teachers(run_dir: Path) -> None:
    from torch import nn

    def mlp(seed: int, hidden: int = 16) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 5))

    def engine_for(**checkpoint: Any) -> Engine:
        engine = Engine(seed=0, run_dir=run_dir)
        engine.state.models.update(teacher_a=mlp(1, 64), teacher_b=mlp(2, 64), student=mlp(0))
        engine.use("hookengine.routines.distill:Distillation", name="distill", teachers=["teacher_a", "teacher_b"])
        g = torch.Generator().manual_seed(5)
        data = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
        engine.on("setup", lambda state: state.dataloaders.update(train=data))
        engine.use_defaults({"trainer": {"max_steps": 4, "lr": 1e-2, "eval_at_phase_end": False},
                             "progress": {"enabled": False}, "logging": {"every": 1}, "checkpoint": checkpoint})
        return engine

    engine = engine_for()
    engine.run()
    meta = json.loads((newest(run_dir) / "state.json").read_text())
    student_keys = set(engine.state.models["student"].state_dict())
    assert set(meta["models"]["student"]) == student_keys  # fully trained: saved whole
    for teacher in ("teacher_a", "teacher_b"):
        assert meta["models"][teacher] == {}  # not a tensor of it
        assert meta["model_refs"][teacher]["frozen_entries"] == 9  # 6 parameters and 3 BatchNorm buffers, hashed
    # Resuming re-checks the teachers against the checkpoint's hashes.
    engine_for(resume="latest").run()
    teacher = engine_for(resume="latest")
    with torch.no_grad():
        teacher.state.models["teacher_b"][0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="model 'teacher_b': its frozen base"):
        teacher.run()


def test_the_frozen_hash_is_computed_once_and_again_only_when_a_frozen_tensor_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from hookengine.core import model_state

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    hashed: list[int] = []
    real = model_state.hashlib.sha256
    monkeypatch.setattr(model_state.hashlib, "sha256", lambda *args: hashed.append(1) or real(*args))
    cache: dict[str, Any] = {}
    first, reference = model_state.split_model_state(model, set(), cache, "m")
    with torch.no_grad():
        model[1].weight.add_(1.0)  # training the trained part needs no new hash
    again, same = model_state.split_model_state(model, set(), cache, "m")
    assert set(first) == {"1.weight", "1.bias"} and reference == same and len(hashed) == 1
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the frozen part changed: hashed again, and differently
    _, changed = model_state.split_model_state(model, set(), cache, "m")
    assert len(hashed) == 2 and changed["frozen_hash"] != reference["frozen_hash"]
