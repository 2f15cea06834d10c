"""Metrics to JSONL and a loss plot, written into the run folder by the main process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..core.state import as_number

__all__ = ["MetricsLogger", "plot_losses"]


class MetricsLogger:
    """Append training and evaluation metrics to ``RUN_DIR/metrics.jsonl``; plot the loss.

    Args:
        every: log training metrics every N optimizer steps.
        file: the JSONL file name inside the run folder.
        plot: write ``loss.png`` when the run ends.
    """

    name = "logging"

    def __init__(self, every: int = 10, file: str = "metrics.jsonl", plot: bool = True) -> None:
        if every < 1:
            raise ValueError("logging.every must be >= 1")
        self.every = every
        self.file = file
        self.plot = plot
        self.records: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("step_end", self._log_step, every=self.every)
        engine.on("evaluate_end", self._log_eval)
        engine.on("checkpoint_loaded", self._rewind)
        engine.on("run_end", self._finish)
        engine.on("exception", self._finish_on_error)

    @property
    def path(self) -> Path | None:
        run_dir = self.engine.state.run_dir
        return Path(run_dir) / self.file if run_dir else None

    def _record(self, kind: str, values: dict[str, Any]) -> None:
        state = self.engine.state
        clock = state.clock
        record = {
            "kind": kind,
            "step": clock.step,
            "epoch": clock.epoch,
            "phase": clock.phase,
            "samples": clock.samples,
            "time": round(time.perf_counter() - self._t0, 4),
            **{k: as_number(v) for k, v in values.items()},
        }
        self.records.append(record)
        path = self.path
        if path is not None and state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_step(self, state: Any) -> None:
        values: dict[str, Any] = {k: v for k, v in state.metrics.items() if not k.startswith("val_")}
        for name, optimizer in state.optimizers.items():
            values[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
        self._record("train", values)

    def _log_eval(self, state: Any, metrics: dict[str, Any]) -> None:
        self._record("eval", metrics)

    def _rewind(self, state: Any) -> None:
        """After a resume, drop records past the checkpoint so the file matches the run."""
        step = state.clock.step
        self.records = [r for r in self.records if r["step"] <= step]
        path = self.path
        if path is None or not path.exists() or not state.is_main_process:
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)

    def _finish(self, state: Any) -> None:
        if self.plot and state.is_main_process and self.path is not None:
            plot_losses(self.path, self.path.parent / "loss.png")

    def _finish_on_error(self, state: Any, error: BaseException) -> None:
        # Keep what was measured before the failure: the plot is still useful.
        try:
            self._finish(state)
        except Exception:  # noqa: BLE001 - never mask the original error
            pass


def plot_losses(metrics_file: Path, output: Path) -> Path | None:
    """Plot training loss (and validation loss, if any) against steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(metrics_file).is_file():
        return None
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval" and "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = output.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(output)
    return output
