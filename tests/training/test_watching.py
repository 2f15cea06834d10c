"""Watching a run: trackers (TensorBoard, read back), the live loss plot with the learning rate,
the end-of-run summary, and no host sync per step from the logging and the progress bar."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hookengine import Engine


def toy_data(engine: Any, samples: int = 64, batch_size: int = 8) -> None:
    """A linear regression problem: 8 batches per epoch, and a validation loader."""
    def register(state: Any) -> None:
        x = torch.randn(samples, 4, generator=torch.Generator().manual_seed(0))
        data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
        state.dataloaders["train"] = torch.utils.data.DataLoader(data, batch_size=batch_size)
        state.dataloaders["val"] = torch.utils.data.DataLoader(data, batch_size=32)

    engine.on("setup", register)


def toy_engine(run_dir: Path, logging: dict[str, Any], defaults: dict[str, Any] | None = None, **trainer: Any) -> Engine:
    engine = Engine(seed=0, run_dir=run_dir, cpu=True)
    engine.use(toy_data)
    engine.use("supervised", model="torch.nn:Linear", model_options={"in_features": 4, "out_features": 1}, loss="mse_loss")
    engine.use("lr_sched", schedule="cosine", warmup=4)
    options = {"trainer": {"lr": 0.05, **trainer}, "progress": {"enabled": False}, "logging": logging, **(defaults or {})}
    engine.use_defaults(options)
    return engine


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ trackers
def test_tensorboard_events_hold_the_values_of_metrics_jsonl(run_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = toy_engine(run_dir, {"every": 2, "log_with": "tensorboard", "project": "toy"}, max_steps=12, eval_every=6)
    engine.run()
    written = records(run_dir)
    events = EventAccumulator(str(run_dir / "trackers" / "toy"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for kind, tag in (("train", "loss"), ("train", "lr/main"), ("eval", "val_loss")):
        expected = [(r["step"], r[tag]) for r in written if r["kind"] == kind]
        assert tag in scalars and len(expected) >= 2
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 in the file
    # The hyperparameters: the plan, since this run has no recipe.
    hparams = list((run_dir / "trackers" / "toy").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "plan.lr: 0.05" in hparams[0].read_text()


def test_a_resumed_run_purges_the_tensorboard_events_past_its_checkpoint(run_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto import event_pb2
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    logging = {"every": 2, "log_with": "tensorboard", "project": "toy"}
    toy_engine(run_dir, logging, {"checkpoint": {"every": 4}}, max_steps=8).run()
    shutil.rmtree(run_dir / "checkpoints" / "step-00000008")  # as if killed between steps 4 and 8
    resumed = toy_engine(run_dir, logging, {"checkpoint": {"every": 4, "resume": "latest"}}, max_steps=10, lr=0.02)
    resumed.run()
    files = sorted((run_dir / "trackers" / "toy").glob("events.out.tfevents.*"))
    assert len(files) == 2
    written_events = list(LegacyEventFileLoader(str(files[1])).Load())  # the resumed writer's file
    starts = [e for e in written_events if e.session_log.status == event_pb2.SessionLog.START]
    assert [e.step for e in starts] == [5]  # TensorBoard discards the older events from step 5 on
    events = EventAccumulator(str(run_dir / "trackers" / "toy"))
    events.Reload()
    written = [(r["step"], r["loss"]) for r in records(run_dir) if r["kind"] == "train"]
    assert [s for s, _ in written] == [2, 4, 6, 8, 10]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in written]


def test_recipe_trackers_get_the_recipe_as_hyperparameters(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from hookengine.training.trackers import flat_hparams

    engine = Engine(seed=0)
    recipe = {
        "name": "toyrun", "run_dir": str(tmp_path / "{name}"), "defaults": True,
        "plugins": {
            "data": {"use": f"{__name__}:toy_data"},
            "supervised": {"use": "supervised", "model": "torch.nn:Linear", "loss": "mse_loss",
                           "model_options": {"in_features": 4, "out_features": 1}},
        },
        "train_sched": {"max_steps": 4, "lr": 0.01},
        "logging": {"every": 2, "log_with": ["tensorboard"]},
        "progress": {"enabled": False},
    }
    engine.run(recipe)
    (hparams,) = (tmp_path / "toyrun" / "trackers" / "toyrun").glob("*/hparams.yml")
    import yaml

    stored = yaml.safe_load(hparams.read_text())
    assert stored == flat_hparams(engine.state.config)
    assert stored["train_sched.lr"] == 0.01 and stored["plugins.supervised.loss"] == "mse_loss"


SEEN: list[tuple[str, Any]] = []  # what the tracker below was given


def _list_tracker_class() -> type:
    """A tracker of one's own: an accelerate GeneralTracker that keeps what it is given."""
    from accelerate.tracking import GeneralTracker

    class Listing(GeneralTracker):
        name = "listing"
        requires_logging_directory = False

        def __init__(self, run_name: str, tag: str = "") -> None:
            super().__init__()
            self.run_name, self.tag = run_name, tag

        @property
        def tracker(self) -> Any:
            return SEEN

        def store_init_configuration(self, values: dict) -> None:
            SEEN.append(("config", values))

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            SEEN.append((f"{self.tag}{self.run_name}@{step}", values.get("loss", values.get("val_loss"))))

        def finish(self) -> None:
            SEEN.append(("finish", None))

    return Listing


