"""Never persist non-finite state: losses watched on the device, weights checked before a save.

The loss of every batch (and the clipped gradient norm, when the step computes one) is kept
as a device tensor; nothing is read per step. At a read point (every N steps, before every
checkpoint, at the end of the run) one stacked ``isfinite`` tells whether any was NaN/inf,
and the first such entry names the step. Before a checkpoint is written the weights, the
buffers and the optimizer state are checked too (NaN gradients can come with a finite
loss): a non-finite state is never written, and the last finite checkpoint stays the
newest one on disk.

The ``nonfinite`` policy decides what a detection does: ``stop`` raises (naming the step
and the checkpoint that is kept), ``ignore`` warns once per occurrence and goes on (but a
run whose final state is non-finite still fails), ``skip`` skips batches with a non-finite
loss (read per step by the trainer) and stops when the state itself is non-finite, since
skipping cannot repair it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Iterator

from .agree import Agreement

__all__ = ["NonFiniteLossError", "NonFiniteStateError", "FiniteGuard", "state_tensors", "all_finite"]

_MAX_KEPT = 4096  # recorded values before a read point is forced


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite; the message names the step, epoch and batch."""


class NonFiniteStateError(NonFiniteLossError):
    """The weights or optimizer state became NaN/inf; no checkpoint of that state was written."""


def state_tensors(state: Any) -> Iterator[Any]:
    """The floating-point tensors a checkpoint would hold: parameters, buffers, optimizer state."""
    import torch

    for model in state.models.values():
        if isinstance(model, torch.nn.Module):
            # parameters()/buffers(), not state_dict(): no state-dict hooks (FSDP would gather).
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.is_floating_point():
                    yield tensor
    for optimizer in state.optimizers.values():
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        for per_param in getattr(inner, "state", {}).values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    yield value


def all_finite(tensors: Iterator[Any]) -> bool:
    """Whether every element of every tensor is finite (one host read for all of them)."""
    import torch

    # A sharded (FSDP) tensor is checked on this process's shard; the caller agrees over ranks.
    flags = [torch.isfinite((t.to_local() if hasattr(t, "to_local") else t).detach()).all() for t in tensors]
    if not flags:
        return True
    by_device: dict[Any, list[Any]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return all(bool(torch.stack(group).all()) for group in by_device.values())


class FiniteGuard:
    """The trainer's non-finite watch: records on the device, decides at read points.

    Args:
        engine: the engine whose state is watched.
        policy: ``"stop"``, ``"skip"`` or ``"ignore"`` (the trainer's ``nonfinite``).
        agreement: reduces decisions over the processes of a multi-process run.
    """

    def __init__(self, engine: Any, policy: str, agreement: Agreement) -> None:
        self.engine = engine
        self.policy = policy
        self.agreement = agreement
        self.values: list[Any] = []
        self.where: list[tuple[str, int, str, int, int]] = []
        self.kept: Path | None = None  # the last finite checkpoint, by path (main process)
        self.kept_step: int | None = None
        self.reported = False  # a non-finite occurrence was warned about (ignore)
        self.refused = 0

    # ----------------------------------------------------------- recording
    def record(self, value: Any, kind: str) -> None:
        """Keep ``value`` (a 0-d tensor) for the next read; no host synchronisation."""
        clock = self.engine.state.clock
        self.values.append(value)
        self.where.append((kind, clock.step, clock.phase, clock.epoch, clock.batch_in_epoch))
        if len(self.values) >= _MAX_KEPT:  # bounded memory without read points (same count on every rank)
            self.check()

    def _first_bad(self) -> tuple[float, tuple[str, int, str, int, int]] | None:
        """The first non-finite recorded value, and where; clears the record (one host read)."""
        values, where = self.values, self.where
        self.values, self.where = [], []
        if not values:
            return None
        import torch

        if all(v.is_cpu for v in values):
            # Reading a CPU tensor syncs nothing, and ten reads cost less than one stack.
            for value, spot in zip(values, where):
                number = value.item()
                if not math.isfinite(number):
                    return number, spot
            return None
        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        finite = torch.isfinite(stacked)
        if bool(finite.all()):
            return None
        index = int((~finite).nonzero()[0, 0])
        return float(stacked[index]), where[index]

    # --------------------------------------------------------- the reading
    def kept_text(self) -> str:
        if self.kept is not None:
            return f"the last finite checkpoint {self.kept} is kept"
        if self.kept_step is not None:
            return f"the last finite checkpoint (step {self.kept_step}) is kept"
        return "no checkpoint was written"

    def check(self) -> None:
        """A read point: act on a non-finite loss recorded since the last one (all ranks)."""
        recorded = bool(self.values)
        if not recorded and not self.agreement.runtime.distributed:
            return  # nothing since the last read (several ranks still meet: they must stay in step)
        bad = self._first_bad()
        if not self.agreement.all(bad is None):
            if bad is None:  # another rank saw it: stop with it rather than hang
                where_text = "another process"
                value: float | str = "not finite"
            else:
                value, spot = bad
                where_text = _where(spot)
            self._act(NonFiniteLossError, f"{'loss' if bad is None else bad[1][0]} is {value} at {where_text}")
        elif recorded and self.reported:
            self.reported = False  # finite again: the next detection is a new occurrence

    def state_is_finite(self) -> bool:
        """Whether the weights and optimizer state are finite on every process."""
        return self.agreement.all(all_finite(state_tensors(self.engine.state)))

    def _act(self, error: type[NonFiniteLossError], what: str) -> None:
        if self.policy == "ignore" and error is NonFiniteLossError:
            if not self.reported:
                self.reported = True
                warnings.warn(f"{what}; training goes on (trainer.nonfinite=ignore)", RuntimeWarning, stacklevel=3)
            return
        hint = " Set trainer.nonfinite=skip to skip such batches" if error is NonFiniteLossError and self.policy == "stop" else ""
        raise error(f"{what}; {self.kept_text()}.{hint}")

    # ------------------------------------------------- the save_checkpoint slot
    def guard_save(self, next_impl: Any, *args: Any, **kwargs: Any) -> Any:
        """Wraps ``save_checkpoint``: a non-finite state is never written."""
        state = self.engine.state
        self.check()
        if not self.state_is_finite():
            self.refused += 1
            state.metrics["refused_checkpoints"] = self.refused
            what = f"the weights or optimizer state are not finite at step {state.clock.step}; that checkpoint is not written"
            if self.policy == "ignore":
                warnings.warn(f"{what}; {self.kept_text()}", RuntimeWarning, stacklevel=2)
                return None
            raise NonFiniteStateError(f"{what}; {self.kept_text()}")
        path = next_impl(*args, **kwargs)
        self.kept_step = state.clock.step
        if path is not None:
            self.kept = Path(path)
        return path

    def on_loaded(self, path: Any) -> None:
        """A loaded checkpoint is the last finite one until a newer one is written."""
        self.kept = Path(path)
        self.kept_step = self.engine.state.clock.step

    def check_end(self) -> None:
        """At the end of the run: a non-finite final state fails the run, whatever the policy."""
        self.check()
        if not self.state_is_finite():
            raise NonFiniteStateError(
                f"the weights or optimizer state are not finite at the end of the run (step "
                f"{self.engine.state.clock.step}); {self.kept_text()}"
            )


def _where(spot: tuple[str, int, str, int, int]) -> str:
    _, step, phase, epoch, batch = spot
    return f"step {step} (phase {phase!r}, epoch {epoch}, batch {batch})"
