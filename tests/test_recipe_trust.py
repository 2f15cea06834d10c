"""Recipes are data: references resolve only to what their key asks for, YAML has limits,
run_dir is not str.format, pickles are refused through index files, the recipe's folder is
importable, the Python API keeps the defaults, and a run records its resolved recipe."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hookengine import Engine
from hookengine.core.plugins import PluginError, check_reference, model_factory, recipe_callable, resolve
from hookengine.recipe import (
    MAX_RECIPE_BYTES,
    RecipeError,
    apply_recipe,
    expand_run_dir,
    load_recipe,
    load_run_recipe,
    save_run_recipe,
)

# A quick problem for runs: a linear classifier on 4 random features (no data download).
DATA = "tests.test_recipe_trust:toy_data"


def toy_data(engine: Any, samples: int = 32) -> None:
    def register(state: Any) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(samples, 4, generator=g)
        y = (x[:, 0] > 0).long()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        state.dataloaders["train"] = state.dataloaders["val"] = loader

    engine.on("setup", register, priority=10)


def run_recipe(run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "trainer": {"max_steps": 2, "eval_at_phase_end": False},
        "runtime": {"cpu": True},
        "plugins": {
            "model": {"use": "supervised", "model": "torch.nn:Linear", "model_options": {"in_features": 4, "out_features": 2}},
            "data": {"use": DATA},
        },
        **extra,
    }


@pytest.fixture(autouse=True)
def _keep_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # recipes add their folder


# ------------------------------------------------------------------ 1. references
def test_use_of_a_non_plugin_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    recipe = {"plugins": {"x": {"use": "subprocess:Popen", "args": ["touch", str(marker)]}}}
    with pytest.raises(RecipeError, match=r"^plugins\.x\.use: 'subprocess:Popen' is not a plugin") as info:
        apply_recipe(Engine(), load_recipe(recipe))
    assert len(str(info.value).splitlines()) == 1
    time.sleep(0.2)  # a Popen would have had time to touch the file
    assert not marker.exists()


def test_a_model_key_that_names_a_shell_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    recipe = run_recipe(tmp_path / "run")
    recipe["plugins"]["model"] = {"use": "supervised", "model": "os:system", "model_options": {"command": f"touch {marker}"}}
    with pytest.raises(RecipeError, match=r"plugins\.model\.model: 'os:system' is not a model"):
        Engine(cpu=True).run(recipe)
    assert not marker.exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss", "os:system", r"plugins\.model\.loss: 'os:system' is not a loss"),
        ("loss", "shutil:rmtree", r"plugins\.model\.loss: 'shutil:rmtree' is not a loss"),
        ("model", "torch:load", r"plugins\.model\.model: 'torch:load' is not a model"),
        ("model", "hookengine.recipe:_Loader.__init__.__globals__", r"private attribute '__init__'"),
    ],
)
def test_every_reference_key_checks_its_kind(key: str, value: str, message: str, tmp_path: Path) -> None:
    recipe = run_recipe(tmp_path / "run")
    recipe["plugins"]["model"][key] = value
    with pytest.raises(RecipeError, match=message):
        apply_recipe(Engine(cpu=True), load_recipe(recipe))


@pytest.mark.parametrize("reference", ["builtins:exec", "builtins:eval", "os:system", "pickle:loads", "importlib:import_module"])
def test_standard_library_callables_are_never_plugins(reference: str) -> None:
    with pytest.raises(PluginError, match="from the standard library"):
        resolve(reference, "plugin", "plugins.x.use")
    with pytest.raises(PluginError, match="from the standard library"):
        resolve(reference)  # call sites that name no kind get the floor check


def build_net(width: int = 3) -> Any:
    return torch.nn.Linear(4, width)


def annotated_net() -> torch.nn.Linear:
    return torch.nn.Linear(4, 2)


def test_what_a_model_key_accepts() -> None:
    assert resolve("torch.nn:Linear", "model") is torch.nn.Linear
    assert resolve("tests.test_recipe_trust:annotated_net", "model") is annotated_net  # return annotation
    with pytest.raises(PluginError, match="not marked for that use"):
        resolve("tests.test_recipe_trust:build_net", "model")
    check_reference(model_factory(build_net), "model", "tests.test_recipe_trust:build_net")
    with pytest.raises(PluginError, match="is not a loss"):
        check_reference(build_net, "loss", "x:build_net")  # marked for models only
    check_reference(recipe_callable("loss")(build_net), "loss", "x:build_net")
    assert resolve("torch.nn.functional:cross_entropy", "loss") is torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="unknown kind"):
        recipe_callable("nonsense")


# ---------------------------------------------------------------- 2. YAML limits
def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="MAX_YAML_NODES") as info:
        load_recipe(path)
    assert time.perf_counter() - start < 0.5
    assert "bomb.yaml" in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(RecipeError, match="MAX_YAML_NODES"):
        load_recipe(None, ["trainer.x=" + "{" + billion_laughs().replace("\n", ", ").rstrip(", ") + "}"])


def test_too_many_aliases_deep_nesting_and_big_files_are_refused(tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 1500) + "]\n")
    with pytest.raises(RecipeError, match="MAX_YAML_ALIASES"):
        load_recipe(many)
    deep = tmp_path / "deep.yaml"
    deep.write_text("trainer: " + "[" * 5000 + "]" * 5000 + "\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="MAX_YAML_DEPTH"):
        load_recipe(deep)
    assert time.perf_counter() - start < 0.5
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (MAX_RECIPE_BYTES + 1) + "\n")
    with pytest.raises(RecipeError, match="MAX_RECIPE_BYTES"):
        load_recipe(big)
    # Anchors in ordinary use still work.
    fine = tmp_path / "fine.yaml"
    fine.write_text("trainer: &t {max_steps: 3}\ncheckpoint: {every: 2}\nlogging: {every: 1}\n")
    assert load_recipe(fine).trainer == {"max_steps": 3}


def test_error_messages_do_not_print_huge_values() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe({"seed": "x" * 100_000})
    assert len(str(info.value)) < 400 and "100002 chars" in str(info.value)
    with pytest.raises(RecipeError) as info:
        apply_recipe(Engine(), load_recipe({"trainer": {"lr": "y" * 100_000}}))
    assert len(str(info.value)) < 400


# -------------------------------------------------------------- 3. run_dir fields
@pytest.mark.parametrize(
    "run_dir", ["{name.__class__.__mro__}", "{x}", "{name!r}", "{name:>99999}", "{0}", "{name[0]}", "{", "runs/}"]
)
def test_run_dir_allows_only_plain_known_fields(run_dir: str) -> None:
    with pytest.raises(RecipeError, match=r"^run_dir: ") as info:
        load_recipe({"run_dir": run_dir})
    assert len(str(info.value).splitlines()) == 1


def test_run_dir_fields_are_filled() -> None:
    assert load_recipe({"name": "a", "seed": 3, "run_dir": "runs/{name}-{seed}/{{x}}"}).resolved_run_dir() == "runs/a-3/{x}"
    assert expand_run_dir("runs/{name}", name="b") == "runs/b"


# ------------------------------------------------------ 4. pickles through an index
def sharded_pickle_model(folder: Path, shard: str = "weights-part") -> Path:
    """A tiny causal LM whose weights are a torch pickle under a neutral name, reached
    through pytorch_model.bin.index.json (what transformers reads when there are no
    safetensors)."""
    from safetensors.torch import load_file

    from hookengine.testing import save_tiny_causal_lm

    save_tiny_causal_lm(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / shard)
    index = {"metadata": {}, "weight_map": {name: shard for name in state}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def test_a_pickle_reached_through_an_index_is_refused(tmp_path: Path) -> None:
    from hookengine.models.loader import load_model
    from hookengine.models.safety import UnsafeFileError, check_file, check_folder, looks_like_pickle

    folder = sharded_pickle_model(tmp_path / "lm")
    assert looks_like_pickle(folder / "weights-part")
    with pytest.raises(UnsafeFileError, match=r"weights-part' \(a shard of pytorch_model.bin.index.json\)"):
        load_model(str(folder))
    with pytest.raises(UnsafeFileError):
        check_file(folder / "pytorch_model.bin.index.json")
    with pytest.raises(UnsafeFileError):
        check_file(folder / "weights-part")  # a neutral name, a pickle inside
    check_folder(folder, allow_pickle=True)  # allowed for this load: the check passes


def test_a_safetensors_index_must_point_at_safetensors(tmp_path: Path) -> None:
    from hookengine.models.safety import ModelLoadError, UnsafeFileError, check_folder

    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "model-00001-of-00001.bin.renamed")
    index = {"weight_map": {"w": "model-00001-of-00001.bin.renamed"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match="a shard of model.safetensors.index.json"):
        check_folder(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(ModelLoadError, match="points outside its folder"):
        check_folder(folder)


def test_a_model_folder_cannot_name_a_command_as_its_class(tmp_path: Path) -> None:
    from hookengine.models.loader import load_model
    from hookengine.models.safety import ModelLoadError

    marker = tmp_path / "PWNED"
    folder = tmp_path / "net"
    folder.mkdir()
    spec = {"class": "os:system", "options": {"command": f"touch {marker}"}}
    (folder / "hookengine_model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="'os:system' is not a model"):
        load_model(str(folder), kind="torch")
    assert not marker.exists()


# ------------------------------------------------- 6. recipe-relative module:attr
PLUGIN_SOURCE = '''
class CaptionTokenizer:
    """A plugin that lives next to the recipe."""

    def __init__(self, prefix: str = "a photo of") -> None:
        self.prefix = prefix

    def setup(self, engine) -> None:
        engine.state.config["caption_prefix"] = self.prefix
'''


def test_the_recipe_folder_is_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "trust_myplugins.py").write_text(PLUGIN_SOURCE)
    recipe = folder / "recipe.yaml"
    recipe.write_text("plugins:\n  captions: {use: trust_myplugins:CaptionTokenizer, prefix: hello}\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    monkeypatch.delitem(sys.modules, "trust_myplugins", raising=False)
    engine = Engine()
    apply_recipe(engine, load_recipe(recipe))
    assert engine.plugins["captions"].prefix == "hello"
    monkeypatch.delitem(sys.modules, "trust_myplugins", raising=False)


def test_a_failed_import_says_where_it_looked(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("plugins:\n  captions: {use: trust_nosuchplugins:CaptionTokenizer}\n")
    with pytest.raises(RecipeError) as info:
        apply_recipe(Engine(), load_recipe(recipe))
    message = str(info.value)
    assert message.startswith("plugins.captions.use: cannot import module 'trust_nosuchplugins'")
    assert str(tmp_path) in message and "sys.path (starts" in message
    assert "put trust_nosuchplugins.py next to the recipe" in message


# --------------------------------------------------- 7. the Python API's defaults
def test_configuring_one_default_keeps_the_others(tmp_path: Path) -> None:
    engine = Engine(seed=0, run_dir=tmp_path / "api", cpu=True)
    engine.use("supervised", model="torch.nn:Linear", model_options={"in_features": 4, "out_features": 2})
    engine.use(toy_data)
    engine.use("trainer", max_steps=3)
    engine.run()
    assert {"train_sched", "checkpoint", "logging", "progress"} <= set(engine.plugins)
    assert (tmp_path / "api" / "metrics.jsonl").is_file()
    assert list((tmp_path / "api" / "checkpoints").glob("step-*"))

    bare = Engine(seed=0, run_dir=tmp_path / "bare", cpu=True, defaults=False)
    bare.use("train_sched")
    bare.use("trainer", max_steps=1, eval_at_phase_end=False)
    bare.use("supervised", model="torch.nn:Linear", model_options={"in_features": 4, "out_features": 2})
    bare.use(toy_data)
    bare.run()
    assert set(bare.plugins) == {"train_sched", "trainer", "supervised", "toy_data"}
    assert not (tmp_path / "bare" / "checkpoints").exists()


# ------------------------------------------------------ 9. the run's own recipe
def test_a_run_records_its_resolved_recipe(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    Engine().run(run_recipe(run_dir), overrides=["trainer.lr=0.05", "checkpoint.resume=latest"])
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["trainer"]["lr"] == 0.05 and saved["run_dir"] == str(run_dir)
    assert "resume" not in saved["checkpoint"]  # how it was started, not what it is
    recipe = load_run_recipe(run_dir)
    assert recipe.plugins["model"]["model"] == "torch.nn:Linear" and recipe.trainer["lr"] == 0.05
    # Re-read from the run folder (export does this) and recorded again: the same run.
    save_run_recipe(recipe, run_dir)
    assert "held a different recipe" not in capfd.readouterr().err and not (run_dir / "recipe.1.yaml").exists()

    # The same recipe again (a resume): nothing to say. Another one: the old file is kept.
    Engine().run(run_recipe(run_dir), overrides=["trainer.lr=0.05", "trainer.max_steps=3"])
    assert "held a different recipe" in capfd.readouterr().err
    assert yaml.safe_load((run_dir / "recipe.1.yaml").read_text()) == saved
    assert load_run_recipe(run_dir).trainer["max_steps"] == 3
    with pytest.raises(RecipeError, match="did not record its recipe"):
        load_run_recipe(tmp_path)
