"""State: one object for the progress clock, named objects, metrics and loop control.

Torch is not imported here; tensors and modules are only touched through their own
``state_dict`` methods, so ``import hookengine`` stays light.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .model_state import load_model_state, split_model_state
from .optimizer_state import load_optimizer_state
from .plan import Phase, Plan

__all__ = ["Clock", "Control", "State", "as_number", "capture_rng", "restore_rng"]


@dataclass
class Clock:
    """The one progress clock that every schedule and filter reads.

    ``step`` counts optimizer steps over the whole run; ``micro_step`` counts batches
    (forward/backward passes); ``phase_step`` counts optimizer steps inside the
    current phase; ``batch_in_epoch`` is the data position used to resume mid-epoch;
    ``accumulated`` counts batches whose gradients wait for the next optimizer step.
    """

    step: int = 0
    micro_step: int = 0
    samples: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    accumulated: int = 0
    phase: str = ""
    phase_index: int = 0
    phase_step: int = 0
    phase_epoch: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise KeyError(f"clock state has unknown key {key!r}")
            setattr(self, key, value)


@dataclass
class Control:
    """Requests a listener can make to steer the loop (hooks are two-way)."""

    stop_requested: str | None = None
    skip_requested: bool = False
    checkpoint_requested: bool = False
    evaluate_requested: bool = False

    def stop(self, reason: str = "stopped by a hook") -> None:
        """End the run after the current step (a checkpoint is still written)."""
        self.stop_requested = reason

    def skip_step(self) -> None:
        """Skip the current batch: no forward, backward or optimizer step."""
        self.skip_requested = True

    def checkpoint_now(self) -> None:
        """Write a checkpoint at the end of this step."""
        self.checkpoint_requested = True

    def evaluate_now(self) -> None:
        """Run the ``evaluate`` slot at the end of this step."""
        self.evaluate_requested = True


@dataclass
class State:
    """Everything a run has: clock, the plan, named models/optimizers/loaders, metrics, control.

    ``state_dict``/``load_state_dict`` cover clock, metrics, models, optimizers and RNG;
    the engine adds plugin states on top.
    """

    clock: Clock = field(default_factory=Clock)
    control: Control = field(default_factory=Control)
    plan: Plan = field(default_factory=Plan)
    models: dict[str, Any] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    dataloaders: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    is_main_process: bool = True
    # Set by the engine to the runtime's unwrap, so checkpoints hold plain module weights.
    unwrap: Callable[[Any], Any] = field(default=lambda model: model, repr=False)
    # Content hashes of the models' frozen parts, reused while those tensors do not change.
    fingerprints: dict[str, Any] = field(default_factory=dict, repr=False)
    # Lean checkpoints: models with a frozen part keep only what trains (core/model_state.py).
    lean_checkpoints: bool = True

    @property
    def phase(self) -> Phase:
        """The phase of ``plan`` the clock is in."""
        return self.plan.current(self.clock)

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run from the plan and the loaders' lengths (or ``None``)."""
        return self.plan.total_steps(self.dataloaders)

    def metric(self, name: str) -> float:
        """A metric as a Python float (tensors are converted only when asked for)."""
        value = self.metrics[name]
        return float(value.item() if hasattr(value, "item") else value)

    def checkpointed_models(self) -> dict[str, Any]:
        """Models with weights (``state_dict``); pipelines and tokenizers are skipped:
        their trainable parts are registered as models of their own."""
        return {
            name: m
            for name, m in self.models.items()
            if callable(getattr(self.unwrap(m), "state_dict", None))
            and callable(getattr(self.unwrap(m), "load_state_dict", None))
        }

    def state_dict(self) -> dict[str, Any]:
        """Clock, metrics, models, optimizers and RNG.

        A model with a frozen part keeps only what trains; ``model_refs`` holds the
        reference (class, source, hash) its frozen base is checked against on resume.
        """
        models, refs = {}, {}
        in_optimizers = {id(p) for o in self.optimizers.values() for g in o.param_groups for p in g["params"]}
        for name, model in self.checkpointed_models().items():
            model = self.unwrap(model)
            if not self.lean_checkpoints or not hasattr(model, "named_parameters"):
                models[name] = model.state_dict()
                continue
            models[name], reference = split_model_state(model, in_optimizers, self.fingerprints, name)
            if reference is not None:
                refs[name] = reference
        return {
            "clock": self.clock.state_dict(),
            "metrics": {k: as_number(v) for k, v in self.metrics.items()},
            "models": models,
            "model_refs": refs,
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "rng": capture_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state["clock"])
        self.metrics.update(state.get("metrics", {}))
        refs = state.get("model_refs", {})
        for kind, objects in (("models", self.checkpointed_models()), ("optimizers", self.optimizers)):
            saved = state.get(kind, {})
            missing = sorted(set(objects) - set(saved))
            if missing:
                raise KeyError(f"checkpoint has no {kind} named {missing}; it has {sorted(saved)}")
            for name in objects:
                obj = self.optimizers.get(name) if kind == "optimizers" else objects[name]
                if kind == "models":
                    load_model_state(self.unwrap(obj), saved[name], refs.get(name), self.fingerprints, name)
                else:
                    # Re-read: a patched load (optim_sched) may replace the optimizer.
                    load_optimizer_state(self.optimizers, name, saved[name])
        if "rng" in state:
            restore_rng(state["rng"])


def as_number(value: Any) -> Any:
    """A one-element tensor (or NumPy scalar) as a Python number; anything else as it is."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch and every CUDA device."""
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
