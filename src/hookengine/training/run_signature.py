"""The shape of a run, saved in each checkpoint and compared on resume.

A resume continues the same training only if each optimizer step still sees the same
samples: the batch size per process times the number of processes (the *global* batch,
which the samplers cut the data into) and the gradient accumulation of the phase the
checkpoint is in, and the phases up to it must be the same. The number of processes alone
may change when the global batch stays the same (2 processes x 16 continue as 1 x 32).
Phases not begun yet may change freely.

The values come from ``state.plan`` and the loaders in ``state.dataloaders`` (their
``batch_size``, or their batch sampler's), never from another plugin.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["run_signature", "compare_signatures", "loader_batch_size"]


def loader_batch_size(loader: Any) -> int | None:
    """Samples per batch on each process of ``loader`` (``None`` when it does not say)."""
    for obj in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(obj, "batch_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def run_signature(state: Any, num_processes: int) -> dict[str, Any]:
    """What a resume must agree with: processes and, per phase, its data, accumulation and batch size."""
    plan = state.plan
    return {
        "num_processes": int(num_processes),
        "phases": [
            {
                "name": phase.name,
                "data": phase.data,
                "accumulation": plan.accumulation_of(phase),
                "batch_size": loader_batch_size(state.dataloaders.get(phase.data)),
            }
            for phase in plan.phases
        ],
    }


def compare_signatures(saved: Any, current: Mapping[str, Any], clock: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(changes that break an exact resume, changes that are handled)``, each ``what: old → new``.

    ``clock`` is the checkpoint's clock: its phase is the one that must keep its shape.
    """
    if not isinstance(saved, Mapping) or not isinstance(saved.get("phases"), list):
        return [], []  # a checkpoint from before signatures: nothing to compare
    if not any(clock.get(key) for key in ("step", "micro_step")):
        return [], []  # nothing trained yet
    refuse: list[str] = []
    handled: list[str] = []
    index = int(clock.get("phase_index", 0) or 0)
    old_phases, new_phases = saved["phases"], list(current["phases"])
    for i in range(min(index, len(old_phases) - 1) + 1):
        old = old_phases[i] if isinstance(old_phases[i], Mapping) else {}
        new = new_phases[i] if i < len(new_phases) else None
        if new is None:
            refuse.append(f"phase {i}: {old.get('name')!r} → (none)")
            continue
        if old.get("name") != new["name"]:
            refuse.append(f"phase {i}: {old.get('name')!r} → {new['name']!r}")
            continue
        if i < index:
            continue  # a finished phase: only its place in the order matters
        where = f"phase {new['name']!r}"
        if old.get("data") != new["data"]:
            refuse.append(f"data of {where}: {old.get('data')!r} → {new['data']!r}")
        if old.get("accumulation") != new["accumulation"]:
            refuse.append(f"gradient accumulation of {where}: {old.get('accumulation')} → {new['accumulation']}")
        refuse_batch, handled_batch = _batches(old.get("batch_size"), new["batch_size"], saved.get("num_processes"),
                                               current["num_processes"], where)
        refuse += refuse_batch
        handled += handled_batch
    return refuse, handled


def _batches(old_batch: Any, new_batch: Any, old_procs: Any, new_procs: Any, where: str) -> tuple[list[str], list[str]]:
    shape = f"{old_procs} x {old_batch} → {new_procs} x {new_batch}"
    if old_batch == new_batch and old_procs == new_procs:
        return [], []
    if old_batch is None or new_batch is None:
        if old_procs != new_procs:
            return [f"number of processes: {old_procs} → {new_procs} (the batch size of {where} is unknown)"], []
        return [], []  # the loader does not say: nothing to compare
    if old_batch * old_procs == new_batch * new_procs:
        return [], [f"processes x batch size of {where}: {shape} (the same global batch)"]
    return [f"processes x batch size of {where}: {shape} (global batch {old_batch * old_procs} → {new_batch * new_procs})"], []
