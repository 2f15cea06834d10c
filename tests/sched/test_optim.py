"""optim_sched and group building on real tiny diffusers / transformers models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hookengine.sched import groups as G
from hookengine.sched.optim import optimizer_class

from .helpers import make_engine, weights


@pytest.fixture(scope="module")
def sd():
    from hookengine.testing.tiny_models import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline()
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.fixture(scope="module")
def gpt2():
    from hookengine.testing.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(architecture="gpt2")[0]


def by_param(groups, names):
    return {names[id(p)]: g for g in groups for p in g["params"]}


def test_patterns_globs_regexes_and_module_levels():
    assert G.matches("encoder.layers.0", "encoder.layers.0.mlp.fc1.weight")
    assert not G.matches("encoder.layers.1", "encoder.layers.10.mlp.fc1.weight")
    assert G.matches("*.bias", "a.b.bias") and not G.matches("*.bias", "a.bias_x")
    assert G.matches(r"re:.*layers\.\d+\.self_attn", "encoder.layers.3.self_attn.q_proj.weight")
    assert G.matches("sequential/head", "sequential/head/kernel")  # Keras paths
    with pytest.raises(ValueError, match="bad regular expression"):
        G.compile_patterns("re:(")


def test_groups_on_a_unet_and_a_text_encoder(sd):
    specs = [
        {"name": "down", "model": "unet", "params": ["down_blocks.*"], "lr_mult": 0.5},
        {"name": "te", "model": "text_encoder", "lr": 1e-5, "weight_decay": 0.0, "eps": 1e-6},
    ]
    groups, names = G.build_param_groups(sd, specs, lr=1e-4, weight_decay=0.01)
    table = by_param(groups, names)
    every = {f"{m}:{n}" for m, model in sd.items() for n, _ in model.named_parameters()}
    assert set(table) == every  # each parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(every)
    down = table["unet:down_blocks.0.resnets.0.conv1.weight"]
    assert (down["name"], down["lr"], down["weight_decay"]) == ("down", 0.5e-4, 0.01)
    assert table["unet:down_blocks.0.resnets.0.conv1.bias"]["weight_decay"] == 0.0
    assert table["unet:down_blocks.0.resnets.0.norm1.weight"]["name"] == "down/no_decay"
    assert table["unet:up_blocks.0.resnets.0.conv1.weight"]["name"] == "default"
    te = table["text_encoder:encoder.layers.0.self_attn.q_proj.weight"]
    assert (te["lr"], te["eps"], te["weight_decay"]) == (1e-5, 1e-6, 0.0)
    norms = G.norm_parameter_names(sd["text_encoder"])
    assert "final_layer_norm.weight" in norms and table["text_encoder:final_layer_norm.weight"]["name"] == "te/no_decay"
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    assert len(optimizer.param_groups) == len(groups)


def test_no_decay_on_a_transformers_model_and_errors(gpt2):
    groups, names = G.build_param_groups({"lm": gpt2}, [{"name": "attn", "params": [r"re:.*\.attn\..*"]}], lr=1e-3, weight_decay=0.1)
    table = by_param(groups, names)
    assert table["lm:transformer.h.0.ln_1.weight"]["weight_decay"] == 0.0
    assert table["lm:transformer.wte.weight"]["weight_decay"] == 0.1  # an embedding matrix decays
    assert table["lm:transformer.h.1.attn.c_attn.weight"]["name"] == "attn"
    assert table["lm:transformer.h.1.attn.c_attn.bias"]["name"] == "attn/no_decay"
    with pytest.raises(ValueError, match="selects no parameter"):
        G.build_param_groups({"lm": gpt2}, [{"name": "x", "params": ["nothing.*"]}], lr=1e-3)
    with pytest.raises(ValueError, match="did you mean 'lm'"):
        G.build_param_groups({"lm": gpt2}, [{"name": "x", "model": "llm"}], lr=1e-3)


def test_loraplus_equals_peft(gpt2):
    """LoRA B matrices at lr × ratio: the same lr and weight decay per parameter as PEFT's
    create_loraplus_optimizer."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    model = get_peft_model(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]))
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1)
    expected = {id(p): (g["lr"], g["weight_decay"]) for g in reference.param_groups for p in g["params"]}
    groups, names = G.build_param_groups({"lm": model}, lr=1e-3, weight_decay=0.1, loraplus_ratio=16.0)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert ours == expected
    assert any(lr == 16e-3 for lr, _ in ours.values())


