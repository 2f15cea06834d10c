"""memory plugin (gradient checkpointing, torch.compile) and train_sched's optimizer kernels:
each equal to the plain path on CPU, with real tiny diffusers / transformers models."""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from hookengine.sched.memory import MemoryPlugin

from .helpers import Stack, make_engine


def losses_and_grads(model: torch.nn.Module, step, steps: int = 2) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """``steps`` SGD steps of ``step(model) -> loss``; the losses and every step's gradients."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses, grads = [], []
    for _ in range(steps):
        loss = step(model)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def assert_same(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a[0] == pytest.approx(b[0], rel=rtol, abs=atol)
    for want, got in zip(a[1], b[1]):
        assert want.keys() == got.keys() and want
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def engine_run(run_dir: Path, plugins=(), **trainer) -> tuple[list[float], dict[str, torch.Tensor], object]:
    engine = make_engine(run_dir, trainer={"max_steps": 3, "lr": 1e-2, **trainer}, plugins=list(plugins))
    engine.use("progress", enabled=False)
    losses: list[float] = []
    engine.on("step_end", lambda loss: losses.append(float(loss)))
    state = engine.run()
    model = state.unwrap(state.models["model"])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, engine


def assert_runs_equal(a, b, rtol: float = 1e-6) -> None:
    assert a[0] == pytest.approx(b[0], rel=rtol) and len(set(a[0])) == len(a[0])  # the weights moved
    for key, value in a[1].items():
        torch.testing.assert_close(b[1][key], value, rtol=rtol, atol=1e-7, msg=key)


# ------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def unet():
    from hookengine.testing.tiny_models import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline().unet


def unet_step(model):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    out = model(sample, torch.tensor([10, 500]), text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(out, torch.zeros_like(out))


def gpt2():
    from hookengine.testing.tiny_models import build_tiny_causal_lm

    model = build_tiny_causal_lm(architecture="gpt2")[0]
    model.train()  # dropout on: checkpointing must replay the same masks
    return model


def lm_step(model):
    torch.manual_seed(5)  # the dropout masks of this step
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(ids, labels=ids).loss


def plugin_on(models: dict[str, torch.nn.Module], **options) -> MemoryPlugin:
    """The plugin applied as at ``setup`` to a state holding ``models``."""
    from hookengine.core.state import State

    state = State()
    state.models.update(models)
    plugin = MemoryPlugin(**options)
    plugin._apply(state)
    return plugin


# ------------------------------------------------------- gradient checkpointing
def test_library_switch_on_a_diffusers_unet_changes_no_value(unet) -> None:
    plain, checkpointed = copy.deepcopy(unet).train(), copy.deepcopy(unet).train()
    plugin = plugin_on({"unet": checkpointed}, gradient_checkpointing=True)
    assert plugin.applied == {"unet": {"checkpointing": "enable_gradient_checkpointing"}}
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert_same(losses_and_grads(plain, unet_step), losses_and_grads(checkpointed, unet_step))


def test_library_switch_on_a_transformers_model_with_dropout_changes_no_value() -> None:
    plain, checkpointed = gpt2(), gpt2()
    plugin = plugin_on({"lm": checkpointed}, gradient_checkpointing={"lm": True})
    assert plugin.applied["lm"]["checkpointing"] in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    calls = {"plain": 0, "checkpointed": 0}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.transformer.h[0].mlp.register_forward_pre_hook(lambda *_, label=label: calls.__setitem__(label, calls[label] + 1))
    assert_same(losses_and_grads(plain, lm_step), losses_and_grads(checkpointed, lm_step))
    # two steps, recomputed in each backward (a pre-hook: torch stops the recomputation early)
    assert calls == {"plain": 2, "checkpointed": 4}


def test_patterns_checkpoint_the_matched_blocks_and_recompute_them(tmp_path: Path) -> None:
    plain = engine_run(tmp_path / "plain")
    calls: list[str] = []
    engine = make_engine(tmp_path / "ckpt", trainer={"max_steps": 3, "lr": 1e-2},
                         plugins=[(MemoryPlugin, {"gradient_checkpointing": ["model.blocks.*"]})])
    engine.use("progress", enabled=False)
    engine.hook_module("model.blocks.1.0", lambda module, args, output: calls.append("fwd"))
    losses: list[float] = []
    engine.on("step_end", lambda loss: losses.append(float(loss)))
    state = engine.run()
    assert engine.plugins["memory"].applied == {"model": {"checkpointing": ["blocks.0", "blocks.1", "blocks.2"]}}
    weights = {k: v.detach().clone() for k, v in state.unwrap(state.models["model"]).state_dict().items()}
    assert_runs_equal(plain, (losses, weights))
    assert len(calls) == 2 * 3  # each step's forward, and its recomputation in backward


def test_checkpointing_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="no gradient checkpointing switch of its own"):
        plugin_on({"model": Stack()}, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"gradient_checkpointing.model: pattern 'layers.\*' matches no module"):
        plugin_on({"model": Stack()}, gradient_checkpointing=["model.layers.*"])
    with pytest.raises(ValueError, match="unknown model 'modle'"):
        plugin_on({"model": Stack()}, gradient_checkpointing={"modle": ["blocks.*"]})


# ------------------------------------------------------------------ compile
def test_compiled_model_through_the_engine_equals_the_plain_run(tmp_path: Path) -> None:
    plain = engine_run(tmp_path / "plain")
    compiled = engine_run(tmp_path / "compiled", plugins=[(MemoryPlugin, {"compile": "model", "compile_options": {"backend": "eager"}})])
    assert compiled[2].plugins["memory"].applied == {"model": {"compiled": "model"}}
    assert_runs_equal(plain, compiled)


def test_regional_compilation_of_a_transformers_model_with_aot_eager() -> None:
    plain, compiled = gpt2(), gpt2()
    plugin = plugin_on({"lm": compiled}, compile="blocks", compile_options={"backend": "aot_eager"})
    assert plugin.applied["lm"]["compiled"] == ["transformer.h.0", "transformer.h.1"]  # GPT2Block, _no_split_modules
    assert compiled.transformer.h[0]._compiled_call_impl is not None
    assert_same(losses_and_grads(plain, lm_step), losses_and_grads(compiled, lm_step))


def test_regional_compilation_of_a_unet_by_its_repeated_blocks(unet) -> None:
    plain, compiled = copy.deepcopy(unet).train(), copy.deepcopy(unet).train()
    plugin = plugin_on({"unet": compiled}, compile="blocks", compile_options={"backend": "eager"})
    assert plugin.applied["unet"]["compiled"] and all(".transformer_blocks." in n for n in plugin.applied["unet"]["compiled"])
    assert_same(losses_and_grads(plain, unet_step), losses_and_grads(compiled, unet_step))


def test_module_hooks_and_adapters_added_after_compilation_take_effect() -> None:
    """Dynamo guards on hooks and children: a later hook or LoRA recompiles, never runs stale."""
    from peft import LoraConfig, inject_adapter_in_model

    from hookengine import Engine

    torch.manual_seed(0)
    plain = Stack()
    compiled = copy.deepcopy(plain)
    engine = Engine(seed=0, cpu=True)
    engine.state.models["model"] = compiled
    plugin_on({"model": compiled}, compile="model", compile_options={"backend": "eager"})
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), plain(x))
    handle = engine.hook_module("model.blocks.1", lambda module, args, output: output * 0)
    plain_handle = plain.blocks[1].register_forward_hook(lambda module, args, output: output * 0)
    torch.testing.assert_close(compiled(x), plain(x))
    handle.detach()
    plain_handle.remove()
    torch.testing.assert_close(compiled(x), plain(x))  # and removing it recompiles too
    config = LoraConfig(r=2, target_modules=["blocks.0.0"], init_lora_weights=False)
    torch.manual_seed(1)
    inject_adapter_in_model(config, compiled)
    torch.manual_seed(1)
    inject_adapter_in_model(config, plain)
    torch.testing.assert_close(compiled(x), plain(x))
    assert not torch.allclose(compiled(x), Stack()(x))


def test_compile_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="lists no repeated blocks"):
        plugin_on({"model": Stack()}, compile="blocks")
    with pytest.raises(ValueError, match="only used with compile: blocks"):
        MemoryPlugin(compile="model", compile_blocks=["model.blocks.*"])
    plugin = plugin_on({"model": Stack()}, compile="blocks", compile_blocks=["model.blocks.*"], compile_options={"backend": "eager"})
    assert plugin.applied["model"]["compiled"] == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.skipif(not os.environ.get("HOOKENGINE_TEST_INDUCTOR"), reason=(
    "inductor takes about 37 s to compile even the tiny MLP on this 2-core machine (limit 30 s); "
    "HOOKENGINE_TEST_INDUCTOR=1 runs it"))
def test_inductor_compiles_a_small_model_equal_to_eager(tmp_path: Path, monkeypatch) -> None:
    """The default backend, once, on the tiny MLP stack (skipped when it is too slow here)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    plain = Stack()
    compiled = copy.deepcopy(plain)
    plugin_on({"model": compiled}, compile="model")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    start = time.perf_counter()
    got = torch.nn.functional.cross_entropy(compiled(x), y)
    got.backward()
    if time.perf_counter() - start > 30:
        pytest.skip("inductor took more than 30 s to compile the tiny model on this machine")
    want = torch.nn.functional.cross_entropy(plain(x), y)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, q in zip(plain.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- optimizers
def test_fused_auto_is_foreach_on_cpu_and_equals_the_for_loop_adamw(tmp_path: Path) -> None:
    loop = engine_run(tmp_path / "loop", optimizer_options={"foreach": False})
    auto = engine_run(tmp_path / "auto", optimizer_options={"fused": "auto"})
    optimizer = auto[2].state.optimizers["main"]
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert loop[2].state.optimizers["main"].defaults["foreach"] is False
    assert_runs_equal(loop, auto, rtol=1e-5)


def test_fused_auto_rules() -> None:
    from hookengine.sched.train import kernel_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    floats = [torch.nn.Parameter(torch.zeros(2))]
    assert kernel_options(torch.optim.AdamW, floats, {"foreach": "auto"}, cpu) == {"foreach": True}
    assert kernel_options(torch.optim.AdamW, floats, {"fused": "auto", "eps": 1e-6}, cuda) == {"eps": 1e-6, "fused": True}
    assert kernel_options(torch.optim.AdamW, [torch.zeros(2, dtype=torch.long)], {"fused": "auto"}, cuda) == {"foreach": True}
    offloaded = torch.nn.Parameter(torch.zeros(2))
    offloaded._hookengine_offloaded = True
    assert kernel_options(torch.optim.AdamW, [offloaded], {"fused": "auto"}, cuda) == {"foreach": True}
    assert kernel_options(torch.optim.AdamW, floats, {"foreach": "auto"}, cuda) == {"fused": True}  # the same rule
    assert kernel_options(torch.optim.AdamW, floats, {"foreach": "auto", "fused": False}, cuda) == {"fused": False, "foreach": True}
    assert kernel_options(torch.optim.AdamW, floats, {"fused": "auto", "foreach": False}, cpu) == {"foreach": False}
    assert kernel_options(torch.optim.AdamW, floats, {"fused": True}, cpu) == {"fused": True}  # passes through
    assert kernel_options(torch.optim.LBFGS, floats, {"fused": "auto"}, cuda) == {}  # takes neither


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
@pytest.mark.parametrize("name", ["AdamW8bit", "bitsandbytes.optim:AdamW8bit"])
def test_8bit_optimizer_without_bitsandbytes_is_one_line_naming_the_package(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"^train_sched.optimizer: .*needs the package 'bitsandbytes'") as info:
        engine_run(tmp_path / "run", optimizer=name)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- precision
def test_bf16_autocast_trains_the_tiny_unet_close_to_fp32(tiny_sd: Path, tmp_path: Path) -> None:
    """A phase with precision bf16 on CPU: the diffusion routine's losses within 1e-2 of fp32."""
    from hookengine import Engine

    from ..routines.test_diffusion import sd_batches

    batches = sd_batches(tiny_sd, count=3)
    runs = {}
    for precision in ("no", "bf16"):
        engine = Engine(seed=0, run_dir=tmp_path / precision, cpu=True)
        engine.use("hookengine.routines.diffusion:DiffusionRoutine", name="diffusion", pipeline=str(tiny_sd), seed=7,
                   sample_at_phase_end=False)
        engine.use("train_sched", phases=[{"name": "train", "steps": 3, "precision": precision}], lr=1e-3)
        engine.use("trainer", eval_at_phase_end=False)
        engine.use("progress", enabled=False)
        engine.on("setup", lambda state: state.dataloaders.update(train=batches))
        autocast: list[bool] = []
        engine.attach("compute_loss", lambda next_impl, batch: autocast.append(torch.is_autocast_enabled("cpu")) or next_impl(batch))
        losses: list[float] = []
        engine.on("step_end", lambda loss: losses.append(float(loss)))
        engine.run()
        runs[precision] = (losses, autocast)
    assert runs["bf16"][1] == [True] * 3 and runs["no"][1] == [False] * 3
    assert runs["bf16"][0] == pytest.approx(runs["no"][0], abs=1e-2)
    assert runs["bf16"][0] != runs["no"][0]  # bf16 really ran


# ------------------------------------------------------------------ recipe
def test_every_option_from_a_recipe_trains_as_the_plain_recipe(run_dir: Path) -> None:
    """Checkpointing, regional compilation, block swap and fused: auto together, from a recipe."""
    from hookengine import Engine

    def recipe(folder: Path, extra: dict) -> dict:
        return {
            "name": "memory", "run_dir": str(folder), "seed": 0,
            "plugins": {"model": {"use": "supervised", "model": "tests.sched.helpers:stack"},
                        "data": {"use": "tests.sched.helpers:data"}, **extra},
            "train_sched": {"max_steps": 4, "lr": 1e-2, "optimizer_options": {"fused": "auto"}},
            "trainer": {"eval_at_phase_end": False}, "checkpoint": {"save_at_end": False},
            "logging": {"every": 1}, "progress": {"enabled": False},
        }

    runs = {}
    extras = {
        "plain": {},
        "all": {
            "memory": {"use": "hookengine.sched.memory:MemoryPlugin", "gradient_checkpointing": {"model": ["blocks.*"]},
                       "compile": "blocks", "compile_blocks": ["model.blocks.*"], "compile_options": {"backend": "eager"}},
            "swap": {"use": "hookengine.sched.block_swap:BlockSwap", "blocks": "model.blocks.*", "count": 2},
        },
    }
    for label, extra in extras.items():
        engine = Engine()
        losses: list[float] = []
        engine.on("step_end", lambda loss: losses.append(float(loss)))
        state = engine.run(recipe(run_dir / label, extra))
        runs[label] = (losses, {k: v.detach().clone() for k, v in state.unwrap(state.models["model"]).state_dict().items()})
    applied = engine.plugins["memory"].applied["model"]
    assert applied == {"checkpointing": ["blocks.0", "blocks.1", "blocks.2"], "compiled": ["blocks.0", "blocks.1", "blocks.2"]}
    assert engine.plugins["swap"].resident_bytes == 0 and len(engine.plugins["swap"].swapped) == 2
    assert_runs_equal(runs["plain"], runs["all"], rtol=1e-5)
