"""The ``model_sched`` plugin: which models train when, EMA copies, teachers.

- **Per-phase training**: a phase's ``train`` lists model names or ``model.pattern``
  (``["unet", "text_encoder.*.q_proj"]``); at ``phase_start`` everything else is frozen.
  A phase without ``train`` leaves every model's trainable parameters training.
- **Step ranges**: ``train: {text_encoder: {until: 100}}`` trains the text encoder for the
  first 100 optimizer steps only (``from`` starts later); rules only ever freeze.
- **What can train** (a model's *trainable set*) is what was trainable when the plugin
  first saw it (after adapters were added: then only the adapters), or the whole model
  when it was fully frozen and a phase or rule names it. Frozen parameters stay in the
  optimizer with ``grad = None`` (torch optimizers skip them), so the optimizer's layout
  never depends on the clock and a resume across a phase boundary is exact: the plan is a
  pure function of the clock and the phase.
- **EMA** with diffusers' ``EMAModel`` decay formula (warmup with ``inv_gamma`` / ``power``,
  ``update_after_step``, ``min_decay``), step for step equal; on the CPU if asked; of the
  adapter weights only when the model has adapters; checkpointed with the plugin.
  :meth:`ModelScheduler.ema_weights` swaps the averaged weights in for evaluation or sampling.
- **Teachers** are frozen and kept in eval mode.

Changes of ``requires_grad`` happen at ``phase_start`` or after an optimizer step, and are
followed by the slot ``rewrap_models`` (docs/TRAPS.md: DDP and structural changes).
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.plugins import closest
from . import groups as _groups

__all__ = ["EMASpec", "StepRule", "EMA", "ema_decay", "ModelScheduler"]


class EMASpec(BaseModel):
    """One EMA copy (``model_sched.ema``); the arguments of diffusers' ``EMAModel``.

    Args:
        model: the model in ``state.models``.
        decay, min_decay, update_after_step, inv_gamma, power: as ``EMAModel``.
        warmup: ``use_ema_warmup`` (``1 - (1 + t / inv_gamma) ** -power``).
        cpu: keep the averaged weights on the CPU.
        update_every: update after every N optimizer steps (each update counts one
            ``EMAModel.step``).
        params: ``auto`` (the trainable parameters when the model has adapters, else all),
            ``all`` or ``trainable``.
        evaluate: run the ``evaluate`` slot with the EMA weights swapped in.
        save: write the EMA weights to ``RUN_DIR/ema/<model>.safetensors`` at the end.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    decay: float = Field(default=0.9999, ge=0.0, le=1.0)
    min_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    update_after_step: int = Field(default=0, ge=0)
    warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    cpu: bool = False
    update_every: int = Field(default=1, ge=1)
    params: Literal["auto", "all", "trainable"] = "auto"
    evaluate: bool = False
    save: bool = False

    @field_validator("power", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        # "2/3" in a recipe is a fraction, never code.
        return float(Fraction(value)) if isinstance(value, str) else value


class StepRule(BaseModel):
    """A step range in which a model (or ``model.pattern``) may train: ``[from, until)``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: int = Field(default=0, ge=0, alias="from")
    until: int | None = Field(default=None, ge=0)

    def allows(self, step: int) -> bool:
        return step >= self.start and (self.until is None or step < self.until)


def ema_decay(spec: EMASpec, optimization_step: int) -> float:
    """diffusers' ``EMAModel.get_decay`` for the ``optimization_step``-th update (1-based)."""
    step = max(0, optimization_step - spec.update_after_step - 1)
    if step <= 0:
        return 0.0
    if spec.warmup:
        value = 1 - (1 + step / spec.inv_gamma) ** -spec.power
    else:
        value = (1 + step) / (10 + step)
    return max(min(value, spec.decay), spec.min_decay)


class EMA:
    """Averaged copies of a model's parameters, by parameter name."""

    def __init__(self, spec: EMASpec) -> None:
        self.spec = spec
        self.updates = 0
        self.shadow: dict[str, Any] = {}
        self.params: dict[str, Any] = {}

    def selected(self, model: Any) -> dict[str, Any]:
        """The parameters this EMA averages (see :class:`EMASpec` ``params``)."""
        from .lora import tuner_layers

        named = dict(_groups.unwrap(model).named_parameters())
        mode = self.spec.params
        if mode == "auto":
            mode = "trainable" if tuner_layers(model) else "all"
        if mode == "trainable":
            return {n: p for n, p in named.items() if p.requires_grad or n in self.shadow}
        return named

    def track(self, model: Any) -> None:
        """Start averaging parameters not seen before (adapters added later), from their value now."""
        self.params = self.selected(model)
        for name, param in self.params.items():
            if name not in self.shadow:
                copy = param.detach().clone()
                self.shadow[name] = copy.to("cpu") if self.spec.cpu else copy
        stale = [n for n in self.shadow if n not in self.params]
        if stale:
            raise KeyError(f"model_sched.ema ({self.spec.model}): parameters {stale[:3]} are gone from the model")

    def update(self) -> float:
        """One ``EMAModel.step``: the same operations, so the results are bitwise equal."""
        import torch

        self.updates += 1
        decay = ema_decay(self.spec, self.updates)
        one_minus_decay = 1 - decay
        with torch.no_grad():
            for name, param in self.params.items():
                shadow = self.shadow[name]
                value = param.detach() if param.device == shadow.device else param.detach().to(shadow.device)
                if param.requires_grad:
                    shadow.sub_(one_minus_decay * (shadow - value))
                else:
                    shadow.copy_(value)
        return decay

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the duration; the trained ones back after."""
        import torch

        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {n: t.detach().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for name, tensor in state["shadow"].items():
            device = self.shadow[name].device if name in self.shadow else ("cpu" if self.spec.cpu else tensor.device)
            self.shadow[name] = tensor.detach().clone().to(device)


class ModelScheduler:
    """Plugin ``model_sched``.

    Args:
        models: the models whose training is scheduled (default: all but teachers).
        train: step ranges, ``{model or "model.pattern": {"from": step, "until": step}}``.
        teachers: models that never train and stay in eval mode.
        ema: one EMA copy or a list of them (:class:`EMASpec` fields).
    """

    name = "model_sched"

    def __init__(
        self,
        models: list[str] | None = None,
        train: dict[str, dict[str, int | None]] | None = None,
        teachers: list[str] | None = None,
        ema: dict[str, Any] | list[dict[str, Any]] | None = None,
    ) -> None:
        self.model_names = models
        self.rules = {key: self._validate(StepRule, rule, f"model_sched.train.{key}") for key, rule in (train or {}).items()}
        self.teachers = list(teachers or [])
        specs = [ema] if isinstance(ema, dict) else list(ema or [])
        self.emas = [EMA(self._validate(EMASpec, s, f"model_sched.ema[{i}]")) for i, s in enumerate(specs)]
        names = [e.spec.model for e in self.emas]
        if len(set(names)) != len(names):
            raise ValueError(f"model_sched.ema: one EMA per model, got {names}")
        self.trainable: dict[str, dict[str, Any]] = {}  # model -> {param name: param}
        self._applied: dict[str, frozenset[str]] | None = None

    @staticmethod
    def _validate(cls: type[BaseModel], data: Any, where: str) -> Any:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = "".join(f".{p}" for p in error["loc"])
            raise ValueError(f"{where}{loc}: {error['msg']}") from None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        # After routines build the models (default band) and lora_sched adds adapters;
        # EMA copies start once the trainable sets are final.
        engine.on("setup", self._on_setup, priority="late", after="lora_sched")
        engine.on("setup", self._start_ema, priority="late", after="lora_sched")
        engine.attach("build_optimizer", self._build, priority="early")  # inside layer_sched's
        engine.on("phase_start", self._on_phase_start, priority="early", after="lora_sched")
        engine.on("epoch_start", self._teachers_eval)
        engine.on("step_end", self._on_step_end, priority="first")  # EMA before checkpoints and logs
        if self.emas:
            engine.on("run_end", self._save_ema, before="checkpoint")
        if any(e.spec.evaluate for e in self.emas):
            engine.attach("evaluate", self._evaluate_with_ema, priority="first")

    # ------------------------------------------------------------ naming
    def _models(self) -> dict[str, Any]:
        return self.engine.state.models

    def _split(self, entry: str, where: str) -> tuple[str, str | None]:
        """``"unet"`` -> (unet, None); ``"unet.down_blocks.*"`` -> (unet, "down_blocks.*")."""
        models = self._models()
        for name in sorted(models, key=len, reverse=True):
            if entry == name:
                return name, None
            if entry.startswith(name + "."):
                return name, entry[len(name) + 1 :]
        head = entry.split(".", 1)[0]
        raise KeyError(f"{where}: {entry!r} names no model{closest(head, models)}; models: {sorted(models)}")

    def _phase(self) -> Any:
        return self.engine.state.phase

    def _named_anywhere(self) -> set[str]:
        named = {self._split(k, "model_sched.train")[0] for k in self.rules}
        for phase in self.engine.state.plan.phases:
            named.update(self._split(e, f"phases.{phase.name}.train")[0] for e in phase.train or [])
        return named

    # --------------------------------------------------------- discovery
    def discover(self) -> None:
        """Record each managed model's trainable set; new trainable parameters join it."""
        models = self._models()
        names = self.model_names if self.model_names is not None else [n for n in models if n not in self.teachers]
        named = self._named_anywhere()
        for name in names:
            if name not in models:
                raise KeyError(f"model_sched.models: no model named {name!r}{closest(name, models)}")
            model = self.engine.runtime.unwrap(models[name])
            if not hasattr(model, "named_parameters"):
                continue
            params = dict(model.named_parameters())
            known = self.trainable.setdefault(name, {})
            fresh = {n: p for n, p in params.items() if p.requires_grad and n not in known}
            if not known and not fresh and name in named:
                fresh = params  # a fully frozen model that a phase or rule trains
            known.update(fresh)

    def plan(self) -> dict[str, frozenset[str]]:
        """``{model: parameter names that train now}`` from the phase and the step rules."""
        phase = self._phase()
        step = self.engine.state.clock.step
        selected: dict[str, set[str]] = {}
        if phase is not None and phase.train is not None:
            selected = {m: set() for m in self.trainable}
            for entry in phase.train:
                model, pattern = self._split(entry, f"phases.{phase.name}.train")
                if model not in self.trainable:
                    continue
                match = _groups.compile_patterns(pattern) if pattern else None
                hits = {n for n in self.trainable[model] if match is None or match(n)}
                if pattern and not hits:
                    raise ValueError(f"phases.{phase.name}.train: {entry!r} selects no trainable parameter of {model!r}")
                selected[model] |= hits
        else:
            selected = {m: set(params) for m, params in self.trainable.items()}
        for key, rule in self.rules.items():
            if rule.allows(step):
                continue
            model, pattern = self._split(key, "model_sched.train")
            match = _groups.compile_patterns(pattern) if pattern else None
            selected[model] = {n for n in selected.get(model, set()) if match is not None and not match(n)}
        return {m: frozenset(s) for m, s in selected.items()}

    # ------------------------------------------------------------- apply
    def apply(self, rewrap: bool = True) -> bool:
        """Set ``requires_grad`` to the plan; returns whether anything changed."""
        plan = self.plan()
        if plan == self._applied:
            return False
        for model, params in self.trainable.items():
            train = plan.get(model, frozenset())
            for name, param in params.items():
                param.requires_grad_(name in train)
                if name not in train:
                    param.grad = None  # torch optimizers skip parameters without a gradient
        self._applied = plan
        if rewrap and self.engine.has("rewrap_models"):
            self.engine.call("rewrap_models")  # DDP must see the change on every rank
        return True

    def _freeze_teachers(self) -> None:
        models = self._models()
        for name in self.teachers:
            if name not in models:
                raise KeyError(f"model_sched.teachers: no model named {name!r}{closest(name, models)}")
            teacher = self.engine.runtime.unwrap(models[name])
            teacher.requires_grad_(False)
            teacher.eval()

    def _on_setup(self, state: Any) -> None:
        self._freeze_teachers()
        self.discover()
        self.apply(rewrap=False)  # the loop wraps the models after setup

    def _on_phase_start(self, state: Any, phase: Any) -> None:
        self.discover()
        self.apply()

    def _on_step_end(self, state: Any) -> None:
        for ema in self.emas:
            if state.clock.step % ema.spec.update_every == 0:
                state.metrics[f"ema_decay/{ema.spec.model}"] = ema.update()
        if self.rules:
            self.apply()

    def _teachers_eval(self, state: Any) -> None:
        # The loop puts every model in train mode at each phase; teachers go back.
        for name in self.teachers:
            self.engine.runtime.unwrap(state.models[name]).eval()

    def _build(self, next_impl: Any, models: dict[str, Any]) -> Any:
        """Build with every schedulable parameter included (frozen ones have no gradient)."""
        self.discover()
        frozen = [p for params in self.trainable.values() for p in params.values() if not p.requires_grad]
        for param in frozen:
            param.requires_grad_(True)
        try:
            return next_impl({n: m for n, m in models.items() if n not in self.teachers})
        finally:
            for param in frozen:
                param.requires_grad_(False)

    # --------------------------------------------------------------- EMA
    def ema(self, model: str) -> EMA:
        """The EMA copy of ``model``."""
        for ema in self.emas:
            if ema.spec.model == model:
                return ema
        raise KeyError(f"model_sched: no EMA of {model!r}; EMAs: {[e.spec.model for e in self.emas]}")

    def _start_ema(self, state: Any) -> None:
        for ema in self.emas:
            if ema.spec.model not in state.models:
                raise KeyError(
                    f"model_sched.ema: no model named {ema.spec.model!r}{closest(ema.spec.model, state.models)}; "
                    f"models: {sorted(state.models)}"
                )
            ema.track(self.engine.runtime.unwrap(state.models[ema.spec.model]))
        if self.emas:
            self.engine.on("phase_start", self._retrack, priority="early", after="lora_sched")

    def _retrack(self, state: Any) -> None:
        # Adapters added at a phase start join the average from their value then.
        for ema in self.emas:
            ema.track(self.engine.runtime.unwrap(state.models[ema.spec.model]))

    @contextlib.contextmanager
    def ema_weights(self, models: str | list[str] | None = None) -> Iterator[None]:
        """Evaluate or sample with the EMA weights of ``models`` (default: every EMA) swapped in."""
        wanted = [models] if isinstance(models, str) else models
        chosen = [e for e in self.emas if wanted is None or e.spec.model in wanted]
        if wanted is not None and len(chosen) != len(wanted):
            missing = sorted(set(wanted) - {e.spec.model for e in chosen})
            raise KeyError(f"model_sched: no EMA of {missing}; EMAs: {[e.spec.model for e in self.emas]}")
        with contextlib.ExitStack() as stack:
            for ema in chosen:
                stack.enter_context(ema.swapped_in())
            yield

    def _evaluate_with_ema(self, next_impl: Any, *args: Any, **kwargs: Any) -> Any:
        with self.ema_weights([e.spec.model for e in self.emas if e.spec.evaluate]):
            return next_impl(*args, **kwargs)

    def _save_ema(self, state: Any) -> None:
        if not state.is_main_process:
            return
        from safetensors.torch import save_file

        folder = Path(state.run_dir or "runs/default") / "ema"
        for ema in self.emas:
            if ema.spec.save:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{ema.spec.model}.safetensors.tmp"
                save_file({n: t.detach().cpu().contiguous() for n, t in ema.shadow.items()}, str(tmp))
                tmp.replace(folder / f"{ema.spec.model}.safetensors")

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"ema": {e.spec.model: e.state_dict() for e in self.emas}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("ema", {})
        for ema in self.emas:
            if ema.spec.model not in saved:
                raise KeyError(f"checkpoint has no EMA of {ema.spec.model!r}; it has {sorted(saved)}")
            ema.load_state_dict(saved[ema.spec.model])
            ema.track(self.engine.runtime.unwrap(self._models()[ema.spec.model]))
