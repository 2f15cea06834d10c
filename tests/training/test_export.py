"""Exports load in their own tools: AutoPeftModel (with the tokenizer), a diffusers pipeline,
transformers from_pretrained, model_loader for a plain torch module (also as a teacher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine import Engine
from hookengine.core.plugins import model_factory
from hookengine.training.export import ExportError, ExportPlugin, export_models, export_run

torch.set_num_threads(1)


def quiet(engine: Engine, steps: int, lr: float, **checkpoint: Any) -> Engine:
    engine.use_defaults({"trainer": {"max_steps": steps, "lr": lr, "eval_at_phase_end": False},
                         "progress": {"enabled": False}, "logging": {"every": 1}, "checkpoint": checkpoint})
    return engine


def lm_batches(tiny_lm: Path, count: int = 3) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = tokenizer(["the cat sat on a mat", "two plus two is four"], return_tensors="pt")  # equal lengths
    return [{"input_ids": ids.input_ids, "attention_mask": ids.attention_mask}] * count


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 9, 17, 33, 40]])).logits


# ------------------------------------------------------------------- adapters
def test_lora_adapter_loads_with_auto_peft_model_and_its_tokenizer(tiny_lm: Path, run_dir: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("causal_lm", model=str(tiny_lm))
    engine.use("lora_sched", model="model", adapters={"style": {"targets": ["*.c_attn"], "rank": 4, "alpha": 8,
                                                                 "options": {"fan_in_fan_out": True}}}, save=["peft"])
    engine.use(ExportPlugin)
    batches = lm_batches(tiny_lm)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    quiet(engine, 3, 1e-2).run()
    trained = engine.state.models["model"].eval()

    for folder in (run_dir / "export" / "style" / "peft" / "model", run_dir / "lora" / "style" / "peft" / "model"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and Path(config["base_model_name_or_path"]) == tiny_lm
        loaded = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
        assert torch.allclose(logits(loaded), logits(trained), atol=1e-6)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("the cat").input_ids == AutoTokenizer.from_pretrained(tiny_lm)("the cat").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert not torch.allclose(logits(base), logits(trained), atol=1e-4)  # the adapter trained


# -------------------------------------------------------- pipelines, transformers
def test_trained_unet_is_exported_inside_its_whole_pipeline(tiny_sd: Path, run_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    ids = tokenizer(["a red square", "two dots"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    batches = [{"pixel_values": torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1, "input_ids": ids}]
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("hookengine.routines.diffusion:DiffusionRoutine", name="diffusion", pipeline=str(tiny_sd), seed=7,
               sample_at_phase_end=False)
    engine.use(ExportPlugin)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    quiet(engine, 1, 1e-2).run()

    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["tiny-sd"]
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "export" / "tiny-sd")
    original = StableDiffusionPipeline.from_pretrained(tiny_sd)
    trained = engine.state.models["unet"].state_dict()
    exported = pipe.unet.state_dict()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    assert not all(torch.equal(trained[k], original.unet.state_dict()[k]) for k in trained)
    assert all(torch.equal(v, original.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())


def test_transformers_model_is_saved_with_its_tokenizer(tiny_lm: Path, run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("causal_lm", model=str(tiny_lm))
    batches = lm_batches(tiny_lm, 2)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    quiet(engine, 2, 1e-2).run()
    written = export_models(engine.state, run_dir / "out")
    loaded = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    assert torch.equal(logits(loaded), logits(engine.state.models["model"].eval()))
    assert AutoTokenizer.from_pretrained(written["model"])("two dots").input_ids == AutoTokenizer.from_pretrained(tiny_lm)("two dots").input_ids


# ----------------------------------------------------------- plain torch modules
def supervised_recipe(run_dir: Path, model: str = "tests.sched.helpers:stack", options: dict | None = None) -> dict:
    return {
        "name": "export",
        "run_dir": str(run_dir),
        "seed": 0,
        "plugins": {
            "model": {"use": "supervised", "model": model, "model_options": options or {}},
            "data": {"use": "tests.sched.helpers:data"},
        },
        "trainer": {"max_steps": 3, "lr": 0.05, "eval_at_phase_end": False},
        "logging": {"every": 1},
        "progress": {"enabled": False},
    }


def test_export_run_rebuilds_the_run_and_model_loader_loads_the_module_as_a_teacher(run_dir: Path) -> None:
    from hookengine.models.loader import load_model

    engine = Engine()
    engine.run(supervised_recipe(run_dir))
    trained = engine.state.models["model"]
    written = export_run(run_dir)
    assert written == {"model": run_dir / "export" / "model"}
    loaded = load_model(str(written["model"]))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))

    # ... and as a distillation teacher through model_loader.
    teacher_run = run_dir.parent / "distill"
    distill = Engine(seed=0, run_dir=teacher_run)
    distill.use("model_loader", models={"teacher": str(written["model"])})
    distill.use("hookengine.routines.distill:Distillation", name="distill", teachers=["teacher"],
                model="tests.sched.helpers:stack")
    from tests.sched.helpers import data

    distill.use(data)
    quiet(distill, 2, 0.05).run()
    teacher = distill.state.models["teacher"]
    with torch.no_grad():
        assert torch.equal(teacher(x), trained(x))  # loaded right, and never trained


def test_nn_linear_options_are_read_off_the_module_and_bad_layouts_are_named(run_dir: Path) -> None:
    from hookengine.models.loader import load_model

    engine = Engine()
    engine.run(supervised_recipe(run_dir, "torch.nn:Linear", {"in_features": 4, "out_features": 3}))
    written = export_models(engine.state, run_dir / "out")
    spec = json.loads((written["model"] / "hookengine_model.json").read_text())
    assert spec["class"] == "torch.nn:Linear"  # the recipe's own reference (routines.base.built_by)
    assert spec["options"] == {"in_features": 4, "out_features": 3}
    loaded = load_model(str(written["model"]))
    assert torch.equal(loaded.weight, engine.state.models["model"].weight)

    # A module built in Python (no recipe reference): the options are read off its attributes.
    engine.state.models["model"] = torch.nn.Linear(4, 3)
    written = export_models(engine.state, run_dir / "python")
    spec = json.loads((written["model"] / "hookengine_model.json").read_text())
    assert spec == {"format": "torch", "weights": "model.safetensors", "class": "torch.nn.modules.linear:Linear",
                    "options": {"in_features": 4, "out_features": 3}}

    engine.state.models["model"] = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ExportError, match="cannot work out how to build model 'model'.*export.specs.model"):
        export_models(engine.state, run_dir / "bad")


# ----------------------------------------------------------------------- Keras
@model_factory
def keras_classifier() -> Any:
    import keras

    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(5)])


def test_keras_model_is_saved_as_a_keras_file(run_dir: Path) -> None:
    keras = pytest.importorskip("keras")
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("hookengine.routines.keras:KerasRoutine", name="keras", model=f"{__name__}:keras_classifier",
               loss={"class_name": "SparseCategoricalCrossentropy", "config": {"from_logits": True}}, seed=0)
    engine.use(ExportPlugin)
    engine.on("setup", lambda state: state.dataloaders.update(train=data))
    quiet(engine, 2, 1e-2).run()
    loaded = keras.saving.load_model(run_dir / "export" / "model" / "model.keras")
    x = data[0][0]
    trained = engine.state.models["model"]
    assert torch.equal(torch.as_tensor(loaded(x)), torch.as_tensor(trained(x)))


def test_export_run_of_a_lora_run_reloads_the_base_and_writes_the_adapter(run_dir: Path) -> None:
    from hookengine.demo.digits import DigitsConvNet
    from hookengine.sched.lora_files import load_lora

    recipe = {
        "name": "lora-export",
        "run_dir": str(run_dir),
        "seed": 0,
        "plugins": {
            "digits": {"use": "digits", "batch_size": 16},
            "model": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet"},
            "lora": {"use": "lora_sched", "model": "model", "adapters": {"a": {"targets": ["6", "9"], "rank": 4, "alpha": 8}}},
        },
        "trainer": {"max_steps": 3, "lr": 0.01, "eval_at_phase_end": False},
        "logging": {"every": 1},
        "progress": {"enabled": False},
    }
    engine = Engine()
    engine.run(recipe)
    trained = engine.state.models["model"].eval()
    written = export_run(run_dir, out=run_dir / "out")
    assert sorted(written) == ["a"]
    assert (written["a"] / "a_kohya.safetensors").is_file() and (written["a"] / "pytorch_lora_weights.safetensors").is_file()
    # the trained model's base (frozen) weights in a plain net, then the exported adapter on top
    fresh = DigitsConvNet().eval()
    base = {k.replace(".base_layer", ""): v for k, v in trained.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(base)
    load_lora(fresh, written["a"] / "peft" / "model", adapter="a")
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fresh(x), trained(x), atol=1e-6)
