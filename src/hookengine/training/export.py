"""Export trained models in their own ecosystem's format, ready for the tools people use.

Each trained model goes to ``OUT/<name>/`` (``OUT`` defaults to ``RUN_DIR/export``):

- **adapters** (PEFT injected by ``lora_sched``): one folder per adapter with PEFT folders,
  a diffusers file and, for plain LoRA, a kohya file (:func:`hookengine.sched.lora_files.save_lora`);
  PEFT folders carry ``base_model_name_or_path`` / ``task_type`` and the tokenizer, so
  ``AutoPeftModelForCausalLM.from_pretrained`` loads them;
- **pipeline components** (a UNet or text encoder loaded from a diffusers pipeline folder):
  the whole pipeline with its trained components replaced, ``OUT/<pipeline folder name>/``
  (``DiffusionPipeline.from_pretrained``);
- **transformers / diffusers models**: ``save_pretrained`` (transformers models with the
  tokenizer of the folder they came from);
- **Keras models**: ``OUT/<name>/<name>.keras``;
- **plain torch modules**: ``model.safetensors`` and ``hookengine_model.json`` (class and
  constructor options), which ``model_loader`` loads (``load_model("OUT/<name>")``).

:func:`export_run` rebuilds a finished run from the recipe it recorded, loads a checkpoint
and exports; the :class:`ExportPlugin` (``export``) does the same at the end of a run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

from ..sched import groups as _groups

__all__ = ["ExportError", "ExportPlugin", "export_models", "export_run", "trained_models", "TORCH_SPEC", "TORCH_WEIGHTS"]

TORCH_SPEC = "hookengine_model.json"  # what models/loader.py looks for (kind "torch")
TORCH_WEIGHTS = "model.safetensors"
_RUN_RECIPE = "recipe.yaml"  # what a run records at its start (recipe.py)
_LORA_FORMATS = ("peft", "diffusers", "kohya")


class ExportError(RuntimeError):
    """A model cannot be exported (one line naming the model and what to do)."""


# ------------------------------------------------------------------- choosing
def _has_adapters(model: Any) -> bool:
    return bool(getattr(model, "peft_config", None))


def trained_models(state: Any) -> dict[str, Any]:
    """The models of ``state`` that train (a parameter with ``requires_grad``) or hold adapters."""
    out = {}
    for name, model in state.models.items():
        model = state.unwrap(model)
        if not hasattr(model, "parameters"):
            continue
        if _has_adapters(model) or any(getattr(p, "requires_grad", False) for _, p in _groups.named_parameters(model)):
            out[name] = model
    return out


def _pipeline_root(model: Any) -> tuple[Path, str] | None:
    """``(pipeline folder, component name)`` when ``model`` was loaded as a pipeline component."""
    from ..core.model_state import model_source

    source = model_source(model)
    if not source or not Path(source).is_dir():
        return None
    folder = Path(source)
    index = folder.parent / "model_index.json"
    if index.is_file() and folder.name in json.loads(index.read_text()):
        return folder.parent, folder.name
    return None


def _library(model: Any) -> str:
    return type(model).__module__.split(".")[0]


# ------------------------------------------------------------------ exporting
def export_models(
    state: Any,
    out: str | Path,
    models: list[str] | None = None,
    lora_formats: list[str] | tuple[str, ...] = _LORA_FORMATS,
    specs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the trained models of ``state`` (or ``models``, by name) under ``out``.

    ``specs`` gives ``{model: {"class": "module:attr", "options": {...}}}`` for plain torch
    modules whose constructor arguments cannot be read off the module. Returns
    ``{name: folder}`` (adapters and pipelines under their own names).
    """
    out = Path(out)
    chosen = trained_models(state)
    if models is not None:
        missing = [m for m in models if m not in state.models]
        if missing:
            from ..core.plugins import closest

            raise ExportError(f"export.models: no model {missing[0]!r}{closest(missing[0], state.models)}; models: {sorted(state.models)}")
        chosen = {m: state.unwrap(state.models[m]) for m in models}
    written: dict[str, Path] = {}
    adapters: dict[str, dict[str, Any]] = {}
    pipelines: dict[Path, dict[str, Any]] = {}
    for name, model in chosen.items():
        if _has_adapters(model):
            for adapter in model.peft_config:
                adapters.setdefault(adapter, {})[name] = model
            continue
        root = _pipeline_root(model)
        if root is not None:
            pipelines.setdefault(root[0], {})[root[1]] = model
            continue
        written[name] = _export_model(name, model, out / name, (specs or {}).get(name))
    for adapter, parts in adapters.items():
        written[adapter] = _export_adapter(adapter, parts, out / adapter, lora_formats)
    for root, components in pipelines.items():
        written[root.name] = _export_pipeline(root, components, out / root.name)
    return written


def _export_adapter(adapter: str, parts: dict[str, Any], folder: Path, formats: Any) -> Path:
    from ..sched.lora_files import save_lora

    plain = all(
        str(getattr(m.peft_config[adapter], "peft_type", "")).upper().endswith("LORA")
        and not getattr(m.peft_config[adapter], "use_dora", False)
        for m in parts.values()
    )
    chosen = [f for f in formats if f != "kohya" or plain]  # kohya files hold plain LoRA only
    save_lora(parts, adapter, folder, chosen)
    return folder


