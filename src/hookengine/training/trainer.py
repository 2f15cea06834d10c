"""The training loop, as a plugin: it attaches the slot ``run`` and the step slots.

Nothing here is privileged: every part is a slot or an event that another plugin can
wrap or replace (see docs/CONTRACT.md for the order of events).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TrainingLoop", "Phase", "NonFiniteLossError", "BASE_PRIORITY"]

# Priority of the built-in base implementations of slots (innermost in every chain).
BASE_PRIORITY = -1000


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite; the message names the step, epoch and batch."""


class Phase(BaseModel):
    """One stretch of training: its length, its data, and settings for plugins.

    ``routine`` and ``train`` are read by the training-routine and model schedulers;
    ``settings`` is free-form for plugins.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "train"
    steps: int | None = Field(default=None, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    data: str = "train"
    routine: str | None = None
    train: list[str] | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_length(self) -> "Phase":
        if self.steps is None and self.epochs is None:
            self.epochs = 1
        return self


class TrainingLoop:
    """Phases, epochs and batches, with events and slots at every step.

    Args:
        epochs: epochs of the default phase (when ``phases`` is not given).
        max_steps: optimizer steps of the default phase, or a cap on the whole run.
        phases: the phases, in order (each a :class:`Phase` or a mapping).
        gradient_accumulation_steps: batches per optimizer step.
        optimizer: a ``torch.optim`` class name or ``module:attr`` (default slot
            ``build_optimizer``; optim_sched replaces it).
        lr, weight_decay, optimizer_options: arguments for that optimizer.
        grad_clip: clip the gradient norm to this value before each optimizer step.
        eval_every: run ``evaluate`` every N optimizer steps (0: only at phase ends).
        eval_at_phase_end: run ``evaluate`` when a phase ends.
        nonfinite: what a NaN/inf loss does: ``stop`` (raise, naming the step),
            ``skip`` (no optimizer step for that batch, counted in metrics), ``ignore``.
    """

    name = "trainer"

    def __init__(
        self,
        epochs: int | None = None,
        max_steps: int | None = None,
        phases: list[Phase] | None = None,
        gradient_accumulation_steps: int = 1,
        optimizer: str = "AdamW",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer_options: dict[str, Any] | None = None,
        grad_clip: float | None = None,
        eval_every: int = 0,
        eval_at_phase_end: bool = True,
        nonfinite: Literal["stop", "skip", "ignore"] = "stop",
    ) -> None:
        if gradient_accumulation_steps < 1:
            raise ValueError("trainer.gradient_accumulation_steps must be >= 1")
        if phases:
            self.phases = [p if isinstance(p, Phase) else Phase.model_validate(p) for p in phases]
        else:
            self.phases = [Phase(name="train", epochs=epochs if max_steps is None else None, steps=max_steps)]
        self.max_steps = max_steps
        self.accumulation = gradient_accumulation_steps
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_options = optimizer_options or {}
        self.grad_clip = grad_clip
        self.eval_every = eval_every
        self.eval_at_phase_end = eval_at_phase_end
        self.nonfinite = nonfinite
        self.skipped_nonfinite = 0

    # ----------------------------------------------------------------- setup
    def setup(self, engine: Any) -> None:
        self.engine = engine
        # Base implementations sit innermost (low priority), so any plugin's
        # implementation wraps them whether it was attached before or after.
        for point, impl in (
            ("run", self._run),
            ("train_step", self._train_step),
            ("backward", self._backward),
            ("optimizer_step", self._optimizer_step),
            ("build_optimizer", self._build_optimizer),
            ("epoch_batches", self._epoch_batches),
            ("evaluate", self._evaluate),
            ("eval_step", self._eval_step),
            ("rewrap_models", self._rewrap_models),
        ):
            engine.attach(point, impl, priority=BASE_PRIORITY)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run, when every phase's length is known."""
        total = 0
        state = self.engine.state
        for phase in self.phases:
            if phase.steps is not None:
                total += phase.steps
                continue
            loader = state.dataloaders.get(phase.data)
            try:
                batches = len(loader)  # type: ignore[arg-type]
            except TypeError:
                return self.max_steps
            total += phase.epochs * (batches // self.accumulation)  # type: ignore[operator]
        return min(total, self.max_steps) if self.max_steps else total

    # ------------------------------------------------------------------ run
    def _run(self, next_impl: Any) -> Any:
        engine, state = self.engine, self.engine.state
        runtime = engine.runtime
        state.is_main_process = runtime.is_main_process
        try:
            engine.fire("setup")
            self._prepare()
            engine.fire("resume")
            clock = state.clock
            # The clock never points past the last phase, so a finished run resumed with
            # longer phases (or a higher max_steps) trains on instead of stopping at once.
            clock.phase_index = min(clock.phase_index, len(self.phases) - 1)
            while not self._should_stop():
                phase = self.phases[clock.phase_index]
                clock.phase = phase.name
                engine.fire("phase_start", phase=phase)
                self._run_phase(phase)
                finished = self._phase_done(phase)
                if finished or self._run_done():
                    if self.eval_at_phase_end:
                        self._run_evaluation()
                    engine.fire("phase_end", phase=phase)
                if not finished or self._run_done() or clock.phase_index + 1 >= len(self.phases):
                    break
                self._next_phase()
            engine.fire("run_end")
            return state
        except BaseException as error:
            engine.fire("exception", error=error)
            raise
        finally:
            engine.fire("teardown")
            runtime.end()

    def _prepare(self) -> None:
        """Build the optimizer if no plugin did, then place and wrap the models."""
        state = self.engine.state
        for phase in self.phases:
            if phase.routine is not None and phase.routine not in self.engine.plugins:
                from ..core.plugins import PluginError, closest

                raise PluginError(
                    f"phase {phase.name!r}: unknown routine {phase.routine!r}"
                    f"{closest(phase.routine, self.engine.plugins)}; plugins in use: {sorted(self.engine.plugins)}"
                )
        if not state.models:
            from ..core.plugins import PluginError

            raise PluginError(
                "no model to train: use a routine or model plugin that registers one in state.models "
                "(e.g. supervised, diffusion, causal_lm or model_loader)"
            )
        if not state.optimizers and self._trainable(state.models):
            state.optimizers["main"] = self.engine.call("build_optimizer", state.models)
        self._rewrap_models(None)
        runtime = self.engine.runtime
        for name, optimizer in state.optimizers.items():
            state.optimizers[name] = runtime.prepare_optimizer(optimizer)

    @staticmethod
    def _trainable(models: dict[str, Any]) -> bool:
        return any(p.requires_grad for m in models.values() if hasattr(m, "parameters") for p in m.parameters())

    def _rewrap_models(self, next_impl: Any) -> None:
        """(Re)place every model; trainable ones get DDP when distributed.

        Call after a structural change (freezing, adapters) so DDP sees the new
        set of trainable parameters on every rank.
        """
        runtime = self.engine.runtime
        models = self.engine.state.models
        for name, model in list(models.items()):
            if not hasattr(model, "parameters"):
                continue
            model = runtime.unwrap(model)
            if any(p.requires_grad for p in model.parameters()):
                models[name] = runtime.prepare_model(model)
            else:
                models[name] = model.to(runtime.device)
        if "_module_hooks" in self.engine.__dict__:
            self.engine.module_hooks.refresh()

    def _next_phase(self) -> None:
        clock = self.engine.state.clock
        current = self.phases[clock.phase_index]
        clock.phase_index += 1
        clock.phase_step = 0
        clock.phase_epoch = 0
        if clock.phase_index < len(self.phases) and self.phases[clock.phase_index].data != current.data:
            clock.batch_in_epoch = 0

    def _phase_done(self, phase: Phase) -> bool:
        clock = self.engine.state.clock
        if phase.steps is not None and clock.phase_step >= phase.steps:
            return True
        return phase.epochs is not None and phase.steps is None and clock.phase_epoch >= phase.epochs

    def _run_done(self) -> bool:
        return bool(self.max_steps) and self.engine.state.clock.step >= self.max_steps  # type: ignore[operator]

    def _should_stop(self) -> bool:
        return self.engine.state.control.stop_requested is not None

    def _run_phase(self, phase: Phase) -> None:
        engine, state = self.engine, self.engine.state
        clock = state.clock
        try:
            loader = state.dataloaders[phase.data]
        except KeyError:
            from ..core.plugins import PluginError, closest

            raise PluginError(
                f"phase {phase.name!r} reads data {phase.data!r}{closest(phase.data, state.dataloaders)}, but no "
                f"plugin registered it; data loaders: {sorted(state.dataloaders)}"
            ) from None
        for model in state.models.values():
            if hasattr(model, "train"):
                model.train()
        while not (self._phase_done(phase) or self._run_done() or self._should_stop()):
            engine.fire("epoch_start")
            batches = engine.call("epoch_batches", loader, clock.epoch, clock.batch_in_epoch)
            finished_epoch = True
            for batch in batches:
                self._step(batch)
                if self._phase_done(phase) or self._run_done() or self._should_stop():
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

    # ------------------------------------------------------------ the step
    def _train_step(self, next_impl: Any, batch: Any) -> Any:
        engine, state = self.engine, self.engine.state
        clock, runtime = state.clock, engine.runtime
        boundary = (clock.micro_step + 1) % self.accumulation == 0
        if runtime.mixed_precision == "no":
            loss = engine.call("compute_loss", batch)
        else:
            with runtime.autocast():
                loss = engine.call("compute_loss", batch)
        if self.nonfinite != "ignore" and not math.isfinite(loss.item()):
            return self._nonfinite(loss, batch)
        scaled = loss / self.accumulation if self.accumulation > 1 else loss
        if boundary or not runtime.distributed:
            engine.call("backward", scaled)
        else:
            with runtime.no_sync(list(state.models.values())):
                engine.call("backward", scaled)
        engine.fire("after_backward", loss=loss)
        if boundary:
            engine.fire("before_optimizer_step")
            engine.call("optimizer_step")
            clock.step += 1
            clock.phase_step += 1
        loss = loss.detach()  # listeners get the value, not the graph
        state.metrics["loss"] = loss
        return loss

    def _nonfinite(self, loss: Any, batch: Any) -> Any:
        state = self.engine.state
        clock = state.clock
        where = (
            f"step {clock.step} (phase {clock.phase!r}, epoch {clock.epoch}, batch {clock.batch_in_epoch})"
        )
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"loss is {loss.item()} at {where}; the last checkpoint is kept. "
                "Set trainer.nonfinite=skip to skip such batches"
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
            state.metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for optimizer in state.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def _build_optimizer(self, next_impl: Any, models: dict[str, Any]) -> Any:
        from ..core.plugins import resolve

        import torch

        cls = getattr(torch.optim, self.optimizer, None) if ":" not in self.optimizer else resolve(self.optimizer)
        if cls is None:
            from ..core.plugins import closest

            names = [n for n in dir(torch.optim) if n[:1].isupper()]
            raise ValueError(f"trainer.optimizer: unknown optimizer {self.optimizer!r}{closest(self.optimizer, names)}")
        params = [p for m in models.values() if hasattr(m, "parameters") for p in m.parameters() if p.requires_grad]
        return cls(params, lr=self.lr, weight_decay=self.weight_decay, **self.optimizer_options)

    def _epoch_batches(self, next_impl: Any, loader: Any, epoch: int, start_batch: int) -> Any:
        """The batches of one epoch from ``start_batch`` on (resume mid-epoch)."""
        for holder in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None), loader):
            if holder is not None and hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_start"):
            batch_sampler.set_start(start_batch)
            return loader
        if hasattr(loader, "set_start"):
            loader.set_start(start_batch)
            return loader
        return itertools.islice(loader, start_batch, None)

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
            with torch.no_grad(), self.engine.runtime.autocast():
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
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
        return _batch_size(batch) if batch is not None else 0
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 1


def _has_batches(loader: Any, micro_steps: int) -> bool:
    with contextlib.suppress(TypeError):
        return len(loader) > 0
    return micro_steps > 0