@pytest.mark.parametrize("embedding_lr", [None, 3e-5])
def test_loraplus_with_embedding_lora_equals_peft(gpt2, embedding_lr):
    """LoRA on the token embedding too: PEFT gives both lora_embedding_A and lora_embedding_B
    ``loraplus_lr_embedding`` (default 1e-6), not lr / lr × ratio."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn", "c_proj"])
    model = get_peft_model(copy.deepcopy(gpt2), config)
    extra = {} if embedding_lr is None else {"loraplus_lr_embedding": embedding_lr}
    reference = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, **extra
    )
    expected = {id(p): (g["lr"], g["weight_decay"]) for g in reference.param_groups for p in g["params"]}
    groups, names = G.build_param_groups({"lm": model}, lr=1e-4, weight_decay=0.1, loraplus_ratio=16.0, **extra)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    embedding = {names[i].split(":", 1)[1]: lr for i, (lr, _) in ours.items() if "lora_embedding_" in names[i]}
    assert len(embedding) == 2, embedding
    assert {n: ours[i] for i, n in names.items()} == {n: expected[i] for i, n in names.items()}
    assert ours == expected


def test_block_weight_presets_and_unet_mapping(sd):
    s = math.sin
    assert G.block_weight_preset("sine", 4) == pytest.approx([0, s(math.pi / 6), s(math.pi / 3), 1])
    assert G.block_weight_preset("cosine", 4) == pytest.approx([1, s(math.pi / 3), s(math.pi / 6), 0])
    assert G.block_weight_preset("linear+0.5", 3) == pytest.approx([0.5, 1.0, 1.5])
    assert G.block_weight_preset("reverse_linear", 3) == pytest.approx([1.0, 0.5, 0.0])
    assert G.block_weight_preset("zeros", 2) == [0.0, 0.0]
    with pytest.raises(ValueError, match="did you mean 'sine'"):
        G.block_weight_preset("sin", 4)
    unet = sd["unet"]
    mults = G.block_weights(unet, down="linear", mid=0.25, up=[0.1, 0.2, 0.3], zero_threshold=0.15)
    # Tiny UNet: 1 resnet per down block -> 2 positions per block, 4 down indices.
    assert mults["down_blocks.0.resnets.0.conv1.weight"] == 0.0
    assert mults["down_blocks.0.downsamplers.0.conv.weight"] == pytest.approx(1 / 3)
    assert mults["down_blocks.1.resnets.0.conv1.weight"] == pytest.approx(2 / 3)
    assert mults["mid_block.resnets.0.conv1.weight"] == 0.25
    assert mults["up_blocks.0.resnets.1.conv1.weight"] == 0.2
    assert mults["up_blocks.1.resnets.0.conv1.weight"] == 0.3
    assert mults["up_blocks.1.resnets.1.conv1.weight"] == 1.0  # a short list is filled with 1, as kohya's
    assert "conv_in.weight" not in mults
    assert G.unet_block_index("up_blocks.2.upsamplers.0.conv.weight", 3) == ("up", 8)


def test_optimizer_names():
    assert optimizer_class("SGD") is torch.optim.SGD
    assert optimizer_class("torch.optim:RMSprop") is torch.optim.RMSprop
    with pytest.raises(ValueError, match="bitsandbytes"):
        optimizer_class("AdamW8bit")
    with pytest.raises(ValueError, match="did you mean 'AdamW'"):
        optimizer_class("adamw")


def test_hyper_parameters_follow_schedules(run_dir: Path) -> None:
    from hookengine import schedule as schedules

    engine = make_engine(
        run_dir,
        trainer={"max_steps": 8, "lr": 0.01},
        plugins=[
            (
                "optim_sched",
                {
                    "optimizer": "AdamW",
                    "weight_decay": 0.2,
                    "groups": [{"name": "head", "params": ["head"], "wd_mult": 0.5}],
                    "schedules": {
                        "betas": [{"schedule": "linear", "start": 0.8, "end": 0.9, "steps": 4}, 0.99],
                        "weight_decay": {"schedule": "cosine", "start": 0.2, "end": 0.0, "steps": 8},
                        "lr_mult": {"value": {"schedule": "linear", "start": 1.0, "end": 2.0, "steps": 8}, "groups": ["head*"]},
                    },
                },
            )
        ],
    )
    rows = []
    engine.on("before_optimizer_step", lambda state: rows.append({g["name"]: dict(g) for g in state.optimizers["main"].param_groups}), priority=-100)
    engine.run()
    beta1, wd, mult = schedules.linear(0.8, 0.9, 4), schedules.cosine(0.2, 0.0, 8), schedules.linear(1.0, 2.0, 8)
    for step, row in enumerate(rows):
        assert row["default"]["betas"] == (beta1(step), 0.99)
        assert row["default"]["weight_decay"] == pytest.approx(wd(step))
        assert row["head"]["weight_decay"] == pytest.approx(0.5 * wd(step))
        assert row["default/no_decay"]["weight_decay"] == 0.0
        assert row["head"]["lr"] == pytest.approx(0.01 * mult(step)) and row["default"]["lr"] == 0.01


PHASES = [{"name": "warm", "steps": 5}, {"name": "main", "steps": 5}]


@pytest.mark.parametrize("after,kept", [("Adam", True), ("SGD", False)])
def test_swap_at_a_phase_boundary_keeps_matching_state(run_dir: Path, after, kept) -> None:
    options = {"momentum": 0.9} if after == "SGD" else {}
    engine = make_engine(
        run_dir,
        trainer={"phases": PHASES, "lr": 0.01},
        plugins=[("optim_sched", {"optimizer": "AdamW", "phases": {"main": {"optimizer": after, "options": options}}})],
    )
    seen = {}

    def at_boundary(state, phase):
        seen[phase.name] = state.optimizers["main"]
        if phase.name == "warm":
            return
        old = seen["warm"]
        new = state.optimizers["main"]
        assert type(new).__name__ == after
        param = next(iter(state.models["model"].parameters()))
        if kept:
            assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"])
            assert new.state[param]["exp_avg"] is not old.state[param]["exp_avg"]
        else:
            assert param not in new.state

    engine.on("phase_start", at_boundary, priority=-100)
    engine.run()
    assert type(engine.state.optimizers["main"]).__name__ == after


@pytest.mark.parametrize("resume_at", [3, 6])
def test_resume_across_an_optimizer_swap_is_bitwise(tmp_path: Path, resume_at) -> None:
    plugins = [("optim_sched", {"optimizer": "AdamW", "phases": {"main": {"optimizer": "SGD", "options": {"momentum": 0.9}}}})]
    trainer = {"phases": PHASES, "lr": 0.01}
    full = make_engine(tmp_path / "a", trainer=trainer, plugins=plugins, checkpoint={"every": 3, "keep_last": 0})
    full.run()
    path = tmp_path / "a" / "checkpoints" / f"step-{resume_at:08d}"
    resumed = make_engine(tmp_path / "b", trainer=trainer, plugins=plugins, checkpoint={"resume": str(path)})
    resumed.run()
    assert type(resumed.state.optimizers["main"]).__name__ == "SGD"
    a, b = weights(full.state.models["model"]), weights(resumed.state.models["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
