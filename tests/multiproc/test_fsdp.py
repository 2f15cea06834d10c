"""FSDP2 from a recipe on two CPU processes (gloo): equal to DDP, sharded checkpoints that resume
on one and on two processes. One module-scoped set of runs serves all assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_ddp import assert_ok, recipe, single, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DUMP = "tests.multiproc.fsdp_plugins:FullDump"
LORA = {"use": "lora_sched", "model": "model", "adapters": {"a": {"rank": 4, "alpha": 8, "targets": ["6", "9"]}},
        "save": ["peft"]}
STEPS, HALF = 12, 6


def make(tmp: Path, name: str, batch: int, fsdp: bool, lora: bool = False, **checkpoint) -> Path:
    out = tmp / f"{name}-out"
    plugins = {"dump": {"use": DUMP, "folder": str(out)}}
    if lora:
        plugins["lora"] = LORA
    extra = {"runtime": {"fsdp": {"reshard_after_forward": True}}} if fsdp else {}
    path = recipe(tmp, name, batch, STEPS, out, plugins=plugins, **extra)
    text = path.read_text().replace("optimizer: SGD", "optimizer: AdamW").replace("lr: 0.05", "lr: 0.003")
    if checkpoint:
        import yaml

        data = yaml.safe_load(text)
        data["checkpoint"].update(checkpoint)
        text = yaml.safe_dump(data)
    path.write_text(text)
    return path


def result(tmp: Path, name: str, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp / f"{name}-out"
    info = json.loads((out / f"rank{rank}.json").read_text())
    info["losses"] = {int(k): v for k, v in info["losses"].items()}
    return load_file(str(out / f"rank{rank}.safetensors")), info


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    assert_ok(torchrun(make(tmp, "ddp", 16, fsdp=False)))
    assert_ok(torchrun(make(tmp, "fsdp", 16, fsdp=True, every=HALF, keep_last=0)))
    half = tmp / "fsdp" / "checkpoints" / f"step-{HALF:08d}"
    assert_ok(torchrun(make(tmp, "again2", 16, fsdp=True), "--resume", str(half)))
    assert_ok(single(make(tmp, "again1", 32, fsdp=True), "--resume", str(half)))
    assert_ok(torchrun(make(tmp, "lora_ddp", 16, fsdp=False, lora=True)))
    assert_ok(torchrun(make(tmp, "lora_fsdp", 16, fsdp=True, lora=True)))
    return tmp


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, k=key: f"{k}: {m}", **tol)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_equals_ddp_and_is_sharded(runs: Path, lora: bool) -> None:
    ddp, fsdp = ("lora_ddp", "lora_fsdp") if lora else ("ddp", "fsdp")
    for rank in (0, 1):
        w_ddp, i_ddp = result(runs, ddp, rank)
        w_fsdp, i_fsdp = result(runs, fsdp, rank)
        assert i_fsdp["parameter_types"] == ["DTensor"] and i_ddp["parameter_types"] == ["Parameter"]
        assert sorted(i_fsdp["losses"]) == list(range(1, STEPS + 1))
        torch.testing.assert_close(
            torch.tensor([i_fsdp["losses"][s] for s in sorted(i_fsdp["losses"])]),
            torch.tensor([i_ddp["losses"][s] for s in sorted(i_ddp["losses"])]), rtol=1e-5, atol=1e-6)
        close(w_fsdp, w_ddp, rtol=1e-4, atol=1e-6)
    first, last = result(runs, fsdp)[1]["losses"][1], result(runs, fsdp)[1]["losses"][STEPS]
    assert last < first  # it trained
    if lora:  # only the adapters trained: B starts at zero and moved; the shards hold only them
        weights = result(runs, fsdp)[0]
        assert any(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)
        final = runs / fsdp / "checkpoints" / f"step-{STEPS:08d}"
        saved = json.loads((final / "state.json").read_text())["sharded"]["models"]["model"]["tensors"]
        assert saved and all("lora_" in k for k in saved), saved


def test_lora_files_of_an_fsdp_run_hold_the_full_adapter(runs: Path) -> None:
    """Each process holds a shard; the adapter written at the end is the whole one (DDP's)."""
    files = {name: load_file(str(runs / name / "lora" / "a" / "peft" / "model" / "adapter_model.safetensors"))
             for name in ("lora_ddp", "lora_fsdp")}
    assert files["lora_fsdp"] and all("lora_" in k for k in files["lora_fsdp"])
    close(files["lora_fsdp"], files["lora_ddp"], rtol=1e-4, atol=1e-6)


def test_sharded_checkpoint_has_shards_of_both_ranks_and_no_pickle(runs: Path) -> None:
    half = runs / "fsdp" / "checkpoints" / f"step-{HALF:08d}"
    shards = sorted(p.name for p in (half / "shards").iterdir())
    assert len([s for s in shards if s.endswith(".safetensors")]) == 2, shards
    manifest = json.loads((half / "manifest.json").read_text())["files"]
    assert {f"shards/{s}" for s in shards} <= set(manifest)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") or p.name == ".metadata" for p in half.rglob("*"))


@pytest.mark.parametrize("world", [2, 1])
def test_resume_on_another_world_size_continues_the_run(runs: Path, world: int) -> None:
    full_w, full = result(runs, "fsdp", 0)
    _, full1 = result(runs, "fsdp", 1)
    again_w, again = result(runs, f"again{world}", 0)
    assert again["world"] == world
    assert sorted(again["losses"]) == list(range(HALF + 1, STEPS + 1))
    for step in again["losses"]:
        expected = full["losses"][step] if world == 2 else (full["losses"][step] + full1["losses"][step]) / 2
        assert again["losses"][step] == pytest.approx(expected, rel=1e-4, abs=1e-6), step
    close(again_w, full_w, rtol=1e-4, atol=1e-5)


def test_mixed_precision_policy_computes_in_bf16_and_keeps_float32_weights() -> None:
    import subprocess
    import sys

    from .test_ddp import ROOT, env, free_port

    run = subprocess.run([sys.executable, "-m", "tests.multiproc.fsdp_precision", "bf16", str(free_port())],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"output": "torch.bfloat16", "weights": ["torch.float32"], "grads": ["torch.float32"],
                    "types": ["DTensor"], "swapped": True}


@pytest.mark.parametrize(("value", "message"), [
    ({"units": "Block"}, "runtime.fsdp.units: Input should be a valid list"),
    ({"shard": 2}, "runtime.fsdp.shard: Extra inputs are not permitted"),
    ({"mixed_precision": "fp8"}, "runtime.fsdp.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
    ("yes", "runtime.fsdp: expected a mapping of options or true, got str"),
])
def test_bad_fsdp_options_are_one_line_errors_naming_the_key(value: object, message: str) -> None:
    from hookengine.core.runtime import Runtime

    with pytest.raises(ValueError) as caught:
        Runtime(fsdp=value)
    assert str(caught.value) == message
