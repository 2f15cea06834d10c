"""Metrics to JSONL, experiment trackers, a live loss plot and the end-of-run summary.

Everything is written by the main process. Tensors in ``state.metrics`` are read (a host
sync on a GPU) only when a record is written, every ``logging.every`` steps, never per step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..core.state import as_number
from .plots import plot_losses
from .summary import run_summary

__all__ = ["MetricsLogger", "plot_losses"]


class MetricsLogger:
    """Append training and evaluation metrics to ``RUN_DIR/metrics.jsonl`` (and to experiment
    trackers); keep ``loss.png`` up to date; print a summary when the run ends.

    Args:
        every: log training metrics every N optimizer steps.
        file: the JSONL file name inside the run folder.
        plot: write ``loss.png`` (loss, validation loss, learning rate) in the run folder.
        plot_every: refresh ``loss.png`` while training, at the first log at or after every
            N optimizer steps; 0: only when the run ends. Default: every 10 logs but at most
            once in 30 seconds, so a fast run spends next to nothing on plotting.
        log_with: experiment trackers, by accelerate's names (``tensorboard``, ``wandb``,
            ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``,
            ``trackio``), ``all`` (those installed) or ``module:attr`` of an
            ``accelerate.tracking.GeneralTracker`` class; one name or a list. They get every record of ``metrics.jsonl`` and the
            recipe (or the plan) as hyperparameters.
        project: the trackers' project / run name (default: the recipe's name, else the
            run folder's name).
        tracker_dir: where trackers that write files (TensorBoard) write them, inside the
            run folder (``RUN_DIR/trackers/PROJECT/`` for TensorBoard).
        tracker_options: tracker name -> keyword arguments for its accelerate class
            (``{wandb: {entity: me}}``, ``{tensorboard: {flush_secs: 30}}``).
        summary: print the final metrics, the speed, why the run ended and where its
            outputs are, when the run ends.
    """

    name = "logging"

    def __init__(
        self,
        every: int = 10,
        file: str = "metrics.jsonl",
        plot: bool = True,
        plot_every: int | None = None,
        log_with: str | list[str] | None = None,
        project: str | None = None,
        tracker_dir: str = "trackers",
        tracker_options: dict[str, dict[str, Any]] | None = None,
        summary: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError("logging.every must be >= 1")
        if plot_every is not None and plot_every < 0:
            raise ValueError("logging.plot_every must be >= 0 (0: plot only when the run ends)")
        self.every = every
        self.file = file
        self.plot = plot
        self.plot_every = 10 * every if plot_every is None else plot_every
        self.plot_interval_s = 30.0 if plot_every is None else 0.0
        self.log_with = [log_with] if isinstance(log_with, str) else list(log_with or [])
        if self.log_with:
            from .trackers import check_trackers

            check_trackers(self.log_with)  # a missing package fails now, not after setup
        unknown = sorted(set(tracker_options or {}) - set(self.log_with))
        if unknown and "all" not in self.log_with:
            raise ValueError(f"logging.tracker_options: {unknown} are not in logging.log_with {self.log_with}")
        self.project = project
        self.tracker_dir = tracker_dir
        self.tracker_options = dict(tracker_options or {})
        self.summary = summary
        self.records: list[dict[str, Any]] = []
        self.trackers: list[Any] | None = None  # started on the main process at the first record
        self._t0 = time.perf_counter()
        self._start = (self._t0, 0, 0)  # time, step and samples when this session started training
        self._last_plot = 0
        self._last_plot_time = time.perf_counter()
        self._ended: tuple[str, float, int, int] | None = None  # outcome, seconds, steps, samples

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("resume", self._begin, priority="last")  # after a checkpoint is loaded
        engine.on("step_end", self._log_step, every=self.every)
        engine.on("evaluate_end", self._log_eval)
        engine.on("checkpoint_loaded", self._rewind)
        engine.on("run_end", self._finish, priority="last")
        engine.on("exception", self._finish_on_error)
        engine.on("teardown", self._close, priority="last")  # after the progress bar closed

    @property
    def path(self) -> Path | None:
        run_dir = self.engine.state.run_dir
        return Path(run_dir) / self.file if run_dir else None

    # ------------------------------------------------------------- records
    def _begin(self, state: Any) -> None:
        clock = state.clock
        self._start = (time.perf_counter(), clock.step, clock.samples)
        self._last_plot, self._last_plot_time = clock.step, self._start[0]
        self._start_trackers(state)

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
        if not state.is_main_process:
            return
        path = self.path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._track(record)

    def _log_step(self, state: Any) -> None:
        values: dict[str, Any] = {k: v for k, v in state.metrics.items() if not k.startswith("val_")}
        for name, optimizer in state.optimizers.items():
            values[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
        self._record("train", values)
        if self.plot and self.plot_every and state.clock.step - self._last_plot >= self.plot_every:
            now = time.perf_counter()
            if now - self._last_plot_time >= self.plot_interval_s:
                self._last_plot, self._last_plot_time = state.clock.step, now
                self._plot(state)

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

    # ------------------------------------------------------------ trackers
    def _start_trackers(self, state: Any) -> None:
        if self.trackers is not None or not self.log_with or not state.is_main_process:
            return
        from .trackers import flat_hparams, start_trackers

        run_dir = Path(state.run_dir or "runs/default")
        config = state.config or {
            "plan": dataclasses.asdict(state.plan),
            "plugins": list(self.engine.plugin_names),
        }
        options = {name: dict(values) for name, values in self.tracker_options.items()}
        if state.clock.step > 0:
            # A resumed run: TensorBoard drops the events the checkpoint does not cover (as
            # _rewind drops those lines of metrics.jsonl), so its curves do not fork.
            options.setdefault("tensorboard", {}).setdefault("purge_step", state.clock.step + 1)
        self.trackers = []  # set first: a tracker that fails to start is not retried every record
        self.trackers = start_trackers(
            self.log_with, self.project or _project_name(state), run_dir / self.tracker_dir,
            config=flat_hparams(config), options=options,
        )

    def _track(self, record: dict[str, Any]) -> None:
        if not self.log_with:
            return
        if self.trackers is None:
            self._start_trackers(self.engine.state)  # a loop that fires no resume event
        values = {k: v for k, v in record.items()
                  if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers or []:
            tracker.log(values, step=record["step"])

    # -------------------------------------------------------------- the end
    def _plot(self, state: Any) -> None:
        if self.plot and state.is_main_process and self.path is not None:
            plot_losses(self.path, self.path.parent / "loss.png")

    def _finish(self, state: Any) -> None:
        self._plot(state)
        outcome = "stopped early" if state.control.stop_requested else "finished"
        self._note_end(state, outcome)

    def _finish_on_error(self, state: Any, error: BaseException) -> None:
        # Keep what was measured before the failure: the plot and the outputs are still useful.
        try:
            self._plot(state)
            # A SystemExit (a signal's graceful stop) ended the run on purpose: not a failure.
            outcome = "stopped" if isinstance(error, SystemExit) else f"failed ({type(error).__name__})"
            self._note_end(state, outcome)
        except Exception:  # noqa: BLE001 - never mask the original error
            pass

    def _note_end(self, state: Any, outcome: str) -> None:
        if self._ended is None:
            t_start, step0, samples0 = self._start
            self._ended = (outcome, time.perf_counter() - t_start, state.clock.step - step0, state.clock.samples - samples0)

    def _close(self, state: Any) -> None:
        # Printed at teardown: every run_end listener (final checkpoint, exports) has written
        # its files, and the progress bar is closed, so the two do not interleave.
        ended, self._ended = self._ended, None
        if ended is not None and self.summary and state.is_main_process:
            outcome, seconds, steps, samples = ended
            try:
                print(run_summary(state, seconds, steps, samples, outcome), flush=True)
            except Exception:
                if not outcome.startswith("failed"):
                    raise
                # a failed run's state may be half-built: its own error is the one to see
        for tracker in self.trackers or []:
            tracker.finish()
        if self.trackers is not None:
            self.trackers = []  # finished: not started again by a late record


def _project_name(state: Any) -> str:
    name = state.config.get("name") if isinstance(state.config, dict) else None
    if name:
        return str(name)
    return Path(state.run_dir).name if state.run_dir else "hookengine"
