"""The training loop, as a plugin: it attaches the slot ``run`` and the step slots.

Nothing here is privileged: the loop walks ``state.plan`` (written by ``train_sched``),
fires the declared events and calls slots that any plugin can wrap or replace (see
:mod:`hookengine.core.points` for the order, and the plugin guide for a loop of your own).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

from ..core.plan import Phase, plan_settings
from ..core.plugins import PluginError
from ..core.points import BASE_PRIORITY
from .agree import Agreement
from .finite import FiniteGuard, NonFiniteLossError, NonFiniteStateError
from .run_signature import adapt_to_resumed_world
from .signals import StopSignals, StoppedBySignal, signal_number

__all__ = [
    "TrainingLoop", "Phase", "NonFiniteLossError", "NonFiniteStateError", "StoppedBySignal", "BASE_PRIORITY",
]


class TrainingLoop:
    """Phases, epochs and batches, with events and slots at every step.

    Args:
        grad_clip: clip the gradient norm to this value before each optimizer step.
        eval_every: run ``evaluate`` every N optimizer steps (0: only at phase ends).
        eval_at_phase_end: run ``evaluate`` when a phase ends.
        nonfinite: what a NaN/inf loss or state does: ``stop`` (raise, naming the step and
            the checkpoint kept), ``skip`` (no optimizer step for a batch with a non-finite
            loss, counted in metrics; a non-finite state still stops), ``ignore`` (warn once
            per occurrence, naming the step, and go on; a run whose final state is non-finite
            still fails). Whatever the policy, a checkpoint of non-finite weights or
            optimizer state is never written: the last finite one stays the newest.
        finite_check_every: with ``stop``/``ignore``, read the losses kept on the device
            every N optimizer steps (0: only before checkpoints and at the end); there is no
            per-step host read. ``skip`` reads every loss (it must decide per batch).
        stop_signals: signals that stop the run at the next step boundary: a checkpoint
            (through ``save_checkpoint``), then ``StoppedBySignal``, a ``SystemExit`` with
            code 128 + signal number (143 for SIGTERM, 130 for SIGINT). A second signal goes
            to the previous handler at once (SIGINT: ``KeyboardInterrupt``; SIGTERM: the
            process ends), without a checkpoint. A run that reaches its end first finishes
            normally. Empty: leave the signals alone. Handlers are installed only when the
            run is in the main thread, and the previous ones are restored at teardown.
        stop_check_every: in a multi-process run, agree on a received signal every N
            optimizer steps (one all-reduce of one integer over a gloo group, so no GPU
            synchronisation); every rank stops at the same step, at most N steps late.
        epochs, max_steps, phases, gradient_accumulation_steps, optimizer, lr,
            weight_decay, optimizer_options: short forms of the same ``train_sched``
            options (they write ``state.plan``; setting a key in both places is an error).
    """

    name = "trainer"

    def __init__(
        self,
        epochs: int | None = None,
        max_steps: int | None = None,
        phases: list[dict[str, Any]] | None = None,
        gradient_accumulation_steps: int | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        grad_clip: float | None = None,
        eval_every: int = 0,
        eval_at_phase_end: bool = True,
        nonfinite: Literal["stop", "skip", "ignore"] = "stop",
        finite_check_every: int = 10,
        stop_signals: list[str] = ["SIGTERM", "SIGINT"],  # noqa: B006 - copied below, never mutated
        stop_check_every: int = 10,
    ) -> None:
        if gradient_accumulation_steps is not None and gradient_accumulation_steps < 1:
            raise ValueError("trainer.gradient_accumulation_steps must be >= 1")
        if finite_check_every < 0:
            raise ValueError("trainer.finite_check_every must be >= 0")
        if stop_check_every < 1:
            raise ValueError("trainer.stop_check_every must be >= 1")
        for name in stop_signals:
            signal_number(name)  # an unknown name fails here, naming the option
        self.plan_options = plan_settings(locals())
        self.grad_clip = grad_clip
        self.eval_every = eval_every
        self.eval_at_phase_end = eval_at_phase_end
        self.nonfinite = nonfinite
        self.finite_check_every = finite_check_every
        self.stop_signals = list(stop_signals)
        self.stop_check_every = stop_check_every
        self.skipped_nonfinite = 0
        self.signals: StopSignals | None = None
        self.accumulation = 1  # of the current phase, read once per phase (hot path)
        self.precision: str | None = None

    # ----------------------------------------------------------------- setup
    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.state.plan.configure(getattr(self, "plugin_name", self.name), **self.plan_options)
        # Base implementations sit innermost (low priority), so any plugin's
        # implementation wraps them whether it was attached before or after.
        for point, impl in (
            ("run", self._run),
            ("train_step", self._train_step),
            ("backward", self._backward),
            ("optimizer_step", self._optimizer_step),
            ("evaluate", self._evaluate),
            ("eval_step", self._eval_step),
        ):
            engine.attach(point, impl, priority=BASE_PRIORITY)
        self.agreement = Agreement(engine.runtime)
        self.finite = FiniteGuard(engine, self.nonfinite, self.agreement)
        self._guarding = False
        engine.on("checkpoint_loaded", lambda state, path: self.finite.on_loaded(path))
        # Resumed on another number of processes: accumulation and batch counters follow the sampler.
        engine.on("checkpoint_loaded", lambda state, path: adapt_to_resumed_world(state))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)

    # ------------------------------------------------------------------ run
    def _run(self, next_impl: Any) -> Any:
        engine, state = self.engine, self.engine.state
        runtime, plan, clock = engine.runtime, state.plan, state.clock
        state.is_main_process = runtime.is_main_process
        if not engine.has("prepare"):  # the plan's slots come from train_sched (or a replacement)
            engine.use("train_sched")
        if engine.has("save_checkpoint") and not self._guarding:
            # Outermost, so no save (periodic, requested, final, on a signal) writes NaN weights.
            engine.attach("save_checkpoint", self.finite.guard_save, priority="first", plugin=getattr(self, "plugin_name", self.name))
            self._guarding = True
        if self.stop_signals:
            self.signals = StopSignals(self.stop_signals)
            self.signals.install()
        try:
            engine.fire("setup")
            engine.call("prepare")
            engine.fire("resume")
            # The clock never points past the last phase, so a finished run resumed with
            # longer phases (or a higher max_steps) trains on instead of stopping at once.
            clock.phase_index = min(clock.phase_index, len(plan.phases) - 1)
            while not self._should_stop():
                phase = state.phase
                clock.phase = phase.name
                self.accumulation = plan.accumulation_of(phase)
                self.precision = phase.precision
                engine.fire("phase_start", phase=phase)
                self._run_phase(phase)
                finished = plan.phase_done(clock)
                if finished or plan.run_done(clock):
                    if self.eval_at_phase_end:
                        self._run_evaluation()
                    engine.fire("phase_end", phase=phase)
                if not finished or plan.run_done(clock) or not plan.advance(clock):
                    break
            self.finite.check_end()
            engine.fire("run_end")
            return state
        except BaseException as error:
            engine.fire("exception", error=error)
            raise
        finally:
            if self.signals is not None:
                self.signals.restore()
            engine.fire("teardown")
            runtime.end()

    def _should_stop(self) -> bool:
        return self.engine.state.control.stop_requested is not None

    def _run_phase(self, phase: Phase) -> None:
        engine, state = self.engine, self.engine.state
        clock, plan = state.clock, state.plan
        loader = state.dataloaders.get(phase.data)
        if loader is None:  # train_sched names the missing loader at phase_start; a user's plan may not
            raise PluginError(f"phase {phase.name!r} reads data {phase.data!r}, which no plugin registered")
        for model in state.models.values():
            if hasattr(model, "train"):
                model.train()
        while not (plan.phase_done(clock) or plan.run_done(clock) or self._should_stop()):
            engine.fire("epoch_start")
            batches = engine.call("epoch_batches", loader, clock.epoch, clock.batch_in_epoch)
            finished_epoch = True
            for batch in batches:
                self._step(batch)
                if plan.phase_done(clock) or plan.run_done(clock) or self._should_stop():
                    finished_epoch = False
                    break
            if finished_epoch:
                clock.epoch += 1
                clock.phase_epoch += 1
                clock.batch_in_epoch = 0
                engine.fire("epoch_end")
            if clock.batch_in_epoch == 0 and finished_epoch and not _has_batches(loader, clock.micro_step):
                raise RuntimeError(f"data loader {phase.data!r} yielded no batches in epoch {clock.epoch - 1}")

    def _step(self, batch: Any) -> None:
        engine, state = self.engine, self.engine.state
        clock, control = state.clock, state.control
        engine.fire("batch_start", batch=batch)
        if control.skip_requested:
            control.skip_requested = False
            clock.batch_in_epoch += 1
            return
        step_before = clock.step
        loss = engine.call("train_step", batch)
        clock.batch_in_epoch += 1
        clock.micro_step += 1
        clock.samples += _batch_size(batch) * engine.runtime.num_processes
        engine.fire("batch_end", loss=loss)
        if clock.step != step_before:
            engine.fire("step_end", loss=loss)
            # Requests are served after every step_end listener has had its say.
            if control.evaluate_requested or (self.eval_every and clock.step % self.eval_every == 0):
                control.evaluate_requested = False
                self._run_evaluation()
            if control.checkpoint_requested:
                control.checkpoint_requested = False
                engine.call("save_checkpoint")
            if self.finite_check_every and clock.step % self.finite_check_every == 0:
                self.finite.check()
            signals = self.signals
            if signals is not None and (signals.received is not None or engine.runtime.distributed):
                self._serve_signal()

    def _serve_signal(self) -> None:
        """At a step boundary: after a stop signal (on any rank), checkpoint and stop."""
        engine, clock = self.engine, self.engine.state.clock
        received = self.signals.received if self.signals is not None else None
        if engine.runtime.distributed:
            if clock.step % self.stop_check_every:
                return
            received = self.agreement.max(received or 0) or None
        if received is None:
            return
        import signal

        name = signal.Signals(received).name
        engine.state.control.stop(name)
        path = engine.call("save_checkpoint") if engine.has("save_checkpoint") else None
        if self.finite.kept_step == clock.step:
            kept = f"checkpoint {path if path is not None else f'of step {clock.step}'} written"
        else:
            kept = self.finite.kept_text()
        rank = f" (rank {engine.runtime.process_index})" if engine.runtime.distributed else ""
        message = f"stopped by {name} at step {clock.step}{rank}; {kept}; continue with --resume"
        import sys

        print(f"hookengine: {message}", file=sys.stderr, flush=True)
        raise StoppedBySignal(received, message)

    # ------------------------------------------------------------ the step
    def _train_step(self, next_impl: Any, batch: Any) -> Any:
        engine, state = self.engine, self.engine.state
        clock, runtime = state.clock, engine.runtime
        # Batches since the last optimizer step live in the clock, so a phase may change
        # the accumulation and a resume lands on the same boundary.
        boundary = clock.accumulated + 1 >= self.accumulation
        if runtime.mixed_precision == "no" and self.precision is None:
            loss = engine.call("compute_loss", batch)
        else:
            with runtime.autocast(self.precision):
                loss = engine.call("compute_loss", batch)
        detached = loss.detach()  # what listeners get: the value, not the graph
        if self.nonfinite == "skip":
            if not math.isfinite(detached.item()):  # skip must know per batch
                return self._nonfinite(loss, batch)
        else:
            self.finite.record(detached, "loss")  # read at the next read point: no host sync here
        scaled = loss / self.accumulation if self.accumulation > 1 else loss
        if boundary or not runtime.distributed:
            engine.call("backward", scaled)
        else:
            with runtime.no_sync(list(state.models.values())):
                engine.call("backward", scaled)
        engine.fire("after_backward", loss=loss)
        clock.accumulated = 0 if boundary else clock.accumulated + 1
        if boundary:
            engine.fire("before_optimizer_step")
            engine.call("optimizer_step")
            clock.step += 1
            clock.phase_step += 1
        state.metrics["loss"] = detached
        return detached

    def _nonfinite(self, loss: Any, batch: Any) -> Any:
        state = self.engine.state
        clock = state.clock
        where = (
            f"step {clock.step} (phase {clock.phase!r}, epoch {clock.epoch}, batch {clock.batch_in_epoch})"
        )
        self.skipped_nonfinite += 1
        state.metrics["skipped_nonfinite"] = self.skipped_nonfinite
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.engine.fire("nonfinite_loss", loss=loss, batch=batch, where=where)
        return loss.detach()

    def _backward(self, next_impl: Any, loss: Any) -> None:
        self.engine.runtime.backward(loss)

    def _optimizer_step(self, next_impl: Any) -> None:
        state = self.engine.state
        if self.grad_clip is not None:
            import torch

            params = [p for m in state.models.values() if hasattr(m, "parameters") for p in m.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            state.metrics["grad_norm"] = norm
            self.finite.record(norm, "gradient norm")  # NaN gradients may come with a finite loss
        for optimizer in state.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------- evaluation
    def _run_evaluation(self) -> None:
        metrics = self.engine.call("evaluate")
        if metrics:
            self.engine.state.metrics.update(metrics)
            self.engine.fire("evaluate_end", metrics=metrics)

    def _evaluate(self, next_impl: Any, data: str = "val") -> dict[str, float]:
        """Mean of ``eval_step`` metrics over the validation loader, over all processes."""
        import torch

        state = self.engine.state
        loader = state.dataloaders.get(data)
        if loader is None:
            return {}
        models = [m for m in state.models.values() if hasattr(m, "eval")]
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        sums: dict[str, float] = {}
        count = 0.0
        rng = torch.get_rng_state()  # evaluation must not shift the training RNG stream
        try:
            with torch.no_grad(), self.engine.runtime.autocast(self.precision):
                for batch in loader:
                    n = float(_batch_size(batch))
                    for key, value in self.engine.call("eval_step", batch).items():
                        sums[key] = sums.get(key, 0.0) + float(value) * n
                    count += n
        finally:
            torch.set_rng_state(rng)
            for m, mode in zip(models, was_training):
                m.train(mode)
        totals = torch.tensor([*sums.values(), count], dtype=torch.float64)
        runtime = self.engine.runtime
        if runtime.distributed:
            import torch.distributed as dist

            dist.all_reduce(totals)
        keys = list(sums)
        return {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)} if totals[-1] > 0 else {}

    def _eval_step(self, next_impl: Any, batch: Any) -> dict[str, float]:
        return {"val_loss": float(self.engine.call("compute_loss", batch))}


def _batch_size(batch: Any) -> int:
    # Containers first: hasattr() on a tuple raises and catches an AttributeError (~1 µs a step).
    while True:
        if isinstance(batch, (list, tuple)):
            if not batch:
                return 1
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = next(iter(batch.values()), None)
            if batch is None:
                return 0
        else:
            shape = getattr(batch, "shape", None)
            return int(shape[0]) if shape else 1


def _has_batches(loader: Any, micro_steps: int) -> bool:
    with contextlib.suppress(TypeError):
        return len(loader) > 0
    return micro_steps > 0
