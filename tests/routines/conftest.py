"""Small helpers shared by the routine tests (the tiny models come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# tiny_sd and tiny_lm come from tests/conftest.py.


def quiet_engine(run_dir: Path, plugins: dict[str, Any] | None = None, **trainer: Any) -> Any:
    """An engine with the default plugins, no progress bar, and the given trainer options."""
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    # logging.every=1: with fewer steps than `every` and no evaluation, the logger's plot
    # step finds no metrics file (reported to the lead; not ours to fix here).
    options = {"trainer": trainer, "progress": {"enabled": False}, "logging": {"every": 1}, **(plugins or {})}
    engine.use_defaults(options)
    return engine


def record_losses(engine: Any) -> list[float]:
    """The loss of every optimizer step, as floats."""
    losses: list[float] = []
    engine.on("step_end", lambda state, loss: losses.append(float(loss)))
    return losses
