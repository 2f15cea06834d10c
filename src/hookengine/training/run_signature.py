"""The shape of a run, saved in each checkpoint and compared on resume.

A resume continues the same training only if each optimizer step still sees the same
samples: the *global* batch the sampler cuts the data into (batch size per process times
the number of processes) and the gradient accumulation of the phase the checkpoint is in,
and the phases up to it must be the same. Phases not begun yet may change freely.

The number of processes may change: with the same global batch (2 processes x 16
continue as 1 x 32) nothing else changes; with a bucket batch sampler
(:class:`~hookengine.data.sampler.BucketBatchSampler`), whatever the batch size, the
sampler keeps the saved global batch and each process takes its share as micro-batches,
with the gradient accumulation multiplied to match (:func:`adapt_to_resumed_world`), e.g.
2 processes x 16 continue as 1 x 16 with accumulation x2, and 1 x 32 as 2 x 16. A global
batch that does not split evenly over the new processes is refused, naming the counts that fit.
On the same number of processes another batch size is a change of recipe (refused, as
another global batch), unless the checkpoint's run had itself continued another world's.

The values come from ``state.plan`` and the loaders in ``state.dataloaders`` (their
``batch_size``, or their batch sampler's), never from another plugin.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["run_signature", "compare_signatures", "loader_batch_size", "adapt_to_resumed_world"]


def loader_batch_size(loader: Any) -> int | None:
    """Samples per batch on each process of ``loader`` (``None`` when it does not say)."""
    for obj in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(obj, "batch_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def _replannable(loader: Any) -> Any:
    """The loader's batch sampler when it can keep another world's global batch (``replan``)."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler if hasattr(sampler, "replan") and hasattr(sampler, "global_batch") else None


def run_signature(state: Any, num_processes: int) -> dict[str, Any]:
    """What a resume must agree with: processes and, per phase, its data, accumulation and batch size
    (and, for a bucket batch sampler, the global batch it plans in and its micro-batches per global batch)."""
    plan = state.plan
    phases = []
    for phase in plan.phases:
        loader = state.dataloaders.get(phase.data)
        entry = {
            "name": phase.name,
            "data": phase.data,
            "accumulation": plan.accumulation_of(phase),
            "batch_size": loader_batch_size(loader),
        }
        sampler = _replannable(loader)
        if sampler is not None:
            entry.update(global_batch=int(sampler.global_batch), micro_steps=int(sampler.micro_steps), replan=True)
        phases.append(entry)
    return {"num_processes": int(num_processes), "phases": phases}


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
        # Accumulation counts micro-batches; a run that split global batches multiplied it.
        old_accumulation = _per_global(old.get("accumulation"), old.get("micro_steps", 1))
        new_accumulation = _per_global(new["accumulation"], new.get("micro_steps", 1))
        if old_accumulation != new_accumulation:
            refuse.append(f"gradient accumulation of {where}: {old_accumulation} → {new_accumulation}")
        if new.get("replan") and old.get("global_batch") is not None and (
            saved.get("num_processes") != current["num_processes"] or _adapted(old, saved.get("num_processes"))
        ):
            refuse_batch, handled_batch = _replanned(old, new, saved.get("num_processes"), current["num_processes"],
                                                     where)
        else:
            refuse_batch, handled_batch = _batches(old.get("batch_size"), new["batch_size"],
                                                   saved.get("num_processes"), current["num_processes"], where)
        refuse += refuse_batch
        handled += handled_batch
    return refuse, handled


def _adapted(old: Mapping[str, Any], procs: Any) -> bool:
    """Whether the saved run itself continued another world's global batch."""
    return old.get("micro_steps", 1) != 1 or old.get("global_batch") != (old.get("batch_size") or 0) * (procs or 0)


def _per_global(accumulation: Any, micro_steps: Any) -> Any:
    if isinstance(accumulation, int) and isinstance(micro_steps, int) and micro_steps > 1:
        return accumulation // micro_steps
    return accumulation


def _processes(count: Any) -> str:
    return f"{count} process" + ("" if count == 1 else "es")


def _replanned(old: Mapping[str, Any], new: Mapping[str, Any], old_procs: Any, new_procs: int,
               where: str) -> tuple[list[str], list[str]]:
    """A bucket batch sampler keeps the saved global batch: say how this world takes it, or refuse."""
    from ..data.sampler import WorldSizeError, fit_world

    global_batch, old_batch = int(old["global_batch"]), old.get("batch_size")
    if old_procs == new_procs and global_batch == new.get("global_batch") and old_batch == new["batch_size"]:
        return [], []
    requested = new["batch_size"] if new.get("micro_steps", 1) == 1 else None
    if requested is None:
        return [], []  # already replanned: nothing to say twice
    try:
        micro_batch, micro_steps = fit_world(global_batch, new_procs, requested)
    except WorldSizeError as exc:
        return [f"{where}: {exc}"], []
    shape = f"{_processes(old_procs)} x {old_batch} → {_processes(new_procs)} x {micro_batch}"
    if micro_steps > 1:
        shape += f" with gradient accumulation x{micro_steps}"
    return [], [f"{where}: {shape} (the same global batch of {global_batch} samples and the same samples per step)"]


def adapt_to_resumed_world(state: Any) -> None:
    """After a checkpoint is loaded: where a bucket batch sampler now splits each global batch
    into another number of micro-batches than the saved run, multiply the phase's gradient
    accumulation to match and convert the clock's batch counters (kept in micro-batches).

    The resume's check (:func:`compare_signatures`) already said what was adjusted. Nothing
    happens when nothing changed.
    """
    plan, clock = state.plan, state.clock
    current = plan.current(clock)
    for phase in plan.phases:
        sampler = _replannable(state.dataloaders.get(phase.data))
        if sampler is None:
            continue
        accumulation = plan.accumulation_of(phase)
        if sampler.micro_steps > 1 and not getattr(phase, "_micro_steps", None):
            phase.accumulation = accumulation * sampler.micro_steps
            phase._micro_steps = sampler.micro_steps  # applied once per process
        old = getattr(sampler, "resumed_micro_steps", None)
        if old and phase is current:
            _convert_clock(clock, old, sampler.micro_steps)
            sampler.resumed_micro_steps = None


def _convert_clock(clock: Any, old: int, new: int) -> None:
    for key in ("batch_in_epoch", "accumulated"):
        value = int(getattr(clock, key))
        if value % old:
            raise ValueError(
                f"clock.{key}={value} is not a whole number of the saved run's global batches "
                f"({old} micro-batches each): resume from a checkpoint written at an optimizer step"
            )
        setattr(clock, key, value // old * new)


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
