"""The ``lora_sched`` plugin: PEFT adapters added, scaled over time, merged, saved, loaded.

Adapters are injected into the models in place (:mod:`hookengine.sched.lora_ops`), so
``state.models`` keeps the same objects and every routine keeps working.

- **Targets** are globs or ``re:`` regular expressions on module names; a pattern matches
  a module or any module above it (``"down_blocks.0"`` adapts every layer inside it).
  A pattern that matches no adaptable module is an error naming the pattern and the
  closest module names.
- **Scale**: each adapter's scale is a schedule of the optimizer step, written with
  PEFT's ``set_scale`` (absolute, relative to ``alpha / r``) before every batch. All of
  the plugin's adapters stay active; a scale of 0 switches one off without touching
  ``requires_grad`` inside a phase (docs/TRAPS.md: DDP and structural changes).
- **Later adapters** (``start_phase``) are injected when their phase starts; the models
  are re-wrapped and the optimizer gets a new param group. A resume re-injects them
  before the checkpoint is loaded, so the optimizer layout matches.
- **Files**: at the end of a run each adapter is written to ``RUN_DIR/lora/<adapter>/`` as
  PEFT folders, a diffusers file and a kohya file (:mod:`hookengine.sched.lora_files`,
  whose :func:`~hookengine.sched.lora_files.load_lora` reads all three back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from ..core.fsdp import full_tensors
from ..core.plugins import closest
from .lora_files import save_lora
from .lora_ops import (  # tuner_layers is also imported from here by sched/model.py
    AdapterSpec,
    _config_class,
    activate_adapters,
    adapter_state_dict,
    add_adapter,
    match_targets,
    merge_adapters,
    peft_config,
    tuner_layers,
)

__all__ = ["LoraScheduler"]


# ----------------------------------------------------------------------- plugin
class LoraScheduler:
    """Plugin ``lora_sched``: adapters through PEFT, their scales over time, merge, files.

    Args:
        model: the model(s) in ``state.models`` that get the adapters.
        adapters: ``{name: AdapterSpec fields}`` (method, rank, alpha, dropout, targets,
            rank_pattern, alpha_pattern, scale, start_phase, models, trainable, options).
        merge_at_end: merge the adapters into the base weights when the run ends (after
            the final checkpoint and the adapter files).
        save: file formats written at the end: ``peft``, ``diffusers``, ``kohya``.
        save_dir: where (default ``RUN_DIR/lora``); each adapter gets a folder.
        kohya_prefixes: ``{model: prefix}`` for kohya keys beyond ``unet`` (``lora_unet``),
            ``text_encoder`` (``lora_te``) and ``text_encoder_2`` (``lora_te2``).
    """

    name = "lora_sched"

    def __init__(
        self,
        model: str | list[str] = "model",
        adapters: dict[str, dict[str, Any]] | None = None,
        merge_at_end: bool = False,
        save: list[Literal["peft", "diffusers", "kohya"]] | None = None,
        save_dir: str | None = None,
        kohya_prefixes: dict[str, str] | None = None,
    ) -> None:
        from .optim import value_schedule

        self.models = [model] if isinstance(model, str) else list(model)
        self.specs: dict[str, AdapterSpec] = {}
        for name, options in (adapters or {}).items():
            try:
                self.specs[name] = AdapterSpec.model_validate(options)
            except ValidationError as exc:
                error = exc.errors()[0]
                loc = ".".join(str(p) for p in error["loc"])
                raise ValueError(f"lora_sched.adapters.{name}.{loc}: {error['msg']}") from None
            _config_class(self.specs[name].method)  # unknown methods fail now, not at setup
        if not self.specs:
            raise ValueError("lora_sched.adapters: give at least one adapter")
        if "kohya" in (save or []):
            other = [n for n, s in self.specs.items() if s.method.lower() not in ("lora", "rslora")]
            if other:
                raise ValueError(f"lora_sched.save: kohya files hold LoRA / rsLoRA only; adapters {other} are not")
        self.scales = {n: value_schedule(s.scale, f"lora_sched.adapters.{n}.scale") for n, s in self.specs.items()}
        self.merge_at_end = merge_at_end
        self.formats = list(save or [])
        self.save_dir = save_dir
        self.kohya_prefixes = kohya_prefixes or {}
        self.added: list[str] = []  # in order; "late" ones are re-added on resume
        self._late: list[str] = []
        self._applied: dict[str, float] = {}  # adapter -> scale written last
        self._adapters_of: dict[str, list[str]] = {}  # model -> adapters in it
        self._layers: dict[str, list[Any]] = {}  # model -> its PEFT layers

    def setup(self, engine: Any) -> None:
        self.engine = engine
        # After the routines build the models (default band), before model_sched and
        # layer_sched look at which parameters train (they run after lora_sched).
        engine.on("setup", self._on_setup, priority="late")
        engine.on("phase_start", self._on_phase_start, priority="early")
        engine.on("batch_start", self._write_scales, priority="first")
        engine.on("run_end", self._save, before="checkpoint")  # the final checkpoint may merge
        engine.on("run_end", self._merge, after="checkpoint")
        engine.attach("load_checkpoint", self._before_load, priority="early")

    # ------------------------------------------------------------- adding
    def _targets_of(self, name: str) -> dict[str, list[str]]:
        """``{model: [module names]}`` of adapter ``name``."""
        spec = self.specs[name]
        models = self.engine.state.models
        wanted = spec.models or (list(spec.targets) if isinstance(spec.targets, dict) else self.models)
        out = {}
        for model_name in wanted:
            if model_name not in models:
                raise KeyError(
                    f"lora_sched.adapters.{name}: no model named {model_name!r}{closest(model_name, models)}; "
                    f"models: {sorted(models)}"
                )
            patterns = spec.targets.get(model_name, []) if isinstance(spec.targets, dict) else spec.targets
            if patterns:
                where = f"lora_sched.adapters.{name}.targets (model {model_name!r})"
                out[model_name] = match_targets(models[model_name], patterns, where)
        return out

    def add(self, name: str) -> list[Any]:
        """Inject adapter ``name`` into its models; returns its new trainable parameters."""
        spec = self.specs[name]
        models = self.engine.state.models
        params = []
        for model_name, targets in self._targets_of(name).items():
            model = self.engine.runtime.unwrap(models[model_name])
            before = {id(p) for p in model.parameters()}
            add_adapter(model, name, peft_config(spec, targets))
            self._adapters_of.setdefault(model_name, []).append(name)
            self._layers[model_name] = [layer for _, layer in tuner_layers(model)]  # scales are written per batch
            frozen = [n for n in self.added + [name] if not self.specs[n].trainable]
            activate_adapters(model, self.added + [name], frozen)
            device = next((p.device for p in model.parameters() if id(p) in before), None)
            new = [p for p in model.parameters() if id(p) not in before]
            if device is not None:
                for p in new:  # adapters are created on the CPU; follow the base model
                    p.data = p.data.to(device)
            params += [p for p in new if p.requires_grad]
        self.added.append(name)
        self._applied.pop(name, None)
        return params

    def _on_setup(self, state: Any) -> None:
        early = [n for n, s in self.specs.items() if s.start_phase is None]
        phases = self.engine.state.plan.phase_names
        for name, spec in self.specs.items():
            if spec.start_phase is not None and phases and spec.start_phase not in phases:
                raise ValueError(
                    f"lora_sched.adapters.{name}.start_phase: no phase named {spec.start_phase!r}"
                    f"{closest(spec.start_phase, phases)}; phases: {phases}"
                )
        params = [p for name in early for p in self.add(name)]
        if params and state.optimizers:  # someone built the optimizer already
            self._extend_optimizer(params)
        self._write_scales(state)

    def _on_phase_start(self, state: Any, phase: Any) -> None:
        due = [n for n, s in self.specs.items() if s.start_phase == phase.name and n not in self.added]
        if not due:
            return
        params = [p for name in due for p in self.add(name)]
        self._late += due
        self._rewrap()
        self._extend_optimizer(params)
        self._write_scales(state)

    def _rewrap(self) -> None:
        # DDP must see the new trainable parameters on every rank (docs/TRAPS.md).
        if self.engine.has("rewrap_models"):
            self.engine.call("rewrap_models")

    def _extend_optimizer(self, params: list[Any]) -> None:
        """Give the optimizer the new parameters: a new param group like the first one."""
        if not params:
            return
        state = self.engine.state
        if not state.optimizers:
            optimizer = self.engine.call("build_optimizer", state.models)
            state.optimizers["main"] = self.engine.runtime.prepare_optimizer(optimizer)
            return
        optimizer = state.optimizers.get("main") or next(iter(state.optimizers.values()))
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**group, "params": params})

    # ------------------------------------------------------------- scales
    def _write_scales(self, state: Any) -> None:
        """Set every adapter's scale to its schedule at this step (absolute, never compounded)."""
        step = state.clock.step
        for name in self.added:
            value = float(self.scales[name](step))
            if self._applied.get(name) == value:
                continue
            for model_name in self._models_with(name):
                for layer in self._layers[model_name]:
                    if hasattr(layer, "set_scale"):
                        layer.set_scale(name, value)
                    elif value != 1.0:
                        raise ValueError(f"lora_sched.adapters.{name}.scale: {type(layer).__name__} has no scale")
            self._applied[name] = value

    def _models_with(self, name: str) -> list[str]:
        return [m for m, names in self._adapters_of.items() if name in names]

    # ------------------------------------------------------------- resume
    def _before_load(self, next_impl: Any, path: Any) -> Any:
        """Re-add the adapters the checkpoint's run had added at phase starts, in that order."""
        late = self._late_in_checkpoint(Path(path))
        params = [p for name in late if name not in self.added for p in self.add(name)]
        self._late += [n for n in late if n not in self._late]
        if params:
            self._rewrap()
            self._extend_optimizer(params)
        return next_impl(path)

    def _late_in_checkpoint(self, path: Path) -> list[str]:
        from ..training.checkpoint import latest_checkpoint

        if not (path / "state.json").is_file():
            path = latest_checkpoint(path) or path
        meta = path / "state.json"
        if not meta.is_file():
            return []  # the loader reports the missing checkpoint
        saved = json.loads(meta.read_text()).get("plugins", {}).get(self.plugin_name, {})
        late = saved.get("late", [])
        unknown = [n for n in late if n not in self.specs]
        if unknown:
            raise ValueError(f"checkpoint {path} has adapters {unknown} that lora_sched.adapters does not define")
        return list(late)

    def state_dict(self) -> dict[str, Any]:
        return {"late": list(self._late)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._applied.clear()  # scales are rewritten from the restored clock

    # ---------------------------------------------------------------- end
    def _component_models(self, name: str) -> dict[str, Any]:
        models = self.engine.state.models
        return {m: self.engine.runtime.unwrap(models[m]) for m in self._models_with(name)}

    def _save(self, state: Any) -> None:
        if not self.formats:
            return
        sharded = self.engine.runtime.sharded
        root = Path(self.save_dir) if self.save_dir else Path(state.run_dir or "runs/default") / "lora"
        for name in self.added:
            models = self._component_models(name)
            weights = None
            if sharded:  # runtime.fsdp: each process holds a shard; all gather, the main process writes
                weights = {c: full_tensors(adapter_state_dict(m, name)) for c, m in models.items()
                           if name in getattr(m, "peft_config", {})}
            if state.is_main_process:
                save_lora(models, name, root / name, self.formats, self.kohya_prefixes, weights=weights)

    def _merge(self, state: Any) -> None:
        if not self.merge_at_end:
            return
        self._write_scales(state)
        for model_name in list(self._adapters_of):
            merge_adapters(state.models[model_name], self.added)
            state.models[model_name] = self.engine.runtime.unwrap(state.models[model_name])
        self._adapters_of.clear()
        self._layers.clear()
