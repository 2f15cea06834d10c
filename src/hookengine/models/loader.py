"""Load any model: diffusers pipelines and components, transformers models and tokenizers,
any class with ``from_pretrained``, single-file safetensors checkpoints; local or from the hub.

Hook points (the plugin :class:`ModelLoader` attaches the base implementations):

- slot ``load_model(spec) -> model``: the whole load; wrap it to change the spec before or
  patch the model after.
- event ``model_load_start(spec=)``: listeners may change the (mutable) :class:`ModelSpec`.
- slot ``load_component(name, spec) -> component``: one component of a pipeline, before the
  pipeline is assembled; wrap it to swap a component (another VAE, a LoRA-patched UNet).
- event ``model_component(name=, component=, spec=, components=)``: after each component;
  a listener may replace ``components[name]``.
- event ``model_loaded(name=, model=, spec=)``: the model is registered in
  ``state.models[name]`` before this fires, so a listener may patch it or replace that entry.

A folder with ``hookengine_model.json`` (a plain torch module exported by
:mod:`hookengine.training.export`) loads as kind ``torch``: the model class (or function
marked ``@model_factory``) it names, built with its options, and the weights from
``model.safetensors``; anything else it names is refused before it is called.

Safe by default: safetensors only (pickle refused unless ``allow_pickle=True`` for that
load), ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..core.points import BASE_PRIORITY
from .safety import ModelLoadError, UnsafeFileError, check_file, check_folder, class_reference

__all__ = ["ModelSpec", "ModelLoader", "ModelLoadError", "UnsafeFileError", "load_model", "detect_kind", "resolve_class"]

KINDS = ("pipeline", "diffusers", "transformers", "tokenizer", "class", "single_file", "torch")
# A plain torch module exported by hookengine (training/export.py): its class and options.
TORCH_SPEC = "hookengine_model.json"

# Repo ids are "name" or "owner/name"; anything else that does not exist is a missing path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# transformers Auto classes, most specific first, with the name of their architecture table.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


@dataclass
class ModelSpec:
    """What to load. Mutable on purpose: ``model_load_start`` listeners may change it.

    ``source`` is a local folder, a local file, or a hub repo id (with ``revision``).
    ``kind`` (one of ``pipeline, diffusers, transformers, tokenizer, class, single_file, torch``)
    is worked out from the files when not given; ``cls`` (a class, ``"module:Class"`` or a
    transformers/diffusers class name) implies ``kind="class"`` for folders.
    ``components`` overrides pipeline components: name -> object, spec mapping or source.
    ``options`` are passed on to ``from_pretrained`` / ``from_single_file`` as they are.
    """

    source: str | Path
    name: str | None = None
    kind: str | None = None
    cls: Any = None
    subfolder: str | None = None
    revision: str | None = None
    dtype: Any = None
    variant: str | None = None
    device: str | None = None
    device_map: Any = None
    components: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: str | None = None
    endpoint: str | None = None  # a hub mirror; default: HF_ENDPOINT / huggingface_hub's
    register: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the local file or folder, filled in when the source is resolved
    parent: "ModelSpec | None" = None  # for a pipeline component: the pipeline's spec

    @classmethod
    def coerce(cls, value: Any, name: str | None = None, **defaults: Any) -> "ModelSpec":
        """A spec from a spec, a source string/path, or a mapping of spec fields."""
        if isinstance(value, ModelSpec):
            spec = value  # the same object: what listeners change, the caller sees
        elif isinstance(value, (str, Path)):
            spec = cls(source=value)
        elif isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ModelLoadError(f"model spec {name or value.get('name')!r}: unknown key(s) {unknown}; known: {sorted(known)}")
            if "source" not in value:
                raise ModelLoadError(f"model spec {name or value.get('name')!r} has no 'source' (a folder, file or hub repo id)")
            spec = cls(**value)
        else:
            raise ModelLoadError(f"cannot make a model spec from {type(value).__name__} {value!r}")
        if name is not None and spec.name is None:
            spec.name = name
        for key, default in defaults.items():
            if getattr(spec, key) in (None, False):
                setattr(spec, key, default)
        return spec

    @property
    def display_name(self) -> str:
        """The name the model is registered under (given, else derived from the source)."""
        if self.name:
            return self.name
        source = str(self.source)
        base = Path(source).name if _is_local(source) else source
        return f"{base}/{self.subfolder}" if self.subfolder else base


# --------------------------------------------------------------- resolution
def _is_local(source: str | Path) -> bool:
    text = str(source)
    return isinstance(source, Path) or os.path.exists(text) or not _REPO_ID.match(text) or text.startswith((".", "~"))


def resolve_source(spec: ModelSpec) -> Path:
    """The local file or folder for a spec; hub repo ids go through the huggingface_hub cache."""
    source = str(spec.source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _is_local(spec.source):
        raise ModelLoadError(f"model {spec.display_name!r}: no such file or folder {source!r}")
    return _download(spec)


def _download(spec: ModelSpec) -> Path:
    """``snapshot_download`` (or the cached snapshot when offline); pickle files skipped unless allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    ignore = None if spec.allow_pickle else ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.pickle"]
    allow = [f"{spec.subfolder}/*", "*.json", "*.txt"] if spec.subfolder else None
    try:
        folder = snapshot_download(
            str(spec.source),
            revision=spec.revision,
            cache_dir=spec.cache_dir,
            # Read HF_ENDPOINT now, not when huggingface_hub was imported.
            endpoint=spec.endpoint or os.environ.get("HF_ENDPOINT") or None,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelLoadError(f"model {spec.display_name!r}: hub repo {str(spec.source)!r} (revision {spec.revision or 'main'}) not found: {exc}") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {spec.display_name!r}: {str(spec.source)!r} is not a local path, and as a hub repo id "
            f"(revision {spec.revision or 'main'}) it is not in the local cache and cannot be downloaded "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"model {spec.display_name!r}: downloading {str(spec.source)!r} failed: {exc}") from exc
    return Path(folder)


