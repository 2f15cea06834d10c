"""The end-of-run summary: final metrics, speed, why the run ended, and where its outputs are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.state import as_number

__all__ = ["final_metrics", "describe_outputs", "run_summary"]


def final_metrics(state: Any) -> dict[str, float]:
    """The run's last numbers: every numeric metric (train first, then ``val_*``) and each
    optimizer's learning rate as ``lr/NAME``."""
    values: dict[str, float] = {}
    for key, value in state.metrics.items():
        value = as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = value
    optimizers = {n: o for n, o in state.optimizers.items() if getattr(o, "param_groups", None)}
    for name, optimizer in optimizers.items():
        lr = float(as_number(optimizer.param_groups[0]["lr"]))
        if len(optimizers) == 1 and values.get("lr") == lr:
            continue  # the logged lr already says it
        values[f"lr/{name}"] = lr
    train = {k: v for k, v in values.items() if not k.startswith("val_")}
    return {**train, **{k: v for k, v in values.items() if k.startswith("val_")}}


def describe_outputs(run_dir: str | Path | None) -> list[tuple[str, str]]:
    """What the run folder holds, read from the disk: (path, what it is) per top-level entry.

    Folders of ``step-*`` folders are checkpoints (count and newest); other folders are
    listed with their number of files (exported models, LoRA weights, samples, trackers).
    """
    if run_dir is None or not Path(run_dir).is_dir():
        return []
    rows = []
    for entry in sorted(Path(run_dir).iterdir()):
        if entry.name.startswith(".") or entry.suffix == ".lock":
            continue  # temporary files being written, the run's lock
        if entry.is_file():
            rows.append((str(entry), _size(entry.stat().st_size)))
            continue
        children = sorted(p for p in entry.iterdir() if not p.name.startswith("."))
        steps = [p.name for p in children if p.is_dir() and p.name.startswith("step-")]
        if steps:
            rows.append((f"{entry}/", f"{len(steps)} checkpoint{'s' * (len(steps) != 1)}, newest {steps[-1]}"))
            continue
        files = [p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")]
        shown = ", ".join(p.name + "/" * p.is_dir() for p in children[:3]) + (", ..." if len(children) > 3 else "")
        rows.append((f"{entry}/", f"{len(files)} file{'s' * (len(files) != 1)} in {shown}" if files else "empty"))
    return rows


def run_summary(
    state: Any,
    elapsed_s: float,
    steps_done: int,
    samples_done: int,
    outcome: str = "finished",
) -> str:
    """The text printed when a run ends (``outcome``: ``finished``, ``stopped early`` or ``failed: ...``)."""
    clock = state.clock
    total = _safe_total(state)
    steps = f"step {clock.step}" + (f"/{total}" if total else "")
    speed = f", {samples_done / elapsed_s:.1f} samples/s" if elapsed_s > 0 and samples_done else ""
    name = state.config.get("name") if isinstance(state.config, dict) else None
    lines = [f"run {name + ' ' if name else ''}{outcome} at {steps}, epoch {clock.epoch} "
             f"({steps_done} steps in {elapsed_s:.1f} s{speed})"]
    reason = state.control.stop_requested
    if reason:
        lines.append(f"  stopped early: {reason}")
    metrics = final_metrics(state)
    if metrics:
        lines.append("  final: " + ", ".join(f"{k} {_number(v)}" for k, v in metrics.items()))
    outputs = describe_outputs(state.run_dir)
    if outputs:
        lines.append(f"  outputs in {state.run_dir}:")
        width = max(len(path) for path, _ in outputs)
        lines += [f"    {path:<{width}}  {what}" for path, what in outputs]
    return "\n".join(lines)


def _safe_total(state: Any) -> int | None:
    try:
        return state.total_steps
    except Exception:  # noqa: BLE001 - a failed run may have no plan, or loaders without a length
        return None


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return ""
