"""Module hooks by name pattern, on a tiny diffusers UNet and a tiny GPT-2 built from configs."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hookengine import Engine
from hookengine.core.module_hooks import ModuleHooks, match
from hookengine.core.state import State


# ---------------------------------------------------------------- the models
def tiny_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    ).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def run_unet(unet: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn((1, 4, 16, 16), generator=generator, dtype=unet.dtype)
    text = torch.randn((1, 3, 32), generator=generator, dtype=unet.dtype)
    return unet(sample, 10, encoder_hidden_states=text).sample


IDS = torch.tensor([[1, 5, 9, 42, 7, 3]])


def run_lm(lm: nn.Module) -> torch.Tensor:
    return lm(input_ids=IDS).logits


def paths(model: nn.Module, regex: str) -> list[str]:
    """The expected matches, written independently of the pattern matcher."""
    return [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)


def hooked(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if hook_count(module)]


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel on CPU: the model is its only child, ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.fixture
def unet() -> nn.Module:
    return tiny_unet()


@pytest.fixture
def lm() -> nn.Module:
    return tiny_gpt2()


def hooks_on(**models: nn.Module) -> ModuleHooks:
    state = State()
    state.models.update(models)
    return ModuleHooks(state)


# ------------------------------------------------------------------ patterns
def test_pattern_syntax() -> None:
    assert match("down_blocks.*.attentions.*", "down_blocks.0.attentions.1")
    assert not match("down_blocks.*.attentions.*", "down_blocks.0.attentions.1.proj_in")
    assert not match("*.attn", "h.0.attn")  # one star, one component
    assert match("**.attn", "h.0.attn") and match("**.attn", "attn")  # two stars, any number
    assert match("h.**.attn", "h.attn") and match("h.**.attn", "h.0.1.attn")
    assert match("h.0", "h.0") and not match("h.0", "h.01")
    assert match("", "") and not match("", "h")


def test_pattern_hooks_exactly_the_attention_modules(unet: nn.Module) -> None:
    hooks = hooks_on(unet=unet)
    down = hooks.add("unet.down_blocks.*.attentions.*", lambda m, a, o: None)
    expected = paths(unet, r"down_blocks\.\d+\.attentions\.\d+")
    assert expected and down.modules == expected
    assert hooked(unet) == expected
    everywhere = hooks.add("unet.**.attentions.*", lambda m, a, o: None)
    expected_all = paths(unet, r"(.+\.)?attentions\.\d+")
    assert len(expected_all) == 4 and everywhere.modules == expected_all  # down, mid, 2 up
    assert hooked(unet) == expected_all
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 5


def test_forward_hooks_see_the_outputs_and_can_replace_them(unet: nn.Module) -> None:
    baseline = run_unet(unet)
    hooks = hooks_on(unet=unet)
    seen: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    by_module = {m: n for n, m in unet.named_modules()}
    hooks.add("unet.**.attentions.*", lambda m, a, o: seen.__setitem__(by_module[m], o[0]))
    for name in paths(unet, r"(.+\.)?attentions\.\d+"):  # plain torch hooks as the reference
        unet.get_submodule(name).register_forward_hook(lambda m, a, o: reference.__setitem__(by_module[m], o[0]))
    torch.testing.assert_close(run_unet(unet), baseline)  # a hook that returns None changes nothing
    assert sorted(seen) == sorted(reference) and len(seen) == 4
    for name in seen:
        assert seen[name] is reference[name]

    sample = torch.randn(1, 4, 16, 16)
    conv: list[torch.Tensor] = []
    hooks.add("unet.conv_in", lambda m, a, o: conv.append(o))  # an exact path
    unet(sample, 10, encoder_hidden_states=torch.randn(1, 3, 32))
    torch.testing.assert_close(conv[0], unet.conv_in(sample))

    hooks.add("unet.down_blocks.*.attentions.*", lambda m, a, o: (torch.zeros_like(o[0]), *o[1:]))
    assert not torch.allclose(run_unet(unet), baseline)


def test_forward_pre_hook_fires_and_can_replace_the_inputs(unet: nn.Module) -> None:
    text = torch.randn(1, 3, 32)
    expected = unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=text).sample
    hooks = hooks_on(unet=unet)
    shapes: list[tuple[int, ...]] = []
    hooks.add("unet.down_blocks.*.resnets.*", lambda m, args: shapes.append(tuple(args[0].shape)), kind="forward_pre")
    hooks.add("unet.conv_in", lambda m, args: (torch.zeros_like(args[0]),), kind="forward_pre")
    out = unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=text).sample
    assert shapes == [(1, 8, 16, 16), (1, 8, 8, 8)]  # one resnet per down block
    torch.testing.assert_close(out, expected)


def test_backward_hook_fires_once_per_module(lm: nn.Module) -> None:
    hooks = hooks_on(lm=lm)
    grads: list[tuple[int, ...]] = []
    hooks.add("lm.transformer.h.*.mlp", lambda m, gi, go: grads.append(tuple(go[0].shape)), kind="backward")
    assert hooks.handles[0].modules == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    run_lm(lm).sum().backward()
    assert grads == [(1, 6, 32), (1, 6, 32)]


def test_detach_removes_every_hook(unet: nn.Module) -> None:
    baseline = run_unet(unet)
    hooks = hooks_on(unet=unet)
    handles = [
        hooks.add("unet.**.attentions.*", lambda m, a, o: (o[0] * 2, *o[1:])),
        hooks.add("unet.down_blocks.*.resnets.*", lambda m, a: None, kind="forward_pre"),
        hooks.add("unet.conv_in", lambda m, gi, go: None, kind="backward"),
    ]
    assert not torch.allclose(run_unet(unet), baseline)
    assert all(h.attached for h in handles) and "on 4 modules" in repr(handles[0])
    for handle in handles:
        handle.detach()
        handle.detach()  # twice is harmless
    assert hooked(unet) == []
    assert not any(h.attached for h in handles) and len(hooks) == 0 and "detached" in repr(handles[0])
    torch.testing.assert_close(run_unet(unet), baseline)

    with hooks.add("unet.conv_out", lambda m, a, o: o + 1) as handle:
        torch.testing.assert_close(run_unet(unet), baseline + 1)
    assert not handle.attached and hooked(unet) == []


def test_gpt2_attention_pattern(lm: nn.Module) -> None:
    hooks = hooks_on(lm=lm)
    outputs: list[torch.Tensor] = []
    handle = hooks.add("lm.transformer.h.*.attn", lambda m, a, o: outputs.append(o[0]))
    assert handle.modules == paths(lm, r"transformer\.h\.\d+\.attn") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    run_lm(lm)
    assert [tuple(o.shape) for o in outputs] == [(1, 6, 32), (1, 6, 32)]
    other = hooks.add("transformer.h.1.attn", lambda m, a, o: None, model="lm")  # model= instead of a prefix
    assert other.modules == ["transformer.h.1.attn"] and other.pattern == "lm.transformer.h.1.attn"


# --------------------------------------------------------- models that change
def test_hooks_follow_a_wrapped_or_swapped_model(lm: nn.Module) -> None:
    hooks = hooks_on(lm=lm)
    calls: list[int] = []
    handle = hooks.add("lm.transformer.h.*.attn", lambda m, a, o: calls.append(1))
    hooks.state.models["lm"] = Wrapper(lm)  # what DDP does: the model becomes `.module`
    hooks.refresh()
    hooks.refresh()
    assert handle.modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert [len(lm.get_submodule(p)._forward_hooks) for p in handle.modules] == [1, 1]  # not hooked twice
    run_lm(hooks.state.models["lm"])
    assert len(calls) == 2

    fresh = tiny_gpt2(seed=1)  # swapped for another model: hooks move over
    hooks.state.models["lm"] = fresh
    hooks.refresh()
    assert hooked(lm) == [] and hooked(fresh) == handle.modules
    hooks.state.models["lm"] = torch.compile(fresh)  # compile's wrapper is looked through too
    hooks.refresh()
    assert hooked(fresh) == handle.modules
    assert [len(fresh.get_submodule(p)._forward_hooks) for p in handle.modules] == [1, 1]


def test_hooks_survive_moving_and_casting(unet: nn.Module) -> None:
    hooks = hooks_on(unet=unet)
    dtypes: list[torch.dtype] = []
    handle = hooks.add("unet.**.attentions.*", lambda m, a, o: dtypes.append(o[0].dtype))
    before = handle.modules
    unet.to(torch.float64)
    unet.to("cpu")
    run_unet(unet)
    assert dtypes == [torch.float64] * 4
    hooks.refresh()  # same module objects: nothing to redo, nothing doubled
    assert handle.modules == before and [len(unet.get_submodule(p)._forward_hooks) for p in before] == [1] * 4


def lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: a non-zero delta from the start
    return LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)


@pytest.mark.parametrize("how", ["inject", "get_peft_model"])
def test_hooks_move_onto_the_lora_layer(lm: nn.Module, how: str) -> None:
    import peft

    hooks = hooks_on(lm=lm)
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    handle = hooks.add("lm.transformer.h.*.attn.c_attn", lambda m, a, o: seen.append((m, a[0], o)))
    expected = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert handle.modules == expected
    if how == "inject":
        peft.inject_adapter_in_model(lora_config(), lm)
    else:
        hooks.state.models["lm"] = peft.get_peft_model(lm, lora_config())
    hooks.refresh()
    assert handle.modules == expected  # PEFT's prefix and .base_layer are not part of the path
    layers = [lm.get_submodule(p) for p in expected]
    assert all(isinstance(layer, peft.tuners.lora.LoraLayer) for layer in layers)
    assert [len(layer._forward_hooks) for layer in layers] == [1, 1]
    assert all(not layer.base_layer._forward_hooks for layer in layers)  # the old hooks went away
    run_lm(hooks.state.models["lm"])
    assert [m for m, _, _ in seen] == layers  # once per forward, on the LoRA layers
    with torch.no_grad():
        for layer, x, out in seen:
            assert not torch.allclose(out, layer.base_layer(x))  # the output includes the LoRA delta
    hooks.add("lm.**.c_attn.base_layer", lambda m, a, o: None)  # the real name still works


# -------------------------------------------------------------------- errors
def test_a_pattern_that_matches_nothing_is_an_error_with_a_hint(unet: nn.Module) -> None:
    hooks = hooks_on(unet=unet, tokenizer=object())
    hint = r"'unet\.down_blocks\.\*\.attention\.\*'.*did you mean 'down_blocks\.0\.attentions\.0'"
    with pytest.raises(ValueError, match=hint):
        hooks.add("unet.down_blocks.*.attention.*", lambda m, a, o: None)
    with pytest.raises(ValueError, match="not one of .*did you mean 'forward'"):
        hooks.add("unet.conv_in", lambda m, a, o: None, kind="forwrd")
    with pytest.raises(ValueError, match="'tokenizer' is a object, not a torch module"):
        hooks.add("tokenizer.x", lambda m, a, o: None)
    assert len(hooks) == 0 and hooked(unet) == []
    hooks.add("unet.conv_in", lambda m, a, o: None)
    hooks.refresh()  # objects that are not modules are skipped


def test_a_hook_on_a_model_not_registered_yet_waits_for_refresh(lm: nn.Module) -> None:
    hooks = hooks_on()
    handle = hooks.add("lm.transformer.h.*.attn", lambda m, a, o: None)
    assert handle.modules == [] and handle.attached
    hooks.state.models["lm"] = lm
    hooks.refresh()
    assert handle.modules == ["transformer.h.0.attn", "transformer.h.1.attn"] and hooked(lm) == handle.modules


def test_add_to_a_module_object(lm: nn.Module) -> None:
    hooks = hooks_on()
    calls: list[int] = []
    handle = hooks.add_to(lm, "transformer.h.*.attn", lambda m, a, o: calls.append(1), plugin="p", label="teacher")
    run_lm(lm)
    assert calls == [1, 1] and handle.pattern == "teacher.transformer.h.*.attn"
    hooks.refresh()
    assert hooked(lm) == handle.modules
    handle.detach()
    assert hooked(lm) == []


# -------------------------------------------------------------------- engine
def test_engine_hook_module_is_listed_with_its_plugin(unet: nn.Module) -> None:
    engine = Engine(seed=0)
    engine.state.models["unet"] = unet
    outputs: list[torch.Tensor] = []

    def probe(engine: Engine) -> None:
        engine.hook_module("unet.down_blocks.*.attentions.*", lambda m, a, o: outputs.append(o[0]))

    engine.use(probe, name="probe")
    handle = engine.hook_module("unet.conv_out", lambda m, a: None, kind="forward_pre")
    run_unet(unet)
    assert len(outputs) == 1 and outputs[0].shape == (1, 8, 16, 16)
    rows = [row for row in engine.describe_hooks() if row["point"].startswith("module:")]
    assert rows[0] == {
        "point": "module:unet.down_blocks.*.attentions.*", "kind": "module_forward", "position": 0,
        "function": f"{__name__}:test_engine_hook_module_is_listed_with_its_plugin.<locals>.probe.<locals>.<lambda>",
        "plugin": "probe", "priority": 0, "before": [], "after": [], "filters": {"modules": 1},
    }
    assert rows[1]["kind"] == "module_forward_pre" and rows[1]["plugin"] is None
    handle.detach()
    assert len([row for row in engine.describe_hooks() if row["point"].startswith("module:")]) == 1


def test_the_training_loop_refreshes_when_it_rewraps_models(lm: nn.Module, run_dir) -> None:
    engine = Engine(seed=0, cpu=True, run_dir=run_dir)
    engine.use_defaults({"progress": {"enabled": False}})  # whichever default owns the slot rewrap_models
    engine.state.models["lm"] = lm
    handle = engine.hook_module("lm.transformer.h.*.attn", lambda m, a, o: None)
    fresh = tiny_gpt2(seed=1)
    engine.state.models["lm"] = fresh  # swapped without telling anyone
    engine.call("rewrap_models")
    assert hooked(lm) == [] and hooked(fresh) == handle.modules == ["transformer.h.0.attn", "transformer.h.1.attn"]


def test_distillation_features_are_module_hooks(run_dir) -> None:
    student, teacher = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2))
    engine = Engine(seed=0, run_dir=run_dir)
    engine.state.models.update(student=student, teacher=teacher)
    distill = engine.use(
        "hookengine.routines.distill:Distillation", name="distill", teachers=["teacher"], features={"0": "0"}
    )
    engine.fire("setup")
    rows = [row for row in engine.describe_hooks() if row["point"].startswith("module:")]
    assert [(r["point"], r["plugin"], r["filters"]) for r in rows] == [
        ("module:teacher.0", "distill", {"modules": 1}), ("module:student.0", "distill", {"modules": 1})]
    engine.state.models["student"] = Wrapper(student)  # re-wrapped: still one hook, still captured
    engine.module_hooks.refresh()
    assert len(student[0]._forward_hooks) == 1
    assert float(distill.losses((torch.randn(2, 4), None))["feature"]) > 0
    distill.detach_features()
    assert hooked(student) == hooked(teacher) == [] and len(engine.module_hooks) == 0
