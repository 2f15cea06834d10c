"""lora_sched: PEFT adapters by pattern, scales over time, merge, files other tools load."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine.sched.lora_files import from_kohya, load_lora, save_lora, to_kohya
from hookengine.sched.lora_ops import (
    AdapterSpec,
    activate_adapters,
    add_adapter,
    adapter_state_dict,
    match_targets,
    merge_adapters,
    peft_config,
    set_adapter_scale,
    tuner_layers,
)

from .conftest import assert_equal_tensors, digits_engine, stop_at, weights

UNET_TARGETS = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.proj_in", "*.ff.net.0.proj"]
TE_TARGETS = ["*.q_proj", "*.v_proj", "*.mlp.fc1"]
# diffusers 0.42.1 cannot read the attention layers of an SD 1.x kohya text-encoder file
# ("to_q_lora" keys: dropped next to MLP keys, "Could not automatically infer state dict
# type" alone), so its kohya reference reads the text encoder's MLP layers only.
TE_MLP = ["*.mlp.fc1", "*.mlp.fc2"]


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10]), torch.randn(1, 8, 32, generator=g)


def unet_out(unet: Any) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def te_out(text_encoder: Any) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[516, 40, 41, 42, 517]])).last_hidden_state


def lm_out(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 200, 17]])).logits


def add(model: Any, name: str, **spec: Any) -> AdapterSpec:
    """Add an adapter with random B (init_lora_weights=False) so it changes the outputs."""
    spec.setdefault("options", {"init_lora_weights": False})
    spec = AdapterSpec(**spec)
    add_adapter(model, name, peft_config(spec, match_targets(model, spec.targets)))
    return spec


# ------------------------------------------------------------------- targets
def test_targets_by_glob_and_regex_with_rank_and_alpha_patterns(sd_pipe: Any) -> None:
    unet = sd_pipe.unet
    names = match_targets(unet, ["*.attn1.to_q", "re:.*attn2\\.to_(k|v)"])
    assert names and all(n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v")) for n in names)
    blocks = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    assert len(names) == 3 * len(blocks) and len(blocks) == 4  # down, mid, two up
    # a module pattern covers every adaptable layer inside it
    inside = match_targets(unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])
    assert sorted(n.rsplit(".", 1)[-1] for n in inside) == ["0", "to_k", "to_q", "to_v"]

    add(unet, "a", rank=4, alpha=2, targets=["*.to_q", "*.to_k"], rank_pattern={"*.to_k": 2}, alpha_pattern={"up_blocks.*": 8})
    layers = dict(tuner_layers(unet))
    q_down = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    k_up = layers["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"]
    assert (q_down.r["a"], q_down.lora_alpha["a"]) == (4, 2)
    assert (k_up.r["a"], k_up.lora_alpha["a"]) == (2, 8)
    assert q_down.scaling["a"] == 0.5 and k_up.scaling["a"] == 4
    base = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert base and all(".lora_" in n for n in base)  # only the adapter trains


def test_targets_that_match_nothing_are_an_error_naming_the_pattern(sd_pipe: Any) -> None:
    with pytest.raises(ValueError, match=r"pattern '\*\.to_qq' matches no module.*'to_q'"):
        match_targets(sd_pipe.unet, ["*.to_q", "*.to_qq"])
    with pytest.raises(ValueError, match=r"'\*\.norm1'.*cannot adapt.*LayerNorm"):
        match_targets(sd_pipe.unet, ["*.norm1"])


def test_unknown_target_fails_at_setup_of_a_run(run_dir: Path) -> None:
    engine = digits_engine(run_dir, lora={"adapters": {"a": {"targets": ["lin*"]}}}, max_steps=1)
    with pytest.raises(ValueError, match=r"lora_sched\.adapters\.a\.targets.*'lin\*' matches no module"):
        engine.run()


def test_bad_adapter_options_are_named() -> None:
    from hookengine.sched.lora import LoraScheduler

    with pytest.raises(ValueError, match=r"lora_sched\.adapters\.a\.rnak"):
        LoraScheduler(adapters={"a": {"targets": ["6"], "rnak": 4}})
    with pytest.raises(ValueError, match=r"unknown PEFT method 'lorra' \(did you mean 'lora'\?\)"):
        LoraScheduler(adapters={"a": {"targets": ["6"], "method": "lorra"}})


# -------------------------------------------------------------------- scales
def test_scale_schedule_through_the_engine_equals_peft_set_scale(run_dir: Path) -> None:
    schedule = {"schedule": "linear", "start": 1.0, "end": 0.0, "steps": 4}
    lora = {"adapters": {"a": {"targets": ["6", "9"], "rank": 4, "alpha": 8, "scale": schedule,
                               "options": {"init_lora_weights": False}}}}
    engine = digits_engine(run_dir, lora=lora, max_steps=5, lr=0.0)  # lr 0: only the scale moves
    probe = torch.rand(3, 1, 8, 8)
    seen: list[tuple[float, torch.Tensor]] = []

    @engine.attach("compute_loss")
    def record(next_impl, batch):
        model = engine.state.models["model"]
        layer = dict(tuner_layers(model))["6"]
        with torch.no_grad():
            model.eval()
            seen.append((layer.scaling["a"], model(probe)))
            model.train()
        return next_impl(batch)

    engine.run()
    reference = copy.deepcopy(engine.state.models["model"]).eval()
    for step, (scaling, output) in enumerate(seen):
        factor = max(0.0, 1.0 - step / 4)
        assert scaling == factor * 8 / 4
        for _, layer in tuner_layers(reference):
            layer.set_scale("a", factor)  # PEFT's own call
        with torch.no_grad():
            assert torch.equal(output, reference(probe)), step
    assert not torch.equal(seen[0][1], seen[-1][1])


def test_several_adapters_add_up_like_diffusers_set_adapters(sd_pipe: Any) -> None:
    unet = sd_pipe.unet
    base = unet_out(unet)
    add(unet, "a", rank=4, alpha=8, targets=["*.to_q", "*.to_v"])
    add(unet, "b", rank=2, alpha=1, targets=["*.to_v", "*.proj_in"])
    reference = copy.deepcopy(unet)
    activate_adapters(unet, ["a", "b"])
    set_adapter_scale(unet, "a", 0.5)
    set_adapter_scale(unet, "b", 2.0)
    reference.set_adapters(["a", "b"], weights=[0.5, 2.0])  # diffusers' way
    assert torch.equal(unet_out(unet), unet_out(reference))
    reference.set_adapters(["a"], weights=[0.5])
    assert not torch.allclose(unet_out(unet), unet_out(reference))
    assert not torch.allclose(unet_out(unet), base)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"a", "b"}
    activate_adapters(unet, ["a", "b"], frozen=["b"])  # a fixed adapter next to a trained one
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"a"}


# --------------------------------------------------------------------- merge
def test_merge_equals_peft_merge_and_unload(lm: Any) -> None:
    from peft import get_peft_model, set_peft_model_state_dict

    reference = copy.deepcopy(lm)
    spec = add(lm, "style", rank=4, alpha=6, targets=["*.c_attn", "*.mlp.c_fc"], options={"init_lora_weights": False, "fan_in_fan_out": True})
    set_adapter_scale(lm, "style", 0.7)
    before = lm_out(lm)

    config = peft_config(spec, match_targets(reference, spec.targets))
    peft_model = get_peft_model(reference, config, adapter_name="style")
    loaded = {"base_model.model." + k: v for k, v in adapter_state_dict(lm, "style").items()}
    result = set_peft_model_state_dict(peft_model, loaded, adapter_name="style")
    assert not result.unexpected_keys
    for _, layer in tuner_layers(peft_model):
        layer.set_scale("style", 0.7)
    merged_reference = peft_model.merge_and_unload()

    merge_adapters(lm)
    assert not tuner_layers(lm)
    assert torch.allclose(lm_out(lm), before, atol=1e-5)
    assert_equal_tensors(weights(lm), weights(merged_reference))


def test_merge_at_end_of_a_run(run_dir: Path) -> None:
    lora = {"adapters": {"a": {"targets": ["6"], "rank": 2}}, "merge_at_end": True}
    engine = digits_engine(run_dir, lora=lora, max_steps=3)
    engine.run()
    model = engine.state.models["model"]
    assert not tuner_layers(model) and type(model[6]).__name__ == "Linear"
    # the final checkpoint still holds the adapter (it is written before the merge)
    state = json.loads((run_dir / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert any(".lora_A." in k for k in state["models"]["model"])


# ------------------------------------------------------------- files: peft
def test_peft_files_load_with_peft_from_pretrained(lm: Any, tiny_lm: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    add(lm, "style", rank=4, alpha=16, targets=["*.c_attn"], rank_pattern={"h.1.*": 2}, options={"init_lora_weights": False, "fan_in_fan_out": True})
    expected = lm_out(lm)
    written = save_lora({"model": lm}, "style", tmp_path / "style", ["peft"])
    folder = written["peft"] / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), folder)
    assert torch.equal(lm_out(peft_model), expected)
    mine = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    load_lora(mine, folder, adapter="style")
    assert torch.equal(lm_out(mine), expected)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert not torch.allclose(lm_out(fresh), expected)


# -------------------------------------------------------- files: diffusers
def _sd_with_adapter(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    add(pipe.unet, "style", rank=4, alpha=2, targets=UNET_TARGETS, rank_pattern={"up_blocks.*": 2})
    add(pipe.text_encoder, "style", rank=2, alpha=6, targets=TE_TARGETS)
    return unet_out(pipe.unet), te_out(pipe.text_encoder)


def test_diffusers_file_loads_with_load_lora_weights_alpha_not_rank(sd_pipe: Any, tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    unet_expected, te_expected = _sd_with_adapter(sd_pipe)
    models = {"unet": sd_pipe.unet, "text_encoder": sd_pipe.text_encoder}
    path = save_lora(models, "style", tmp_path / "style", ["diffusers"])["diffusers"]

    other = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    other.load_lora_weights(tmp_path / "style", adapter_name="style")
    assert torch.allclose(unet_out(other.unet), unet_expected, atol=1e-6)
    assert torch.allclose(te_out(other.text_encoder), te_expected, atol=1e-6)

    # The same weights without the metadata: diffusers takes alpha = r, and the outputs differ.
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(path)), str(bare / "pytorch_lora_weights.safetensors"))
    third = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    third.load_lora_weights(bare, adapter_name="style")
    assert not torch.allclose(unet_out(third.unet), unet_expected, atol=1e-4)

    # and back into plain models with load_lora
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    load_lora(fresh.unet, tmp_path / "style", adapter="style", component="unet")
    load_lora(fresh.text_encoder, path, adapter="style", component="text_encoder")
    assert torch.equal(unet_out(fresh.unet), unet_expected)
    assert torch.equal(te_out(fresh.text_encoder), te_expected)


# ------------------------------------------------------------ files: kohya
def test_kohya_keys_and_round_trip_against_diffusers_kohya_loader(sd_pipe: Any, tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    te_base = te_out(sd_pipe.text_encoder)
    add(sd_pipe.unet, "style", rank=4, alpha=2, targets=UNET_TARGETS, rank_pattern={"up_blocks.*": 2})
    add(sd_pipe.text_encoder, "style", rank=2, alpha=6, targets=TE_MLP)
    unet_expected, te_expected = unet_out(sd_pipe.unet), te_out(sd_pipe.text_encoder)
    assert not torch.allclose(te_expected, te_base, atol=1e-4)
    models = {"unet": sd_pipe.unet, "text_encoder": sd_pipe.text_encoder}
    path = save_lora(models, "style", tmp_path / "style", ["kohya"])["kohya"]
    tensors = load_file(str(path))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 8)
    assert tensors[f"{key}.lora_up.weight"].shape == (8, 4)
    assert float(tensors[f"{key}.alpha"]) == 2.0
    assert tensors["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 2
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"

    # diffusers' own kohya converter is the reference reader
    other = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    other.load_lora_weights(path.parent, weight_name=path.name, adapter_name="k")
    assert torch.allclose(unet_out(other.unet), unet_expected, atol=1e-6)
    assert torch.allclose(te_out(other.text_encoder), te_expected, atol=1e-6)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    load_lora(fresh.unet, path, adapter="k", component="unet")
    load_lora(fresh.text_encoder, path, adapter="k", component="text_encoder")
    assert torch.equal(unet_out(fresh.unet), unet_expected)
    assert torch.equal(te_out(fresh.text_encoder), te_expected)


def test_kohya_text_encoder_attention_keys_round_trip(sd_pipe: Any, tiny_sd: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    add(sd_pipe.text_encoder, "style", rank=2, alpha=6, targets=TE_TARGETS)
    expected = te_out(sd_pipe.text_encoder)
    path = save_lora({"text_encoder": sd_pipe.text_encoder}, "style", tmp_path, ["kohya"])["kohya"]
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in keys  # kohya / A1111 naming
    fresh = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")
    assert not torch.allclose(te_out(fresh), expected)
    load_lora(fresh, path, adapter="style", component="text_encoder")
    assert torch.equal(te_out(fresh), expected)


def test_kohya_conversion_is_invertible_and_rslora_keeps_its_scale(sd_pipe: Any) -> None:
    unet = sd_pipe.unet
    add(unet, "r", method="rslora", rank=4, alpha=3, targets=["*.to_k"])
    sd = adapter_state_dict(unet, "r")
    from hookengine.sched.lora_files import kohya_alphas

    alphas = kohya_alphas(unet, "r")
    kohya = to_kohya(sd, "lora_unet", alphas)
    back, back_alphas, ranks = from_kohya(kohya, "lora_unet", [n for n, _ in unet.named_modules()])
    assert_equal_tensors(back, sd)
    layer = next(layer for _, layer in tuner_layers(unet))
    for module, alpha in back_alphas.items():
        assert alpha / ranks[module] == pytest.approx(layer.scaling["r"])  # kohya's alpha / r = rsLoRA's scale
    with pytest.raises(ValueError, match="names no module"):
        from_kohya({"lora_unet_nope.lora_down.weight": sd[next(iter(sd))]}, "lora_unet", ["a.b"])


# ------------------------------------------------------- methods in a run
@pytest.mark.parametrize("method", ["dora", "loha", "lokr"])
def test_peft_methods_train_through_the_engine(run_dir: Path, method: str) -> None:
    lora = {"adapters": {"x": {"method": method, "targets": ["2", "6"], "rank": 4, "alpha": 4}}, "save": ["peft"]}
    engine = digits_engine(run_dir, lora=lora, max_steps=4)
    start: dict[str, torch.Tensor] = {}
    engine.on("setup", lambda state: start.update(weights(state.models["model"])), priority=-1000)
    engine.run()
    end = weights(engine.state.models["model"])
    changed = {k for k in end if not torch.equal(start[k], end[k])}
    assert changed and all("_x" in k or ".x" in k for k in changed), changed
    assert {k.split(".")[0] for k in changed} == {"2", "6"}
    assert (run_dir / "lora" / "x" / "peft" / "model" / "adapter_config.json").is_file()
    layers = dict(tuner_layers(engine.state.models["model"]))
    assert method.replace("dora", "lora") in type(layers["6"]).__module__.lower()


def test_save_at_run_end_in_every_format(run_dir: Path) -> None:
    lora = {"adapters": {"a": {"targets": ["6", "9"], "rank": 4, "alpha": 1}}, "save": ["peft", "diffusers", "kohya"],
            "kohya_prefixes": {"model": "lora_digits"}}
    engine = digits_engine(run_dir, lora=lora, max_steps=2)
    engine.run()
    folder = run_dir / "lora" / "a"
    assert (folder / "peft" / "model" / "adapter_model.safetensors").is_file()
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    kohya = load_file(str(folder / "a_kohya.safetensors"))
    assert sorted(kohya) == sorted(f"lora_digits_{m}.{p}" for m in "69" for p in ("alpha", "lora_down.weight", "lora_up.weight"))


# ------------------------------------------------- late adapters and resume
LATE = {
    "adapters": {
        "early": {"targets": ["6"], "rank": 4, "alpha": 8, "scale": {"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 8}},
        "late": {"method": "loha", "targets": ["9"], "rank": 2, "start_phase": "second"},
    }
}
PHASES = [{"name": "first", "steps": 4}, {"name": "second", "steps": 4}]


def test_adapter_added_at_phase_start_joins_the_optimizer(run_dir: Path) -> None:
    engine = digits_engine(run_dir, lora=LATE, phases=PHASES)
    groups: list[int] = []
    engine.on("step_end", lambda state: groups.append(len(state.optimizers["main"].param_groups)))
    engine.run()
    assert groups == [1] * 4 + [2] * 4
    model = engine.state.models["model"]
    late = [p for n, p in model.named_parameters() if ".late" in n]
    assert late and all(p.requires_grad for p in late)
    assert any(len(engine.state.optimizers["main"].state[p]) for p in late)  # it trained


def test_resume_across_the_phase_that_adds_an_adapter_is_exact(run_dir: Path, tmp_path: Path) -> None:
    reference = digits_engine(tmp_path / "reference", lora=LATE, phases=PHASES)
    reference.run()

    first = digits_engine(run_dir, lora=LATE, phases=PHASES)
    stop_at(first, 6)
    first.run()
    assert first.state.clock.step == 6
    second = digits_engine(run_dir, lora=LATE, phases=PHASES, checkpoint={"resume": "latest"})
    second.run()
    assert second.state.clock.step == 8
    assert_equal_tensors(weights(second.state.models["model"]), weights(reference.state.models["model"]))
    ref_opt, opt = reference.state.optimizers["main"].state_dict(), second.state.optimizers["main"].state_dict()
    for index, state in ref_opt["state"].items():
        assert_equal_tensors(state, opt["state"][index])
