"""Checkpoints you can trust: hashes checked on load, fallback to the newest valid one,
no moment without a visible checkpoint, leftovers cleaned, resume messages, run shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hookengine import Engine
from hookengine.training import checkpoint_files
from hookengine.training.checkpoint import (
    CheckpointError, CorruptCheckpointError, checkpoints_in, latest_checkpoint, load_tree, save_tree, write_checkpoint,
)
from hookengine.training.checkpoint_files import MANIFEST, clean_stale, step_of
from hookengine.training.run_signature import compare_signatures


def tree() -> dict:
    torch.manual_seed(0)
    return {"w": torch.randn(64, 8), "b": torch.arange(5), "pair": (1, "a"), "n": 3}


def flip_byte(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def digits_engine(run_dir: Path, batch_size: int = 16, **checkpoint) -> Engine:
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("digits", batch_size=batch_size)
    engine.use("supervised", model="hookengine.demo.digits:DigitsConvNet")
    trainer = checkpoint.pop("trainer", {})
    engine.use_defaults({
        "trainer": {"lr": 0.002, "eval_at_phase_end": False, **trainer},
        "checkpoint": checkpoint,
        "logging": {"plot": False},
        "progress": {"enabled": False},
    })
    return engine


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.state.models["model"].state_dict().items()}


# ---------------------------------------------------------------- 1. manifest
def test_flipped_bytes_in_tensor_data_are_detected(tmp_path: Path) -> None:
    path = write_checkpoint(tree(), tmp_path, 3, keep_last=0)
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"tensors.safetensors", "state.json"}
    assert torch.equal(load_tree(path)["w"], tree()["w"])  # intact: loads
    flip_byte(path / "tensors.safetensors")  # inside the last tensor's data: safetensors still parses it
    with pytest.raises(CorruptCheckpointError, match=r"step-00000003: tensors\.safetensors does not match its sha256") as info:
        load_tree(path)
    assert "\n" not in str(info.value)


def test_truncated_file_and_broken_manifest_are_named(tmp_path: Path) -> None:
    path = write_checkpoint(tree(), tmp_path, 4, keep_last=0)
    meta = path / "state.json"
    meta.write_text(meta.read_text()[:-1])
    with pytest.raises(CorruptCheckpointError, match=r"state\.json has \d+ bytes, its manifest says \d+"):
        load_tree(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json cannot be read"):
        load_tree(path)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda enc: enc.__setitem__("w", {"__tensor__": "t99"}), r"state\.w refers to tensor 't99', which tensors\.safetensors does not have"),
        (lambda enc: enc.__setitem__("pair", {"__tuple__": 5}), r"state\.pair: __tuple__ must be a list"),
        (lambda enc: enc.__setitem__("n", {"__dtype__": "float99"}), r"state\.n names an unknown torch dtype 'float99'"),
        (lambda enc: enc.__setitem__("n", {"__items__": [[1]]}), r"state\.n: __items__ must be a list of \[key, value\] pairs"),
    ],
)
def test_a_state_file_with_wrong_types_or_dangling_tensors_is_one_line(tmp_path: Path, edit, problem) -> None:
    folder = tmp_path / "ck"
    save_tree(tree(), folder)
    encoded = json.loads((folder / "state.json").read_text())
    edit(encoded)
    (folder / "state.json").write_text(json.dumps(encoded))
    checkpoint_files._write_manifest(folder, ["tensors.safetensors", "state.json"])  # consistent files, bad content
    with pytest.raises(CorruptCheckpointError, match=r"ck: state\.json: " + problem) as info:
        load_tree(folder)
    assert "\n" not in str(info.value)


def test_a_state_file_that_does_not_fit_the_engine_is_a_checkpoint_error(run_dir: Path) -> None:
    engine = digits_engine(run_dir, trainer={"max_steps": 2})
    engine.run()
    path = latest_checkpoint(run_dir / "checkpoints")
    encoded = json.loads((path / "state.json").read_text())
    encoded["clock"]["step"] = "two"
    (path / "state.json").write_text(json.dumps(encoded))
    checkpoint_files._write_manifest(path, ["tensors.safetensors", "state.json"])
    with pytest.raises(CheckpointError, match=r"step-00000002: state\.json: clock\.step is 'two', expected an integer"):
        engine.call("load_checkpoint", path)
    encoded["clock"]["step"] = 2
    del encoded["optimizers"]["main"]
    (path / "state.json").write_text(json.dumps(encoded))
    checkpoint_files._write_manifest(path, ["tensors.safetensors", "state.json"])
    with pytest.raises(CheckpointError, match=r"step-00000002: state\.json does not fit this run: checkpoint has no optimizers") as info:
        engine.call("load_checkpoint", path)
    assert "\n" not in str(info.value).split(" raised in")[0]


# ---------------------------------------------------- 2. fallback + 6. messages
def test_resume_falls_back_to_the_newest_valid_checkpoint_and_stays_exact(tmp_path: Path, capsys) -> None:
    reference = digits_engine(tmp_path / "ref", trainer={"max_steps": 8})
    reference.run()

    first = digits_engine(tmp_path / "run", every=2, keep_last=3, trainer={"max_steps": 6})
    first.run()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints_in(folder)] == ["step-00000002", "step-00000004", "step-00000006"]
    flip_byte(folder / "step-00000006" / "tensors.safetensors")
    capsys.readouterr()

    resumed = digits_engine(tmp_path / "run", resume="latest", trainer={"max_steps": 8})
    resumed.run()
    out = capsys.readouterr().out
    assert "resume: skipping checkpoint" in out and "step-00000006: tensors.safetensors does not match" in out
    assert f"resumed from {folder / 'step-00000004'} (step 4)" in out
    got, want = weights(resumed), weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_nothing_to_resume_says_so_and_required_fails(run_dir: Path, capsys) -> None:
    engine = digits_engine(run_dir, resume="latest", save_at_end=False, trainer={"max_steps": 1})
    engine.run()
    assert f"no checkpoint in {run_dir / 'checkpoints'}; starting from scratch" in capsys.readouterr().out
    strict = digits_engine(run_dir, resume="required", save_at_end=False, trainer={"max_steps": 1})
    with pytest.raises(CheckpointError, match="checkpoint.resume=required, but there is no checkpoint in") as info:
        strict.run()
    assert "\n" not in str(info.value).split(" raised in")[0]
    assert strict.state.clock.step == 0


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(run_dir: Path) -> None:
    digits_engine(run_dir, trainer={"max_steps": 2}).run()
    flip_byte(run_dir / "checkpoints" / "step-00000002" / "tensors.safetensors")
    engine = digits_engine(run_dir, resume="latest", trainer={"max_steps": 3})
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*: all 1 are damaged"):
        engine.run()


# ------------------------------------------------------------------ 3. no window
def test_saving_the_same_step_again_never_leaves_it_invisible(tmp_path: Path, monkeypatch) -> None:
    write_checkpoint({"v": torch.zeros(3)}, tmp_path, 5, keep_last=2)
    seen: list[list[str]] = []
    real_rename = Path.rename

    def watching_rename(self: Path, target):  # the real rename; then look at what --resume would see
        result = real_rename(self, target)
        seen.append([p.name for p in checkpoints_in(tmp_path) if step_of(p.name)[0] == 5])
        return result

    monkeypatch.setattr(Path, "rename", watching_rename)
    write_checkpoint({"v": torch.ones(3)}, tmp_path, 5, keep_last=2)
    monkeypatch.undo()
    assert seen and all(visible for visible in seen), seen
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step-00000005"]
    assert torch.equal(load_tree(tmp_path / "step-00000005")["v"], torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_copy_left_between_the_two_renames_is_the_newest(tmp_path: Path) -> None:
    write_checkpoint({"v": torch.zeros(1)}, tmp_path, 5, keep_last=0)
    write_checkpoint({"v": torch.ones(1)}, tmp_path, 5, keep_last=0)
    (tmp_path / "step-00000005").rename(tmp_path / "step-00000005-1")  # killed before the last rename
    write_checkpoint({"v": torch.zeros(1)}, tmp_path, 4, keep_last=0)
    assert latest_checkpoint(tmp_path).name == "step-00000005-1"
    write_checkpoint({"v": torch.full((1,), 2.0)}, tmp_path, 5, keep_last=0)  # saved again: one copy
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step-00000004", "step-00000005"]
    assert load_tree(latest_checkpoint(tmp_path))["v"].item() == 2.0


def test_pruning_keeps_the_checkpoint_just_written(tmp_path: Path) -> None:
    for step in (3, 9):
        write_checkpoint({"s": step}, tmp_path, step, keep_last=1)
    write_checkpoint({"s": 5}, tmp_path, 5, keep_last=1)  # a run resumed from step 3 writes step 5
    assert [p.name for p in checkpoints_in(tmp_path)] == ["step-00000005", "step-00000009"]


# ----------------------------------------------------------------- 4. leftovers
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_cleaned_at_start(run_dir: Path, capsys) -> None:
    folder = run_dir / "checkpoints"
    folder.mkdir()
    dead = dead_pid()
    for name in (f".step-00000003.tmp-{dead}", f".step-00000002.old-{dead}", f".step-00000004.tmp-{os.getppid()}"):
        (folder / name).mkdir()
        (folder / name / "tensors.safetensors").write_bytes(b"half")
    (folder / "step-00000009").mkdir()  # empty: not a checkpoint
    assert sorted(clean_stale(folder)) == [f".step-00000002.old-{dead}", f".step-00000003.tmp-{dead}", "step-00000009"]
    assert sorted(p.name for p in folder.iterdir()) == [f".step-00000004.tmp-{os.getppid()}"]  # a live process's
    (folder / f".step-00000005.tmp-{dead}").mkdir()
    digits_engine(run_dir, save_at_end=False, trainer={"max_steps": 1}).run()
    assert f"removed 1 leftover(s) of killed runs in {folder}: .step-00000005.tmp-{dead}" in capsys.readouterr().out


# ------------------------------------------------------------------- 7. run shape
def test_a_changed_batch_size_or_accumulation_is_refused_naming_the_change(tmp_path: Path) -> None:
    run = tmp_path / "run"
    digits_engine(run, trainer={"max_steps": 2}).run()
    bigger = digits_engine(run, batch_size=32, resume="latest", trainer={"max_steps": 3})
    with pytest.raises(CheckpointError, match=r"another shape: processes x batch size of phase 'train': 1 x 16 → 1 x 32"):
        bigger.run()
    accumulate = digits_engine(run, resume="latest", trainer={"max_steps": 3, "gradient_accumulation_steps": 2})
    with pytest.raises(CheckpointError, match=r"gradient accumulation of phase 'train': 1 → 2"):
        accumulate.run()
    anyway = digits_engine(run, batch_size=32, resume="latest", shape_check="warn", trainer={"max_steps": 3})
    anyway.run()
    assert anyway.state.clock.step == 3


def test_signature_rules() -> None:
    def sig(procs, batch, acc=1, names=("a", "b")):
        return {"num_processes": procs, "phases": [{"name": n, "data": "train", "accumulation": acc, "batch_size": batch} for n in names]}

    clock = {"step": 5, "micro_step": 5, "phase_index": 0}
    assert compare_signatures(sig(2, 16), sig(2, 16), clock) == ([], [])
    refuse, handled = compare_signatures(sig(2, 16), sig(1, 32), clock)
    assert not refuse and handled == ["processes x batch size of phase 'a': 2 x 16 → 1 x 32 (the same global batch)"]
    assert compare_signatures(sig(2, 16), sig(2, 8), clock)[0]
    assert compare_signatures(sig(1, 16), sig(1, 16, names=("x", "b")), clock)[0] == ["phase 0: 'a' → 'x'"]
    # a phase not begun may change; nothing trained yet: anything may change
    assert compare_signatures(sig(1, 16, names=("a", "b")), sig(1, 16, names=("a", "c")), clock) == ([], [])
    assert compare_signatures(sig(1, 16), sig(4, 64, acc=3), {"step": 0, "micro_step": 0}) == ([], [])
    assert compare_signatures(None, sig(1, 16), clock) == ([], [])  # a checkpoint from before signatures