def _export_pipeline(root: Path, components: dict[str, Any], folder: Path) -> Path:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(root), use_safetensors=True, **components)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _export_model(name: str, model: Any, folder: Path, spec: dict[str, Any] | None = None) -> Path:
    """One model in its own format (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _groups.is_keras(model):
        model.save(str(folder / f"{name}.keras"))
        return folder
    library = _library(model)
    if library in ("transformers", "diffusers") and hasattr(model, "save_pretrained"):
        model.save_pretrained(str(folder), safe_serialization=True)
        if library == "transformers":
            from ..sched.lora_files import base_model_path, copy_tokenizer

            copy_tokenizer(base_model_path(model), folder)
        return folder
    return _export_torch(name, model, folder, spec)


def _export_torch(name: str, model: Any, folder: Path, spec: dict[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    # A model a recipe's factory built carries its reference (routines.base.built_by).
    spec = dict(spec or getattr(model, "hookengine_factory", None) or _constructor(name, model))
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / TORCH_WEIGHTS), metadata={"format": "pt"})
    (folder / TORCH_SPEC).write_text(json.dumps({"format": "torch", "weights": TORCH_WEIGHTS, **spec}, indent=2))
    return folder


def _constructor(name: str, model: Any) -> dict[str, Any]:
    """``{"class": "module:Class", "options": {...}}`` that rebuilds ``model``'s layout.

    Options are the constructor's arguments that the module keeps as attributes of the
    same name (``nn.Linear.in_features``...); the result is checked by building the
    class on the meta device and comparing every state-dict shape.
    """
    import torch

    cls = type(model)
    if "<" in cls.__qualname__:
        raise ExportError(f"export: model {name!r} is a {cls.__qualname__}, a class defined inside a function; "
                          "define it at module level so the export can name it")
    options: dict[str, Any] = {}
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(model, parameter.name, inspect.Parameter.empty)
        if _plain_value(value):
            options[parameter.name] = list(value) if isinstance(value, tuple) else value
    reference = f"{cls.__module__}:{cls.__qualname__}"
    try:
        with torch.device("meta"):
            probe = cls(**options)
        same = {k: tuple(v.shape) for k, v in probe.state_dict().items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot rebuild it alone
        same, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "its layout differs from the one rebuilt from the attributes"
    if not same:
        raise ExportError(
            f"export: cannot work out how to build model {name!r} ({reference}{options or ''}): {why}; "
            f"give export.specs.{name} = {{class: module:attr, options: {{...}}}}"
        )
    return {"class": reference, "options": options}


def _plain_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value)


# --------------------------------------------------------------------- plugin
class ExportPlugin:
    """Plugin ``export``: at the end of a run, every trained model in its own format.

    Writes ``OUT/<name>/`` for each trained model (see :mod:`hookengine.training.export`):
    LoRA adapters as PEFT/diffusers/kohya files, pipelines whole with their trained
    components, transformers/diffusers ``save_pretrained`` folders (with the tokenizer),
    Keras ``.keras`` files, plain torch modules as safetensors plus a spec ``model_loader``
    loads.

    Args:
        out: where to write; default ``RUN_DIR/export``.
        models: names in ``state.models`` to export; default every trained model.
        lora_formats: the adapter file formats (``peft``, ``diffusers``, ``kohya``).
        specs: ``{model: {class: module:attr, options: {...}}}`` for plain torch modules
            whose constructor arguments cannot be read off the module.
    """

    name = "export"

    def __init__(
        self,
        out: str | None = None,
        models: list[str] | None = None,
        lora_formats: list[Literal["peft", "diffusers", "kohya"]] | None = None,
        specs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.out = out
        self.models = models
        self.lora_formats = list(lora_formats) if lora_formats is not None else list(_LORA_FORMATS)
        self.specs = dict(specs or {})
        self.written: dict[str, Path] = {}

    def setup(self, engine: Any) -> None:
        self.engine = engine
        # Before lora_sched may merge the adapters into the base at the end.
        engine.on("run_end", self._export, before="lora_sched")

    def _export(self, state: Any) -> None:
        if not state.is_main_process:
            return
        out = Path(self.out) if self.out else Path(state.run_dir or "runs/default") / "export"
        self.written = export_models(state, out, self.models, self.lora_formats, self.specs)


class _ExportRun:
    """Replaces the loop of a rebuilt run: set up, prepare, load a checkpoint, export."""

    name = "export_run"

    def __init__(self, out: Path, checkpoint: str | Path | None) -> None:
        self.out, self.checkpoint = out, checkpoint
        self.written: dict[str, Path] = {}

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("run", self._run, priority="first")

    def _run(self, next_impl: Any) -> Any:
        engine, state = self.engine, self.engine.state
        state.is_main_process = engine.runtime.is_main_process
        try:
            engine.fire("setup")
            engine.call("prepare")
            path = Path(self.checkpoint) if self.checkpoint else Path(state.run_dir) / "checkpoints"
            engine.call("load_checkpoint", path)
            self.written = export_models(state, self.out)
            return state
        finally:
            engine.fire("teardown")
            engine.runtime.end()


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None) -> dict[str, Path]:
    """Export the trained models of a finished (or interrupted) run.

    The run is rebuilt from ``RUN_DIR/recipe.yaml`` (recorded when it started), its newest
    valid checkpoint (or ``checkpoint``) is loaded, and every trained model is written under
    ``out`` (default ``RUN_DIR/export``). Returns ``{name: folder}``.
    """
    from ..core.engine import Engine

    run_dir = Path(run_dir)
    recipe = run_dir / _RUN_RECIPE
    if not recipe.is_file():
        raise ExportError(f"export: {recipe} does not exist; the run did not record its recipe (runs started from a recipe do)")
    exporter = _ExportRun(Path(out) if out else run_dir / "export", checkpoint)
    engine = Engine()
    engine.use(exporter)
    engine.run(str(recipe), overrides=[f"run_dir={run_dir.resolve()}"])
    return exporter.written