def resolve_class(reference: Any) -> type:
    """A class from a class, ``"module:Class"``, or a class name found in transformers or diffusers."""
    if isinstance(reference, type):
        return reference
    text = str(reference)
    if ":" in text:
        return class_reference(text)  # checked to be a model class before anything calls it
    for library in ("transformers", "diffusers"):
        try:
            module = importlib.import_module(library)
        except ImportError:
            continue
        obj = getattr(module, text, None)
        if isinstance(obj, type):
            return obj
    raise ModelLoadError(f"no class named {text!r} in transformers or diffusers; use 'module:Class'")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {str(path)!r}: {exc}") from exc


def detect_kind(folder: Path, spec: ModelSpec) -> str:
    """Work out the kind of model in ``folder`` (already including the subfolder)."""
    if spec.cls is not None:
        return "single_file" if folder.is_file() else "class"
    if folder.is_file():
        raise ModelLoadError(
            f"model {spec.display_name!r}: {str(folder)!r} is a single file; say which class reads it, "
            "e.g. cls='diffusers:StableDiffusionPipeline' or cls='diffusers:AutoencoderKL' (with options.config)"
        )
    if (folder / TORCH_SPEC).is_file():
        return "torch"
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / "scheduler_config.json").is_file():
        return "diffusers"
    config_path = folder / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if "_class_name" in config:
            return "diffusers"
        if "architectures" in config or "model_type" in config:
            return "transformers"
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return "tokenizer"
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise ModelLoadError(
        f"model {spec.display_name!r}: folder {str(folder)!r} is no model: it has no model_index.json, "
        f"config.json (with a transformers architecture or diffusers _class_name), scheduler_config.json "
        f"or tokenizer files (found {present}); give kind= and cls= if it is a custom format"
    )


def _auto_class(config: dict[str, Any]) -> type:
    """The transformers Auto class whose table lists the config's architecture."""
    import transformers
    from transformers.models.auto import modeling_auto

    for architecture in config.get("architectures") or []:
        for auto_name, table_name in _AUTO_CLASSES:
            table = getattr(modeling_auto, table_name, {})
            for value in table.values():
                names = value if isinstance(value, (tuple, list)) else (value,)
                if architecture in names:
                    return getattr(transformers, auto_name)
        direct = getattr(transformers, architecture, None)
        if isinstance(direct, type):
            return direct
    return transformers.AutoModel


# Any one of these holds a tokenizer's vocabulary; a folder with none of them would load
# as an empty tokenizer (transformers raises nothing) and fail much later.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model",
                     "sentencepiece.bpe.model", "vocab.model")


def _check_vocabulary(folder: Path) -> None:
    if folder.is_dir() and not any((folder / name).is_file() for name in _VOCABULARY_FILES):
        present = sorted(p.name for p in folder.iterdir())
        raise ModelLoadError(
            f"tokenizer folder {folder} has no vocabulary file (one of {list(_VOCABULARY_FILES)}); "
            f"it holds {present}"
        )


