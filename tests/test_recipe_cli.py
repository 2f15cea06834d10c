"""Recipes and the CLI: validation messages, overrides, hooks listing, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hookengine import Engine
from hookengine.cli import main
from hookengine.recipe import RecipeError, apply_recipe, load_recipe


def test_demo_recipe_loads_and_overrides_apply() -> None:
    recipe = load_recipe("digits_classifier", ["trainer.lr=1e-4", "plugins.digits.batch_size=64", "name=other"])
    assert recipe.trainer["lr"] == 1e-4
    assert recipe.plugins["digits"]["batch_size"] == 64
    assert recipe.run_dir.format(name=recipe.name) == "runs/other"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trainr": {}}, r"trainr: unknown key \(did you mean 'trainer'\?\)"),
        ({"seed": "abc"}, r"seed: .*integer"),
        ({"runtime": {"mixed_precison": "no"}}, r"runtime.mixed_precison: unknown key \(did you mean 'mixed_precision'\?\)"),
        ({"trainer": {"lr": "fast"}}, r"trainer.lr: expected float or null, got 'fast'"),
        ({"trainer": {"epocs": 2}}, r"trainer.epocs: unknown option \(did you mean 'epochs'\?\)"),
        ({"plugins": {"digits": {"use": "digts"}}}, r"unknown plugin 'digts' \(did you mean 'digits'\?\)"),
        ({"plugins": {"digits": {"batch_size": 3}}}, r"plugins.digits: needs a 'use' key"),
        ({"plugins": {"digits": {"use": "digits", "batch_sise": 3}}}, r"plugins.digits.batch_sise: unknown option \(did you mean 'batch_size'\?\)"),
        ({"phases": [{"name": "a", "stepz": 3}]}, r"phases.0.stepz: unknown phase setting \(did you mean 'steps'\?\)"),
        ({"trainer": {"nonfinite": "explode"}}, r"trainer.nonfinite: expected"),
    ],
)
def test_broken_recipes_name_the_key(change: dict, message: str) -> None:
    data = yaml.safe_load(Path(__file__).parents[1].joinpath("src/hookengine/recipes/digits_classifier.yaml").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "runtime":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(RecipeError, match=message):
        apply_recipe(Engine(), load_recipe(data))


def test_unreadable_recipes(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match=r"does not exist \(did you mean 'digits_classifier'\?\)"):
        load_recipe("digits_clasifier")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed")
    with pytest.raises(RecipeError, match="bad.yaml is not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(listy)
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(None, ["trainer.lr"])


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "none.yaml does not exist" in err and "Traceback" not in err


def test_cli_version_and_plugins(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "hookengine 0.1.0" in capsys.readouterr().out
    assert main(["plugins"]) == 0
    assert "supervised" in capsys.readouterr().out


def test_cli_hooks_lists_points_plugins_and_order(capsys) -> None:
    assert main(["hooks", "digits_classifier"]) == 0
    out = capsys.readouterr().out
    assert "slot compute_loss" in out and "classifier: hookengine.routines.base:Routine._compute_loss" in out
    assert "slot run" in out and "trainer: hookengine.training.trainer:TrainingLoop._run  [priority=-1000]" in out
    assert "event step_end" in out and "every=10" in out


@pytest.mark.slow
def test_classifier_recipe_runs_from_the_command_line_and_learns(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hookengine", "run", "digits_classifier", "--run-dir", str(tmp_path / "demo"),
         "--set", "progress.enabled=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert final["val_accuracy"] >= 0.95
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 5000
    assert list((tmp_path / "demo" / "checkpoints").glob("step-*"))
