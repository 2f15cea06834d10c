"""model_loader: every kind of model, safe defaults, hooks on the way, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hookengine import Engine
from hookengine.models.loader import ModelLoader, ModelLoadError, ModelSpec, UnsafeFileError, load_model


def _engine(**options) -> tuple[Engine, ModelLoader]:
    engine = Engine(seed=0)
    loader = engine.use("model_loader", **options)
    return engine, loader


def _equal_to_file(module: torch.nn.Module, file: Path) -> bool:
    saved = load_file(str(file))
    state = module.state_dict()
    return set(saved) <= set(state) and all(torch.equal(state[k], v) for k, v in saved.items())


# ----------------------------------------------------------------- kinds
def test_sd_pipeline_by_path_is_assembled_registered_and_runs(tiny_sd: Path) -> None:
    engine, _ = _engine(models={"sd": {"source": str(tiny_sd)}})
    pipe = engine.state.models["sd"]
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert _equal_to_file(pipe.unet, tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert _equal_to_file(pipe.text_encoder, tiny_sd / "text_encoder" / "model.safetensors")
    out = pipe("a cat", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


def test_causal_lm_and_tokenizer_through_auto_classes(tiny_lm: Path) -> None:
    engine, loader = _engine()
    model = loader.load({"source": str(tiny_lm)}, name="lm")
    tokenizer = loader.load({"source": str(tiny_lm), "kind": "tokenizer"}, name="tok")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert type(tokenizer).__name__ == "GPT2Tokenizer"
    assert engine.state.models["lm"] is model and engine.state.models["tok"] is tokenizer
    assert _equal_to_file(model, tiny_lm / "model.safetensors")
    ids = tokenizer("hi", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_class_by_module_reference(tiny_net: Path) -> None:
    from hookengine.testing import TinyNet

    model = load_model(str(tiny_net), cls="hookengine.testing.tiny_models:TinyNet")
    assert isinstance(model, TinyNet)
    assert _equal_to_file(model, tiny_net / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no model"):
        load_model(str(tiny_net))  # its config.json names no architecture: the class must be given


def test_single_components_and_scheduler(tiny_sd: Path) -> None:
    unet = load_model(str(tiny_sd), subfolder="unet")
    scheduler = load_model(str(tiny_sd), subfolder="scheduler")
    vae = load_model(str(tiny_sd), subfolder="vae", dtype="float16")
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert vae.dtype == torch.float16


def test_single_file_safetensors_checkpoint(tiny_sd: Path, tmp_path: Path) -> None:
    single = tmp_path / "vae.safetensors"
    shutil.copy(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors", single)
    vae = load_model(str(single), cls="diffusers:AutoencoderKL", options={"config": str(tiny_sd), "subfolder": "vae"})
    assert type(vae).__name__ == "AutoencoderKL"
    assert _equal_to_file(vae, single)
    with pytest.raises(ModelLoadError, match="single file"):
        load_model(str(single))


def test_pipeline_dtype_and_device_apply_to_components(tiny_sd: Path) -> None:
    pipe = load_model(str(tiny_sd), dtype="bfloat16", device="cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


# ----------------------------------------------------------------- safety
def test_pickle_refused_with_how_to_allow_then_allowed(tiny_lm: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_lm / "config.json", folder / "config.json")
    model = load_model(str(tiny_lm))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_pickle_single_file_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, checkpoint)
    with pytest.raises(UnsafeFileError, match="model.ckpt"):
        load_model(str(checkpoint), cls="diffusers:StableDiffusionPipeline")


def test_trust_remote_code_is_off_unless_asked(tiny_net: Path) -> None:
    seen: list[dict] = []

    class Recorder:
        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            seen.append(kwargs)
            return cls()

    load_model(str(tiny_net), cls=Recorder)
    load_model(str(tiny_net), cls=Recorder, trust_remote_code=True)
    assert "trust_remote_code" not in seen[0]
    assert seen[1]["trust_remote_code"] is True


# ------------------------------------------------------------------ hooks
def test_load_start_listener_changes_what_is_loaded(tiny_sd: Path) -> None:
    engine, loader = _engine()

    def only_the_vae(state, spec: ModelSpec) -> None:
        spec.subfolder = "vae"
        spec.dtype = "float16"

    engine.on("model_load_start", only_the_vae)
    model = loader.load(str(tiny_sd), name="changed")
    assert type(model).__name__ == "AutoencoderKL" and model.dtype == torch.float16
    assert engine.state.models["changed"] is model


def test_load_model_slot_wrapper_and_loaded_listener(tiny_sd: Path, tiny_net: Path) -> None:
    engine, loader = _engine()

    @engine.attach("load_model")
    def redirect(next_impl, spec):
        if spec.name == "net":
            spec.source, spec.cls = str(tiny_net), "hookengine.testing.tiny_models:TinyNet"
        model = next_impl(spec)
        model.patched_by_slot = True
        return model

    @engine.on("model_loaded")
    def freeze(state, name, model):
        for p in model.parameters():
            p.requires_grad_(False)

    model = loader.load(str(tiny_sd / "does-not-exist"), name="net")
    assert type(model).__name__ == "TinyNet" and model.patched_by_slot
    assert not any(p.requires_grad for p in model.parameters())


def test_component_swap_before_assembly(tiny_sd: Path) -> None:
    from hookengine.testing import build_tiny_sd_pipeline

    other_vae = build_tiny_sd_pipeline(seed=1).vae
    engine, loader = _engine()
    asked: list[str] = []

    @engine.attach("load_component")
    def swap_vae(next_impl, name, spec):
        asked.append(name)
        return other_vae if name == "vae" else next_impl(name, spec)

    unets = []

    @engine.on("model_component")
    def patch_unet(state, name, component, components):
        if name == "unet":
            unets.append(component)
            component.lora_patched = True  # stands in for a LoRA-patched UNet

    pipe = loader.load(str(tiny_sd), name="sd")
    assert pipe.vae is other_vae
    assert pipe.unet is unets[0] and pipe.unet.lora_patched
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(asked)


def test_component_override_from_spec(tiny_sd: Path) -> None:
    vae = load_model(str(tiny_sd), subfolder="vae", dtype="float16")
    pipe = load_model(str(tiny_sd), components={"vae": vae, "unet": {"source": str(tiny_sd), "subfolder": "unet", "dtype": "bfloat16"}})
    assert pipe.vae is vae and pipe.unet.dtype == torch.bfloat16


# ------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors_and_keep_loaded_models(tiny_net: Path, tmp_path: Path) -> None:
    engine, loader = _engine()
    good = loader.load({"source": str(tiny_net), "cls": "hookengine.testing.tiny_models:TinyNet"}, name="good")

    with pytest.raises(ModelLoadError, match="no such file or folder.*missing-folder"):
        loader.load(str(tmp_path / "missing-folder"), name="good")
    with pytest.raises(ModelLoadError, match="nobody/no-such-model.*not in the local cache"):
        loader.load("nobody/no-such-model", name="good")
    empty = tmp_path / "empty"
    (empty / "stuff").mkdir(parents=True)
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match=r"empty.*is no model"):
        loader.load(str(empty), name="good")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_net, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(ModelLoadError, match=r"corrupt.*model\.safetensors"):
        loader.load({"source": str(corrupt), "cls": "hookengine.testing.tiny_models:TinyNet"}, name="good")
    with pytest.raises(ModelLoadError, match="unknown key"):
        loader.load({"source": str(tiny_net), "colour": "red"})

    assert engine.state.models["good"] is good
    assert _equal_to_file(good, tiny_net / "model.safetensors")