def _torch_dtype(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    import torch

    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"unknown dtype {value!r}; use e.g. 'float32', 'float16', 'bfloat16'")
    return dtype


def _weight_kwargs(cls: type, spec: ModelSpec) -> dict[str, Any]:
    """Keyword arguments for loading weights with a transformers or diffusers class."""
    module = cls.__module__.split(".")[0]
    kwargs: dict[str, Any] = {}
    if spec.dtype is not None:
        kwargs["dtype" if module == "transformers" else "torch_dtype"] = _torch_dtype(spec.dtype)
    if spec.variant is not None:
        kwargs["variant"] = spec.variant
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    if not spec.allow_pickle:
        kwargs["use_safetensors"] = True
    return kwargs


def _is_module_class(cls: type) -> bool:
    import torch

    return issubclass(cls, torch.nn.Module)


# ------------------------------------------------------------------- loader
class ModelLoader:
    """Plugin ``model_loader``: the ``load_model`` and ``load_component`` slots.

    Options: ``models`` (name -> spec mapping or source) loaded when the plugin is used
    (``load_on="use"``) or on the ``setup`` event (``load_on="setup"``, so plugins used
    later can hook the loads); ``allow_pickle`` and ``trust_remote_code`` as defaults for
    every spec (both off); ``cache_dir`` for hub downloads.

    Usable without an engine: ``ModelLoader().load("path/or/repo")``.
    """

    def __init__(
        self,
        models: dict[str, dict[str, Any] | str] | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        load_on: str = "use",
    ) -> None:
        if load_on not in ("use", "setup"):
            raise ModelLoadError(f"model_loader.load_on must be 'use' or 'setup', got {load_on!r}")
        self.models = dict(models or {})
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.cache_dir = cache_dir
        self.load_on = load_on
        self.engine: Any = None
        self.loaded: dict[str, Any] = {}

    # ------------------------------------------------------------ plugin
    def setup(self, engine: Any) -> None:
        """Attach the base ``load_model`` / ``load_component`` implementations (innermost)."""
        self.engine = engine
        engine.attach("load_model", self._load_model_slot, priority=BASE_PRIORITY)
        engine.attach("load_component", self._load_component_slot, priority=BASE_PRIORITY)
        if self.load_on == "use":
            self.load_all()
        else:
            engine.on("setup", lambda: self.load_all(), priority="first")

    def load_all(self) -> dict[str, Any]:
        """Load every model named in the ``models`` option; returns name -> model."""
        return {name: self.load(spec, name=name) for name, spec in self.models.items()}

    # ------------------------------------------------------------ public
    def load(self, spec: Any, name: str | None = None) -> Any:
        """Load a model from a spec (through the ``load_model`` slot when an engine is attached)."""
        spec = ModelSpec.coerce(
            spec, name=name, allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir
        )
        if self.engine is not None:
            return self.engine.call("load_model", spec)
        return self._load(spec)

    # ------------------------------------------------------------- hooks
    def _fire(self, point: str, **payload: Any) -> None:
        if self.engine is not None:
            self.engine.fire(point, **payload)

    def _call_component(self, name: str, spec: ModelSpec) -> Any:
        if self.engine is not None:
            return self.engine.call("load_component", name, spec)
        return self._load_component(name, spec)

    def _load_model_slot(self, next_impl: Callable[..., Any], spec: Any) -> Any:
        return self._load(ModelSpec.coerce(spec, allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code))

    def _load_component_slot(self, next_impl: Callable[..., Any], name: str, spec: ModelSpec) -> Any:
        return self._load_component(name, spec)

    # --------------------------------------------------------------- work
    def _load(self, spec: ModelSpec) -> Any:
        """The whole load: start event, resolve, check, load by kind, place, register, loaded event."""
        self._fire("model_load_start", spec=spec)
        name = spec.display_name
        root = resolve_source(spec)
        spec.path = root
        target = root / spec.subfolder if spec.subfolder else root
        if not target.exists():
            raise ModelLoadError(f"model {name!r}: no subfolder {spec.subfolder!r} in {str(root)!r}")
        kind = spec.kind or detect_kind(target, spec)
        if kind not in KINDS:
            raise ModelLoadError(f"model {name!r}: unknown kind {kind!r}; known: {list(KINDS)}")
        if target.is_file():
            check_file(target, spec.allow_pickle, name)
        else:
            check_folder(target, spec.allow_pickle, name)
        try:
            model = self._load_kind(kind, root, target, spec)
        except (ModelLoadError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {name!r}: loading {kind} from {str(target)!r} failed: {type(exc).__name__}: {exc}") from exc
        _remember_source(model, spec, target)
        model = self._place(model, spec)
        if spec.register:
            self.loaded[name] = model
            if self.engine is not None:
                self.engine.state.models[name] = model
        self._fire("model_loaded", name=name, model=model, spec=spec)
        # A listener may have replaced the registered entry.
        if spec.register and self.engine is not None:
            model = self.engine.state.models.get(name, model)
        return model

    @staticmethod
    def _place(model: Any, spec: ModelSpec) -> Any:
        """Move to ``spec.device`` (a device map already placed the weights while loading)."""
        if spec.device is None or spec.device_map is not None or not hasattr(model, "to"):
            return model
        moved = model.to(spec.device)
        return model if moved is None else moved

    def _load_kind(self, kind: str, root: Path, target: Path, spec: ModelSpec) -> Any:
        if kind == "pipeline":
            return self._load_pipeline(root, target, spec)
        if kind == "single_file":
            return self._load_single_file(target, spec)
        if kind == "torch":
            return self._load_torch(target, spec)
        if kind == "tokenizer":
            from transformers import AutoTokenizer

            _check_vocabulary(target)
            cls: type = resolve_class(spec.cls) if spec.cls is not None else AutoTokenizer
            return cls.from_pretrained(str(root), **self._common_kwargs(spec), **spec.options)
        if kind == "transformers":
            cls = resolve_class(spec.cls) if spec.cls is not None else _auto_class(_read_json(target / "config.json"))
            return self._from_pretrained(cls, root, spec)
        if kind == "diffusers":
            if spec.cls is not None:
                cls = resolve_class(spec.cls)
            else:
                config_file = target / "config.json" if (target / "config.json").is_file() else target / "scheduler_config.json"
                cls = resolve_class(_read_json(config_file)["_class_name"])
            return self._from_pretrained(cls, root, spec)
        # kind == "class"
        if spec.cls is None:
            raise ModelLoadError(f"model {spec.display_name!r}: kind 'class' needs cls= ('module:Class')")
        cls = resolve_class(spec.cls)
        if not hasattr(cls, "from_pretrained"):
            raise ModelLoadError(f"model {spec.display_name!r}: class {cls.__qualname__} has no from_pretrained")
        return self._from_pretrained(cls, root, spec)

    def _common_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if spec.subfolder:
            kwargs["subfolder"] = spec.subfolder
        if spec.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs

    def _from_pretrained(self, cls: type, root: Path, spec: ModelSpec) -> Any:
        """``cls.from_pretrained`` with weight options only for weight-holding library classes."""
        kwargs = self._common_kwargs(spec)
        library = cls.__module__.split(".")[0]
        known_library = library in ("transformers", "diffusers")
        is_module = _is_module_class(cls)
        if known_library and is_module:
            kwargs.update(_weight_kwargs(cls, spec))
        model = cls.from_pretrained(str(root), **kwargs, **spec.options)
        if is_module and not known_library and spec.dtype is not None:
            model = model.to(_torch_dtype(spec.dtype))  # unknown classes: cast after loading
        return model

    def _load_torch(self, target: Path, spec: ModelSpec) -> Any:
        """A plain torch module: ``hookengine_model.json`` names the class or factory (``module:attr``)
        and its options; the weights are safetensors, loaded strictly."""
        from safetensors.torch import load_file

        meta = _read_json(target / TORCH_SPEC)
        if "class" not in meta:
            raise ModelLoadError(f"model {spec.display_name!r}: {target / TORCH_SPEC} names no 'class'")
        reference = spec.cls if spec.cls is not None else meta["class"]
        # A model class or a function marked @model_factory (what recipes' model: keys name).
        from ..core.plugins import PluginError, resolve

        try:
            build = reference if isinstance(reference, type) else resolve(reference, "model", f"{TORCH_SPEC} class")
        except (PluginError, ImportError) as exc:
            raise ModelLoadError(f"model {spec.display_name!r}: cannot use {target / TORCH_SPEC}: {exc}") from exc
        model = build(**{**meta.get("options", {}), **spec.options})
        weights = target / meta.get("weights", "model.safetensors")
        if not weights.is_file():
            raise ModelLoadError(f"model {spec.display_name!r}: {weights} is missing")
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise ModelLoadError(f"model {spec.display_name!r}: {weights} does not fit {meta['class']}: {str(exc).splitlines()[0]}") from exc
        return model.to(_torch_dtype(spec.dtype)) if spec.dtype is not None else model

    def _load_single_file(self, target: Path, spec: ModelSpec) -> Any:
        cls = resolve_class(spec.cls)
        if not hasattr(cls, "from_single_file"):
            raise ModelLoadError(f"model {spec.display_name!r}: {cls.__qualname__} cannot load single files (no from_single_file)")
        kwargs: dict[str, Any] = {}
        if spec.dtype is not None:
            kwargs["torch_dtype"] = _torch_dtype(spec.dtype)
        return cls.from_single_file(str(target), **kwargs, **spec.options)

    # ---------------------------------------------------------- pipelines
    def _load_pipeline(self, root: Path, target: Path, spec: ModelSpec) -> Any:
        """Each component through the ``load_component`` slot, then ``DiffusionPipeline.from_pretrained``."""
        from diffusers import DiffusionPipeline

        index = _read_json(target / "model_index.json")
        components: dict[str, Any] = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
                continue
            library, class_name = entry
            if library is None and name not in spec.components:
                components[name] = None
                continue
            sub = self._component_spec(name, library, class_name, spec)
            component = self._call_component(name, sub)
            components[name] = component
            self._fire("model_component", name=name, component=component, spec=sub, components=components)
        kwargs: dict[str, Any] = {}
        if spec.subfolder:
            kwargs["subfolder"] = spec.subfolder
        if spec.trust_remote_code:
            kwargs["trust_remote_code"] = True
        # Every component is passed in, so from_pretrained only reads the index and assembles.
        return DiffusionPipeline.from_pretrained(str(root), **kwargs, **components, **spec.options)

    def _component_spec(self, name: str, library: str | None, class_name: str | None, parent: ModelSpec) -> ModelSpec:
        subfolder = f"{parent.subfolder}/{name}" if parent.subfolder else name
        return ModelSpec(
            source=parent.path or parent.source,
            name=f"{parent.display_name}.{name}",
            kind="class",
            cls=f"{library}:{class_name}" if library else None,
            subfolder=subfolder,
            dtype=parent.dtype,
            variant=parent.variant,
            allow_pickle=parent.allow_pickle,
            trust_remote_code=parent.trust_remote_code,
            register=False,
            path=parent.path,
            parent=parent,
        )

    def _load_component(self, name: str, spec: ModelSpec) -> Any:
        """The base component loader: an override from the parent spec, else the component's class."""
        parent_name = spec.parent.display_name if spec.parent is not None else spec.display_name
        override = self._override(name, spec)
        if override is not _NO_OVERRIDE:
            return override
        if spec.cls is None:
            return None
        cls = resolve_class(spec.cls)
        try:
            return self._from_pretrained(cls, Path(spec.path or spec.source), spec)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"model {parent_name!r}: component {name!r} ({cls.__qualname__}) from "
                f"{str(Path(spec.path or spec.source) / (spec.subfolder or ''))!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _override(self, name: str, spec: ModelSpec) -> Any:
        overrides = spec.parent.components if spec.parent is not None else {}
        if name not in overrides:
            return _NO_OVERRIDE
        value = overrides[name]
        if value is None or not isinstance(value, (str, Path, dict, ModelSpec)):
            return value  # an object (or None to drop the component)
        sub = ModelSpec.coerce(value, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code)
        sub.register = False
        if sub.name is None:
            sub.name = spec.name
        return self._load(sub)


_NO_OVERRIDE = object()


def _remember_source(model: Any, spec: ModelSpec, target: Path) -> None:
    """Tag a loaded model (and a pipeline's modules) with where it came from.

    ``hookengine_source`` is what lean checkpoints name as the frozen base and what
    exported adapters give as ``base_model_name_or_path``: the local folder, or the hub id.
    """
    local = _is_local(spec.source) or Path(str(spec.source)).exists()
    source = str(target.resolve()) if local else str(spec.source)
    parts = [(model, source)]
    for name, component in (getattr(model, "components", None) or {}).items():
        parts.append((component, str(target.resolve() / name) if local else source))
    for obj, where in parts:
        if hasattr(obj, "parameters") and not isinstance(obj, type):
            try:
                object.__setattr__(obj, "hookengine_source", where)
            except (AttributeError, TypeError):  # objects with __slots__
                pass


def load_model(spec: Any, **fields_: Any) -> Any:
    """Load one model without an engine: ``load_model("folder")`` or ``load_model(source=..., kind=...)``."""
    if fields_:
        spec = {"source": spec, **fields_} if not isinstance(spec, dict) else {**spec, **fields_}
    return ModelLoader().load(spec)
