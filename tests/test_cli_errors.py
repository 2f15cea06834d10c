"""`hookengine run` in a subprocess: every user error is one line on stderr and exit 2; a
bug shows the end of its traceback, a line pointing to --debug, and exit 1."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hookengine.cli import user_error

# Plugins next to the recipes (found through the recipe's folder, not PYTHONPATH).
PLUGINS = '''
import torch


def data(engine, samples: int = 16, features: int = 4, batch_size: int = 8):
    def register(state):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(samples, features, generator=g)
        y = (x[:, 0] > 0).long()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        state.dataloaders["train"] = state.dataloaders["val"] = loader

    engine.on("setup", register, priority=10)


class Buggy:
    def setup(self, engine):
        engine.on("setup", self.boom)

    def boom(self, state):
        return len(None)  # a bug: TypeError
'''


def base(features: int = 4) -> dict[str, Any]:
    return {
        "name": "cli",
        "runtime": {"cpu": True},
        "trainer": {"max_steps": 2, "eval_at_phase_end": False},
        "progress": {"enabled": False},
        "plugins": {
            "model": {"use": "supervised", "model": "torch.nn:Linear",
                      "model_options": {"in_features": features, "out_features": 2}},
            "data": {"use": "cli_toy:data", "features": features},
        },
    }


def with_plugin(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    recipe = base()
    recipe["plugins"][name] = spec
    return recipe


def run_cli(folder: Path, recipe: Any, *args: str, run_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m hookengine run RECIPE ARGS`` from an unrelated folder; ``recipe`` is a
    file name (``x.yaml``), YAML text or data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cli_toy.py").write_text(PLUGINS)
    if isinstance(recipe, str) and recipe.endswith(".yaml"):
        path = folder / recipe
    else:
        path = folder / "recipe.yaml"
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    if not (isinstance(recipe, dict) and "run_dir" in recipe):
        args = ("--run-dir", str(run_dir or folder / "run"), *args)
    elsewhere = folder.parent / "cwd"
    elsewhere.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TMPDIR": str(folder),
           "PYTHONPATH": "", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "hookengine", "run", str(path), *args]
    return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=180)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("hookengine: error: ") and "Traceback" not in result.stderr
    return lines[0]


BOMB = "a0: &a0 lol\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))

CASES = [
    # (id, recipe, extra args, expected text of the one line)
    ("missing recipe", "missing.yaml", [], "missing.yaml does not exist"),
    ("bad yaml", "trainer: [unclosed\n", [], "is not valid YAML"),
    ("alias bomb", BOMB, [], "MAX_YAML_NODES"),
    ("unknown plugin", with_plugin("x", {"use": "digts"}), [], "unknown plugin 'digts'"),
    ("popen", with_plugin("x", {"use": "subprocess:Popen", "args": ["touch", "MARKER"]}), [],
     "plugins.x.use: 'subprocess:Popen' is not a plugin"),
    ("os.system model", with_plugin("model", {"use": "supervised", "model": "os:system",
                                              "model_options": {"command": "touch MARKER"}}), [],
     "plugins.model.model: 'os:system' is not a model"),
    ("run_dir field", {**base(), "run_dir": "{name.__class__}"}, [], "run_dir: unknown field '{name.__class__}'"),
    ("fp64", base(), ["--set", "runtime.mixed_precision=fp64"], "runtime.mixed_precision"),
    ("nan lr", base(), ["--set", "trainer.lr=.nan"], "Invalid learning rate: nan"),
    ("negative lr", base(), ["--set", "trainer.lr=-1"], "Invalid learning rate: -1"),
    ("batch_size 0", base(), ["--set", "plugins.data.batch_size=0"], "batch_size"),
    ("missing checkpoint", base(), ["--resume", "/nonexistent/step-00000002"], "step-00000002"),
    ("missing model", with_plugin("models", {"use": "model_loader", "models": {"m": "/nonexistent/model"}}), [],
     "/nonexistent/model"),
    ("pickle model", with_plugin("models", {"use": "model_loader", "models": {"m": {
        "source": "PICKLE", "cls": "hookengine.testing.tiny_models:TinyNet"}}}), [],
     "refused to load pickle-based weights"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_and_exit_2(case: tuple, tmp_path: Path) -> None:
    _, recipe, args, expected = case
    marker = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    pickle_file = tmp_path / "weights" / "model.pt"
    pickle_file.parent.mkdir()
    torch.save({"w": torch.zeros(2)}, pickle_file)
    if not isinstance(recipe, str):
        recipe = yaml.safe_load(yaml.safe_dump(recipe).replace("MARKER", str(marker)).replace("PICKLE", str(pickle_file)))
    line = one_line(run_cli(tmp_path / "project", recipe, *args))
    assert expected in line, line
    assert not marker.exists()
    assert len(line) < 1000


def test_a_bug_shows_its_traceback_and_points_to_debug(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "project", with_plugin("buggy", {"use": "cli_toy:Buggy"}))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "TypeError" in result.stderr and "cli_toy.py" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hookengine: internal error (TypeError)") and "--debug" in last


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "project", base(), "--set", "trainer.lr=-1", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "Invalid learning rate" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hookengine: error: Invalid learning rate: -1")


def test_a_full_disk_is_a_user_error(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        recipe = base(features=8192)  # a checkpoint of about 130 KB: more than the disk holds
        recipe["checkpoint"] = {"every": 1}
        line = one_line(run_cli(tmp_path / "project", recipe, run_dir=small / "run"))
        assert line.startswith("hookengine: error: disk full while writing"), line
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_the_user_error_table() -> None:
    """The one place that sorts errors: a few direct checks of what is and is not one."""
    from hookengine.recipe import RecipeError

    assert user_error(RecipeError("trainer.lr: bad")) == "trainer.lr: bad"
    assert user_error(OSError(errno.ENOSPC, "No space left on device")).startswith("disk full")
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert user_error(wrapped).startswith("disk full")
    assert user_error(FileNotFoundError(errno.ENOENT, "No such file", "x.yaml")) is not None
    assert user_error(TypeError("unsupported operand")) is None
    assert user_error(AttributeError("x")) is None
    assert user_error(ZeroDivisionError()) is None


def test_export_without_a_recorded_recipe_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "hookengine", "export", str(tmp_path / "norun")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


def test_export_rebuilds_a_run_from_its_recorded_recipe(tmp_path: Path) -> None:
    """run records RUN_DIR/recipe.yaml (its plugins next to the recipe); export rebuilds it
    from another folder."""
    run_dir = tmp_path / "run"
    result = run_cli(tmp_path / "project", base(), run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": ""}
    exported = subprocess.run([sys.executable, "-m", "hookengine", "export", str(run_dir), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"  model: {tmp_path / 'out' / 'model'}" in exported.stdout and (tmp_path / "out" / "model").is_dir()
