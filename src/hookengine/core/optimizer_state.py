"""Loading an optimizer's checkpointed state while the recipe's hyper-parameters win.

``optimizer.load_state_dict`` restores each param group's ``lr`` and ``weight_decay``
from the checkpoint, so a recipe that lowers the lr for the rest of a run would be
silently ignored on resume. Here the values the run built its optimizer with (the
recipe's) are written back over the saved ones, with one log line per change.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["load_optimizer_state", "base_lr_of_group"]

logger = logging.getLogger(__name__)


def base_lr_of_group(group: dict[str, Any]) -> float | None:
    """The lr a group was built with: ``base_lr`` (schedules), ``initial_lr`` (torch), else ``lr``."""
    for key in ("base_lr", "initial_lr", "lr"):
        if isinstance(group.get(key), (int, float)):
            return float(group[key])
    return None  # an optimizer without a numeric lr: nothing to compare


def load_optimizer_state(optimizers: dict[str, Any], name: str, saved: dict[str, Any]) -> None:
    """Load ``saved`` into ``optimizers[name]``; the recipe's lr and weight decay win."""
    before = optimizers[name]
    recipe = [(base_lr_of_group(g), g.get("weight_decay")) for g in before.param_groups]
    specs = [g.get("optimizer_spec") for g in before.param_groups]
    before.load_state_dict(saved)
    optimizer = optimizers[name]
    groups = optimizer.param_groups
    if optimizer is not before or len(groups) != len(recipe) or [g.get("optimizer_spec") for g in groups] != specs:
        # A patched load (optim_sched) built another phase's optimizer: the values built
        # before the load are not that optimizer's, so there is nothing to compare with.
        return
    changed: dict[str, tuple[Any, Any]] = {}
    for group, (lr, weight_decay) in zip(groups, recipe):
        old_lr = base_lr_of_group(group)
        if old_lr is not None and lr is not None and old_lr != lr:
            changed.setdefault("lr", (old_lr, lr))
            ratio = lr / old_lr if old_lr else None
            for key in ("base_lr", "initial_lr"):
                if key in group:
                    group[key] = lr
            if "scheduled_lr" in group and ratio is not None:
                group["scheduled_lr"] = group["scheduled_lr"] * ratio
            group["lr"] = group["lr"] * ratio if ratio is not None and "base_lr" in group else lr
            # (lr_sched rewrites lr from base_lr before the next step anyway)
        old_wd = group.get("weight_decay")
        if weight_decay is not None and old_wd is not None and old_wd != weight_decay:
            changed.setdefault("weight_decay", (old_wd, weight_decay))
            group["weight_decay"] = weight_decay
    for key, (old, new) in changed.items():
        logger.warning("%s changed on resume: %g → %g (optimizer %r; the recipe wins over the checkpoint)", key, old, new, name)
