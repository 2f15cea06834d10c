"""The examples run from their recipes alone, and what they leave opens in the user's tools.

Each example is run once, through the CLI, on the tiny models and data that
``examples/make_assets.py`` writes, with fewer steps than the recipe asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``examples/assets`` built as a user would: ``python examples/make_assets.py``."""
    folder = tmp_path_factory.mktemp("examples")
    subprocess.run([sys.executable, str(EXAMPLES / "make_assets.py"), "--out", str(folder / "examples" / "assets")],
                   check=True, env=_env(), capture_output=True, timeout=300)
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(workspace: Path, recipe: str, *overrides: str) -> Path:
    """``hookengine run examples/RECIPE --set ...`` in ``workspace``; the run folder."""
    command = [sys.executable, "-m", "hookengine", "run", str(EXAMPLES / recipe)]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, cwd=workspace, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{recipe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    name = next(o.split("=", 1)[1] for o in (*overrides, "name=") if o.startswith("name="))
    if not name:
        import yaml

        name = yaml.safe_load((EXAMPLES / recipe).read_text())["name"]
    return workspace / "runs" / name


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sd_lora_from_captioned_images_loads_in_diffusers(workspace: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    run = run_example(workspace, "sd_lora/recipe.yaml", "trainer.max_steps=6", "checkpoint.every=3", "plugins.lr.warmup=1")
    base = workspace / "examples" / "assets" / "tiny-sd"
    lora = run / "lora" / "digits"

    def unet_output(weight_name: str | None) -> torch.Tensor:
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        if weight_name:
            pipe.load_lora_weights(lora, weight_name=weight_name)
        ids = pipe.tokenizer(["a handwritten digit three"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        torch.manual_seed(0)
        latents = torch.randn(1, 4, 4, 4)
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
            return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample

    plain, diffusers_file, kohya_file = unet_output(None), unet_output("pytorch_lora_weights.safetensors"), unet_output("digits_kohya.safetensors")
    assert not torch.allclose(plain, diffusers_file), "the LoRA changes nothing"
    torch.testing.assert_close(diffusers_file, kohya_file, rtol=1e-4, atol=1e-5)
    # Lean checkpoints: the LoRA and its optimizer state, not the pipeline.
    checkpoint = max((run / "checkpoints").iterdir())
    pipeline_bytes = sum(f.stat().st_size for f in base.rglob("*.safetensors"))
    assert (checkpoint / "tensors.safetensors").stat().st_size < pipeline_bytes / 4
    # Samples at the training buckets' size (32 px images, 8-pixel steps), not the pipeline's default.
    sample = Image.open(next((run / "samples").glob("*.png")))
    assert max(sample.size) <= 2 * 48, sample.size
    assert (run / "checkpoints" / "step-00000006").is_dir()


def test_llm_lora_from_jsonl_loads_with_auto_peft(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_example(workspace, "llm_lora/recipe.yaml", "trainer.max_steps=8", "plugins.lr.warmup=1")
    adapter = run / "lora" / "sft" / "peft" / "model"
    # The recipe names its base relative to the run's folder; the adapter must load from anywhere.
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(workspace / "examples" / "assets" / "tiny-llama")
    ids = tokenizer(["3+4="], return_tensors="pt").input_ids
    with torch.no_grad():
        tuned, plain = model(ids).logits, base(ids).logits
    assert not torch.allclose(tuned, plain), "the adapter changes nothing"
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert losses and all(l == l for l in losses)


def test_distillation_from_two_teachers_trained_and_exported_by_the_engine(workspace: Path) -> None:
    import torch

    from hookengine.demo.digits import load_digits_split
    from hookengine.models.loader import load_model

    run_example(workspace, "distill/teacher.yaml", "trainer.epochs=2")
    run_example(workspace, "distill/teacher.yaml", "trainer.epochs=2", "name=distill_teacher_deep", "seed=1",
                "plugins.classifier.model_options.width=8", "plugins.classifier.model_options.hidden=128")
    run = run_example(workspace, "distill/student.yaml", "trainer.epochs=2")
    last = [m for m in _metrics(run) if "val_accuracy" in m][-1]
    assert {"val_agreement/wide", "val_agreement/deep"} <= set(last)

    _, _, val_x, val_y = load_digits_split()
    student = load_model(str(run / "export" / "student")).eval()
    with torch.no_grad():
        accuracy = (student(val_x).argmax(-1) == val_y).float().mean().item()
    assert accuracy == pytest.approx(last["val_accuracy"], abs=1e-6)  # the exported student is the trained one
    assert accuracy > 0.5


def test_keras_model_from_a_recipe_exports_a_keras_file(workspace: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    from hookengine.demo.digits import load_digits_split

    run = run_example(workspace, "keras/recipe.yaml", "trainer.epochs=2", "trainer.eval_every=0")
    model = keras.saving.load_model(run / "export" / "model" / "model.keras")
    _, _, val_x, val_y = load_digits_split()
    logits = keras.ops.convert_to_numpy(model(val_x.numpy(), training=False))
    accuracy = float((logits.argmax(-1) == val_y.numpy()).mean())
    assert accuracy > 0.7
    assert "accuracy" in _metrics(run)[-1] or any("accuracy" in m for m in _metrics(run))
