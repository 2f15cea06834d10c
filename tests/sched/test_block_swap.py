"""block_swap: results equal the plain path's, and fewer parameter bytes sit on the compute tier.

Both tiers are the CPU here: the compute copies are separate tensors, so "on the compute
tier" is measured as a parameter whose ``.data`` is not its offload tensor (read through
hooks on every leaf module, in forward and in backward). CUDA prefetch is not tested here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hookengine.sched.block_swap import BlockSwap

from .helpers import Stack, make_engine
from .test_memory import assert_same, losses_and_grads, unet_step


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


def watch_compute_bytes(model: torch.nn.Module, offload: list[torch.Tensor]) -> list[int]:
    """Parameter bytes not on their offload tensor, read at every leaf module's forward and backward."""
    stored = {t.untyped_storage().data_ptr() for t in offload}
    seen: list[int] = []

    def count(*_: object) -> None:
        seen.append(sum(p.nbytes for p in model.parameters() if p.data.untyped_storage().data_ptr() not in stored))

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(count)
            module.register_full_backward_pre_hook(count)
    return seen


def train(model: torch.nn.Module, data, accumulation: int = 1) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Plain AdamW (foreach: it steps the swapped weights where they live); losses and gradients per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    losses, grads = [], []
    for i, (x, y) in enumerate(data):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (i + 1) % accumulation == 0:
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the probe on the first layer
@pytest.mark.parametrize("accumulation", [1, 2])
def test_swapped_blocks_train_as_the_plain_model_with_fewer_resident_bytes(accumulation: int) -> None:
    torch.manual_seed(0)
    plain = Stack(width=32, depth=4)
    swapped = copy.deepcopy(plain)
    swap = BlockSwap("model.blocks.*", count=3)
    assert swap.install(swapped, "cpu") == ["blocks.1", "blocks.2", "blocks.3"]
    total = sum(p.nbytes for p in plain.parameters())
    block = sum(p.nbytes for p in plain.blocks[0].parameters())
    refs = []  # saved tensors that were views of a compute copy, kept as references instead
    for swapped_block in swap.swapped:
        pack = swapped_block.pack
        swapped_block.pack = lambda tensor, pack=pack: refs.append(pack(tensor)) or refs[-1]
    plain_seen = watch_compute_bytes(plain, [])
    swap_seen = watch_compute_bytes(swapped, swap.offload_tensors())
    data = batches(4)
    expected_losses, expected_grads = train(plain, data, accumulation)
    losses, grads = train(swapped, data, accumulation)
    assert losses == pytest.approx(expected_losses, rel=1e-6, abs=1e-7)
    for want, got in zip(expected_grads, grads):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7, msg=name)
    assert max(plain_seen) == total
    # one swapped block at a time: the other two never sit on the compute tier
    assert max(swap_seen) == total - 2 * block
    assert swap.resident_bytes == 0  # all offloaded between steps
    # each forward of each swapped block saved its Linear and LayerNorm weights by reference
    assert sum(type(r).__name__ == "_Ref" for r in refs) >= 3 * len(data) * 2
    with torch.no_grad():  # evaluation: no saving at all
        torch.testing.assert_close(swapped(data[0][0]), plain(data[0][0]))


def test_a_transformers_model_swaps_its_layers() -> None:
    from hookengine.testing.tiny_models import build_tiny_causal_lm

    plain = build_tiny_causal_lm(architecture="gpt2")[0]
    plain.config.attn_pdrop = plain.config.resid_pdrop = plain.config.embd_pdrop = 0.0
    plain.eval()  # no dropout: the comparison is exact
    swapped = copy.deepcopy(plain)
    swap = BlockSwap("lm.transformer.h.*")
    assert swap.install(swapped, "cpu") == ["transformer.h.0", "transformer.h.1"]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (plain, swapped):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert swap.resident_bytes == 0 and all(p.grad.device.type == "cpu" for p in swapped.parameters())


def test_lora_on_a_frozen_transformers_model_with_swapped_layers() -> None:
    """PEFT's prefixes are optional in the pattern; only the adapters train, as without swapping."""
    from peft import LoraConfig, get_peft_model

    from hookengine.testing.tiny_models import build_tiny_causal_lm

    base = build_tiny_causal_lm(architecture="gpt2")[0].eval()
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    swapped = copy.deepcopy(plain)
    swap = BlockSwap("lm.transformer.h.*", count=1)
    assert swap.install(swapped, "cpu") == ["transformer.h.1"]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    step = lambda model: model(input_ids=ids, labels=ids).loss  # noqa: E731
    result = losses_and_grads(swapped, step, steps=3)
    assert_same(losses_and_grads(plain, step, steps=3), result)
    assert result[1][0] and all("lora_" in name for name in result[1][0])  # only the adapters have gradients


def test_a_unet_swaps_its_down_and_up_blocks_with_skip_connections() -> None:
    """The down blocks' skip outputs reach their backward after the block's own backward hook:
    the block comes up again, and everything is dropped when the backward pass ends."""
    from hookengine.testing.tiny_models import build_tiny_sd_pipeline

    unet = build_tiny_sd_pipeline().unet.train()
    plain, swapped = copy.deepcopy(unet), copy.deepcopy(unet)
    swaps = [BlockSwap("unet.down_blocks.*"), BlockSwap("unet.up_blocks.*")]
    for swap in swaps:
        swap.install(swapped, "cpu")
    # several steps with a plain optimizer (no engine): each step starts from the updated weights
    assert_same(losses_and_grads(plain, unet_step, steps=3), losses_and_grads(swapped, unet_step, steps=3))
    assert all(swap.resident_bytes == 0 for swap in swaps)


def test_through_the_engine_losses_equal_the_plain_run(tmp_path: Path) -> None:
    runs = {}
    for label, plugins in (("plain", []), ("swap", [(BlockSwap, {"blocks": "model.blocks.*", "count": 2})])):
        engine = make_engine(tmp_path / label, trainer={"max_steps": 4, "lr": 1e-2, "optimizer_options": {"foreach": "auto"}},
                             plugins=plugins)
        losses: list[float] = []
        engine.on("step_end", lambda loss: losses.append(float(loss)))
        engine.use("progress", enabled=False)
        state = engine.run()
        runs[label] = (losses, {k: v.detach().clone() for k, v in state.unwrap(state.models["model"]).state_dict().items()})
    assert runs["swap"][0] == pytest.approx(runs["plain"][0], rel=1e-6)
    for key, value in runs["plain"][1].items():
        torch.testing.assert_close(runs["swap"][1][key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="not MODEL.PATH"):
        BlockSwap("blocks")
    with pytest.raises(ValueError, match="block_swap.count: 5 blocks asked"):
        BlockSwap("model.blocks.*", count=5).install(Stack(depth=3), "cpu")
    with pytest.raises(ValueError, match="matches no module"):
        BlockSwap("model.layers.*").install(Stack(depth=3), "cpu")
