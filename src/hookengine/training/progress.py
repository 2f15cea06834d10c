"""A progress bar over optimizer steps (tqdm), on the main process only."""

from __future__ import annotations

from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """Show steps, the loss and the learning rate while training.

    Args:
        enabled: show the bar at all.
        refresh_every: update the loss and learning rate shown every N steps (reading the
            loss is a host sync on a GPU; advancing the bar reads nothing).
    """

    name = "progress"

    def __init__(self, enabled: bool = True, refresh_every: int = 10) -> None:
        self.enabled = enabled
        self.refresh_every = max(1, refresh_every)
        self.bar: Any = None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        if not self.enabled:
            return
        engine.on("resume", self._open, priority="last")  # after the checkpoint is loaded
        engine.on("step_end", self._advance)
        engine.on("step_end", self._describe, every=self.refresh_every)
        engine.on("teardown", self._close)

    def _open(self, state: Any) -> None:
        if not state.is_main_process:
            return
        from tqdm.auto import tqdm

        total = state.total_steps
        self.bar = tqdm(total=total, initial=state.clock.step, unit="step", dynamic_ncols=True, mininterval=0.5)

    def _advance(self, state: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _describe(self, state: Any) -> None:
        if self.bar is None:
            return
        # The only tensor read (a host sync on a GPU), every refresh_every steps, never per step.
        shown = {"phase": state.clock.phase}
        if "loss" in state.metrics:
            shown["loss"] = f"{state.metric('loss'):.4g}"
        for name, optimizer in state.optimizers.items():
            groups = getattr(optimizer, "param_groups", None)
            if groups:
                key = "lr" if len(state.optimizers) == 1 else f"lr/{name}"
                shown[key] = f"{float(groups[0]['lr']):.3g}"
        self.bar.set_postfix(shown, refresh=False)

    def _close(self, state: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
