"""What every training routine shares: it answers ``compute_loss`` in its own phases.

A recipe's phase may name a routine (``phases: [{name: lora, routine: diffusion}]``).
Each routine attaches ``compute_loss`` (and ``eval_step``) with an implementation that
handles the batch when the current phase names it (or names no routine) and otherwise
delegates to the implementation below it. So several routines can be used in one run
and the phases pick among them, with no dispatcher that a user's routine would lack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Routine", "samples_path", "built_by"]


def built_by(model: Any, reference: Any, options: dict[str, Any]) -> Any:
    """Tag ``model`` with the recipe reference (``module:attr``) and options that built it.

    The export writes them into the model's ``hookengine_model.json``, so ``model_loader``
    rebuilds a model made by a factory function (which its class alone cannot name).
    """
    if isinstance(reference, str):
        try:
            object.__setattr__(model, "hookengine_factory", {"class": reference, "options": dict(options)})
        except (AttributeError, TypeError):  # objects that refuse new attributes stay untagged
            pass
    return model


def samples_path(state: Any, extension: str) -> Path:
    """``RUN_DIR/samples/step-XXXX.<extension>`` for the current step."""
    return Path(state.run_dir or "runs/default") / "samples" / f"step-{state.clock.step:04d}.{extension}"


class Routine:
    """Base class for routine plugins: implement :meth:`loss` (and maybe :meth:`metrics`).

    Subclasses set ``name`` (the default plugin name, which phases refer to) and may
    override :meth:`build` (called at the ``setup`` event, to create or fetch models).
    """

    name = "routine"

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._on_setup)
        engine.attach("compute_loss", self._compute_loss)
        engine.attach("eval_step", self._eval_step)
        if callable(getattr(self, "sample", None)):
            engine.attach("sample", self._sample)

    # -- to implement --------------------------------------------------------
    def build(self, state: Any) -> None:
        """Create or fetch models (``state.models``) before training starts."""

    def loss(self, batch: Any) -> Any:
        """The training loss of one batch (a 0-d tensor)."""
        raise NotImplementedError

    def metrics(self, batch: Any) -> dict[str, float]:
        """Evaluation metrics of one batch; by default the loss as ``val_loss``."""
        return {"val_loss": float(self.loss(batch))}

    def write_samples(self, state: Any) -> Path | None:
        """Write samples of the current model into the run folder (routines that sample
        override this); returns the file written."""
        return None

    # -- wiring ----------------------------------------------------------------
    def active(self) -> bool:
        """Whether the current phase runs this routine (a phase naming none runs any)."""
        routine = self.engine.state.phase.routine
        return routine is None or routine == getattr(self, "plugin_name", self.name)

    def _on_setup(self, state: Any) -> None:
        self.build(state)

    def _sample_listener(self, state: Any) -> None:
        # Once per step at most (step_end and phase_end may both ask), on the main process.
        if not state.is_main_process or not self.active() or getattr(self, "_last_sampled", None) == state.clock.step:
            return
        self._last_sampled = state.clock.step
        self.write_samples(state)

    def _compute_loss(self, next_impl: Any, batch: Any) -> Any:
        return self.loss(batch) if self.active() else next_impl(batch)

    def _sample(self, next_impl: Any, **options: Any) -> Any:
        return self.sample(**options) if self.active() else next_impl(**options)  # type: ignore[attr-defined]

    def _eval_step(self, next_impl: Any, batch: Any) -> dict[str, float]:
        return self.metrics(batch) if self.active() else next_impl(batch)