def test_a_tracker_class_of_ones_own_and_all(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    import types

    module = types.ModuleType("watching_trackers")
    module.Listing = _list_tracker_class()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "watching_trackers", module)
    SEEN.clear()
    engine = toy_engine(run_dir, {"every": 2, "log_with": ["all", "watching_trackers:Listing"],
                                  "tracker_options": {"watching_trackers:Listing": {"tag": "t:"}}}, max_steps=4)
    engine.run()
    written = [(f"t:run@{r['step']}", r.get("loss", r.get("val_loss"))) for r in records(run_dir)]
    assert SEEN[0][0] == "config" and SEEN[-1] == ("finish", None)
    assert SEEN[1:-1] == written and len(written) == 3  # steps 2 and 4, and the phase-end evaluation
    assert list((run_dir / "trackers" / "run").glob("events.out.tfevents.*"))  # "all": tensorboard is installed


def test_unknown_or_missing_tracker_is_one_clear_line(run_dir: Path) -> None:
    from hookengine.recipe import RecipeError

    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        Engine().use("logging", log_with="tensorbord")
    with pytest.raises(ValueError, match=r"'hookengine.training.trackers:flat_hparams' is not an accelerate.tracking.GeneralTracker"):
        Engine().use("logging", log_with="hookengine.training.trackers:flat_hparams")
    missing = next((name for name, module in (("wandb", "wandb"), ("mlflow", "mlflow"), ("aim", "aim"))
                    if importlib.util.find_spec(module) is None), None)
    if missing is None:
        pytest.skip("wandb, mlflow and aim are all installed")
    with pytest.raises(RecipeError) as error:
        Engine().run({"run_dir": str(run_dir), "logging": {"log_with": ["tensorboard", missing]}})
    message = str(error.value)
    assert "\n" not in message and f"tracker {missing!r} needs the package {missing!r}" in message
    assert message.startswith("logging: logging.log_with:")
    with pytest.raises(ValueError, match=r"tracker_options: \['wandb'\] are not in logging.log_with"):
        Engine().use("logging", tracker_options={"wandb": {}})


# ------------------------------------------------------------------ the plot
def test_loss_plot_is_refreshed_during_the_run_and_shows_the_lr(run_dir: Path) -> None:
    from hookengine.training.plots import loss_figure

    engine = toy_engine(run_dir, {"every": 2, "plot_every": 6}, max_steps=16, eval_every=8)
    snapshots: dict[int, bytes | None] = {}

    def look(state: Any) -> None:
        path = run_dir / "loss.png"
        snapshots[state.clock.step] = path.read_bytes() if path.exists() else None

    engine.on("step_end", look, priority="last")  # after the logger
    engine.run()
    assert snapshots[4] is None  # nothing plotted before the first plot_every steps
    assert snapshots[6] is not None and snapshots[6][:8] == b"\x89PNG\r\n\x1a\n"
    assert snapshots[11] == snapshots[6] and snapshots[12] != snapshots[6]  # refreshed every 6 steps
    assert (run_dir / "loss.png").read_bytes() != snapshots[12]  # and once more at the end
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left

    written = records(run_dir)
    figure = loss_figure(written)
    loss_axes, lr_axes = figure.axes
    by_label = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    train = [r for r in written if r["kind"] == "train"]
    assert list(by_label["train loss"].get_ydata()) == [r["loss"] for r in train]
    assert list(by_label["lr"].get_xdata()) == [r["step"] for r in train]
    assert list(by_label["lr"].get_ydata()) == [r["lr/main"] for r in train]
    assert by_label["lr"] in lr_axes.get_lines() and loss_axes.get_yscale() == "log"
    assert list(by_label["validation loss"].get_xdata()) == [8, 16, 16]  # every 8, and at the phase end


