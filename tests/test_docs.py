"""The docs cannot rot: the generated references are current and the guide's code runs.

- docs/HOOKS.md and docs/PLUGIN_OPTIONS.md equal what ``hookengine.docgen`` generates now;
- the code blocks of docs/PLUGINS.md marked ``<!-- docs-test: ... -->`` run: the worked
  example (a plugin module, its use from Python, its recipe) and the user's own loop.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hookengine import Engine
from hookengine.docgen import check_docs, hooks_reference, parse_args_section, plugins_reference

DOCS = Path(__file__).resolve().parent.parent / "docs"
GUIDE = DOCS / "PLUGINS.md"


def test_generated_docs_are_current() -> None:
    stale = check_docs(DOCS)
    assert not stale, f"stale generated docs {stale}: run `python -m hookengine.docgen` and commit docs/"


def test_references_show_options_points_and_order() -> None:
    options = plugins_reference()
    assert "## lr_sched" in options
    warmup = next(line for line in options.splitlines() if line.startswith("| `warmup` |") and "warmup length" in line)
    assert "`int \\| float`" in warmup and "`0`" in warmup  # type as written (pipes escaped), default
    hooks = hooks_reference()
    assert "| `step_end` | event | `loss` |" in hooks
    rows = hooks.split("## Order of the prepared plugins", 1)[1].splitlines()
    start = next(i for i, line in enumerate(rows) if line.startswith("| `before_optimizer_step` (event)"))
    block = [rows[start]]
    for line in rows[start + 1:]:
        if not line.startswith("|  |"):  # the next point's first row
            break
        block.append(line)
    assert any("`lr_sched`" in line for line in block), block
    assert "0x" not in hooks and "/tmp" not in hooks  # deterministic: no addresses, no temp paths
    assert hooks == hooks_reference()


def test_args_section_parser() -> None:
    doc = """Summary.

    Args:
        a: first line
            continued.
        b, c: shared.
        d (int): typed.

    Returns:
        nothing: not an option.
    """
    assert parse_args_section(doc) == {"a": "first line continued.", "b": "shared.", "c": "shared.", "d": "typed."}


def _blocks() -> dict[str, str]:
    text = GUIDE.read_text(encoding="utf-8")
    found = re.findall(r"<!-- docs-test: ([^>]+?) -->\n```[a-z]*\n(.*?)```", text, flags=re.S)
    return {name.strip(): code for name, code in found}


@pytest.fixture
def guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The guide's marked blocks, with ``mypkg.guard`` importable from a temporary folder."""
    blocks = _blocks()
    assert {"file mypkg/guard.py", "run", "recipe", "loop", "loop-run"} <= set(blocks), sorted(blocks)
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "guard.py").write_text(blocks["file mypkg/guard.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the examples write runs/... relative to here
    yield blocks
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_guide_worked_example_runs(guide: dict[str, str], capsys: Any) -> None:
    namespace: dict[str, Any] = {"__name__": "guide"}
    exec(compile(guide["run"], "PLUGINS.md:run", "exec"), namespace)  # noqa: S102 - our own docs
    engine, guard = namespace["engine"], namespace["guard"]
    assert engine.state.clock.step == 16 and guard.seen > 0 and guard.mean > 0
    assert engine.state_dict()["plugins"]["loss_guard"]["mean"] == guard.mean  # checkpointed

    # A spike fires the guard's own event and is scaled down to factor x mean.
    spikes = []
    engine.on("loss_spike", lambda loss, mean: spikes.append((loss, mean)))
    import torch

    mean = guard.mean
    clipped = guard.compute_loss(lambda batch: torch.tensor(100.0 * mean), None)
    assert spikes and spikes[-1] == (pytest.approx(100.0 * mean), mean)
    assert float(clipped) == pytest.approx(3.0 * mean)

    # Its state round-trips through the engine's state (what a checkpoint holds).
    fresh = Engine(seed=0, run_dir=None)
    other = fresh.use(type(guard), factor=3.0)
    fresh.load_state_dict({**engine.state_dict(), "models": {}, "optimizers": {}})
    assert (other.mean, other.seen, other.spikes) == (guard.mean, guard.seen, guard.spikes)


def test_guide_recipe_applies(guide: dict[str, str], tmp_path: Path) -> None:
    from hookengine.recipe import apply_recipe, load_recipe

    (tmp_path / "mypkg" / "data.py").write_text(
        "import torch\n\n"
        "def toy_data(engine, samples: int = 64, batch_size: int = 8):\n"
        "    def register(state):\n"
        "        x = torch.randn(samples, 4)\n"
        "        state.dataloaders['train'] = torch.utils.data.DataLoader(\n"
        "            torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)\n"
        "    engine.on('setup', register)\n"
    )
    recipe = yaml.safe_load(guide["recipe"])
    engine = Engine(seed=0, run_dir=None)
    apply_recipe(engine, load_recipe(recipe))
    assert type(engine.plugins["guard"]).__name__ == "LossSpikeGuard" and engine.plugins["guard"].factor == 3.0
    assert engine.state.plan.max_steps == 16


def test_guide_loop_runs(guide: dict[str, str]) -> None:
    namespace: dict[str, Any] = {"__name__": "guide"}
    exec(compile(guide["run"].split("\nengine = Engine(", 1)[0], "PLUGINS.md:run", "exec"), namespace)  # toy_data
    exec(compile(guide["loop"], "PLUGINS.md:loop", "exec"), namespace)  # noqa: S102
    exec(compile(guide["loop-run"], "PLUGINS.md:loop-run", "exec"), namespace)  # noqa: S102
    engine = namespace["engine"]
    assert "my_loop" in engine.plugins and "trainer" not in engine.plugins
    clock = engine.state.clock  # warm: 4 steps; main: 2 epochs of the same loader (its first one resumes at batch 4)
    assert (clock.phase, clock.phase_epoch, clock.step) == ("main", 2, 16)
    assert (Path("runs/mine") / "metrics.jsonl").is_file()
