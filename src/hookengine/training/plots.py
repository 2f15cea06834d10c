"""``loss.png``: training and validation loss against steps, the learning rate on a second axis."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["plot_losses", "loss_figure", "read_records"]


def read_records(metrics_file: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a last line cut by a crash is skipped)."""
    records = []
    for line in Path(metrics_file).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(metrics_file: Path, output: Path) -> Path | None:
    """Plot training loss (and validation loss, if any) against steps into a PNG, with each
    optimizer's learning rate (``lr/NAME`` keys) on a second y axis.

    The PNG is written to a temporary file and renamed, so a viewer never sees half of it.
    Returns ``output``, or ``None`` when there is nothing to plot yet.
    """
    if not Path(metrics_file).is_file():
        return None
    fig = loss_figure(read_records(metrics_file))
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}-", suffix=".png", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the plot is for anyone who can read the run
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return output


def loss_figure(records: list[dict[str, Any]]) -> Any:
    """The matplotlib figure of :func:`plot_losses` for ``metrics.jsonl`` records (``None``
    when they hold no loss): the losses on the first axes, learning rates on a twin axis."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and _is_number(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and _is_number(r.get("val_loss"))]
    lr_keys = sorted({k for r in records if r.get("kind") == "train" for k in r if k.startswith("lr/")})
    if not train and not val:
        return None

    import matplotlib

    matplotlib.use("Agg")  # no display, and the cheapest backend
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lines = []
    if train:
        lines += ax.plot(*zip(*train), color="C0", label="train loss")
    if val:
        lines += ax.plot(*zip(*val), color="C1", marker="o", label="validation loss")
    if all(v > 0 for _, v in train + val):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lr_keys:
        lr_ax = ax.twinx()
        for i, key in enumerate(lr_keys):
            points = [(r["step"], r[key]) for r in records if r.get("kind") == "train" and _is_number(r.get(key))]
            label = "lr" if len(lr_keys) == 1 else key
            lines += lr_ax.plot(*zip(*points), color=f"C{2 + i}", linestyle="--", alpha=0.8, label=label)
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    return fig


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