# --------------------------------------------------------------- the summary
def test_summary_names_final_metrics_speed_and_outputs(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = toy_engine(run_dir, {"every": 4}, {"checkpoint": {"every": 4}}, max_steps=8)

    @engine.on("run_end")
    def export(state: Any) -> None:  # what an adapter export at the end of a run leaves
        folder = run_dir / "lora" / "default"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
        (folder / "adapter_config.json").write_text("{}")

    engine.run()
    out = capsys.readouterr().out
    last = records(run_dir)[-1]  # the phase-end evaluation
    train = [r for r in records(run_dir) if r["kind"] == "train"][-1]
    assert "finished at step 8/8, epoch 0 (8 steps in " in out and " samples/s)" in out
    assert f"loss {train['loss']:.4g}" in out and f"lr {train['lr/main']:.4g}" in out and "lr/main" not in out  # one optimizer: its lr once
    assert f"val_loss {last['val_loss']:.4g}" in out
    assert re.search(rf"{re.escape(str(run_dir))}/checkpoints/ +2 checkpoints, newest step-00000008\n", out)
    assert f"{run_dir / 'metrics.jsonl'}" in out and f"{run_dir / 'loss.png'}" in out
    assert re.search(rf"{re.escape(str(run_dir))}/lora/ +2 files in default/\n", out)
    assert "stopped early" not in out


def test_summary_says_why_a_run_stopped_or_failed(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = toy_engine(run_dir, {"every": 1}, max_steps=20)
    engine.on("step_end", lambda state: state.control.stop("loss is low enough"), once=3)
    engine.run()
    out = capsys.readouterr().out
    assert "stopped early at step 3/20" in out and "  stopped early: loss is low enough" in out

    failing = toy_engine(run_dir.parent / "failing", {"every": 1}, max_steps=20)

    @failing.on("step_end", once=2)
    def explode(state: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing.run()
    assert "run failed (RuntimeError) at step 2" in capsys.readouterr().out


# ------------------------------------------------------ no per-step host sync
def test_logging_and_progress_read_tensors_only_when_they_report(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way Python reads a tensor's value is counted between the first and the last
    step_end listener: steps where neither the logger (every 5) nor the bar (every 4) reports
    must read nothing."""
    engine = toy_engine(run_dir, {"every": 5, "plot": False}, {"progress": {"refresh_every": 4}},
                        max_steps=20, nonfinite="ignore")
    reads = [0]
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__format__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step: dict[int, int] = {}
    engine.on("step_end", lambda: per_step.__setitem__("start", reads[0]), priority=10_000)
    engine.on("step_end", lambda state: per_step.__setitem__(state.clock.step, reads[0] - per_step["start"]),
              priority=-10_000)
    engine.run()
    quiet = [step for step in range(1, 21) if step % 5 and step % 4]
    assert all(per_step[step] == 0 for step in quiet), {s: per_step[s] for s in quiet}
    assert per_step[5] > 0 and per_step[4] > 0  # the counter sees the reads that do happen


# ------------------------------------------------------------- two processes
@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_track_and_summarise_once(tmp_path: Path) -> None:
    """Under torchrun, only the main process writes tracker files and prints the summary."""
    pytest.importorskip("tensorboard")
    import os
    import socket
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[2]
    recipe = {
        "name": "two", "run_dir": str(tmp_path / "two"),
        "plugins": {
            "data": {"use": f"{__name__}:toy_data"},
            "supervised": {"use": "supervised", "model": "torch.nn:Linear", "loss": "mse_loss",
                           "model_options": {"in_features": 4, "out_features": 1}},
        },
        "trainer": {"max_steps": 4, "lr": 0.01, "optimizer": "SGD"},
        "checkpoint": {"every": 0},
        "logging": {"every": 2, "log_with": "tensorboard"},
        "progress": {"enabled": False},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "hookengine", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "TMPDIR": str(tmp_path)}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run two finished at step 4/4") == 1, result.stdout
    tracked = tmp_path / "two" / "trackers" / "two"
    assert len(list(tracked.glob("events.out.tfevents.*"))) == 1 and len(list(tracked.glob("*/hparams.yml"))) == 1
    train = [r for r in records(tmp_path / "two") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # one file, written once
