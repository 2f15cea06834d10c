"""The ``lora_sched`` plugin: PEFT adapters added, scaled over time, merged, saved, loaded.

Adapters are injected into the models in place with PEFT's ``inject_adapter_in_model``
(the way diffusers' ``add_adapter`` does it), so ``state.models`` keeps the same objects
and every routine keeps working. Any PEFT method that ``inject_adapter_in_model`` accepts
can be used: ``lora``, ``dora``, ``rslora``, ``loha``, ``lokr``, ``oft``, ``boft``, ``ia3``...

- **Targets** are globs or ``re:`` regular expressions on module names; a pattern matches
  a module or any module above it (``"down_blocks.0"`` adapts every layer inside it).
  A pattern that matches no adaptable module is an error naming the pattern and the
  closest module names.
- **Scale**: each adapter's scale is a schedule of the optimizer step, written with
  PEFT's ``set_scale`` (absolute, relative to ``alpha / r``) before every batch. All of
  the plugin's adapters stay active; a scale of 0 switches one off without touching
  ``requires_grad`` inside a phase (NOTES.md: DDP and structural changes).
- **Later adapters** (``start_phase``) are injected when their phase starts; the models
  are re-wrapped and the optimizer gets a new param group. A resume re-injects them
  before the checkpoint is loaded, so the optimizer layout matches.
- **Files**: at the end of a run each adapter is written to ``RUN_DIR/lora/<adapter>/`` as
  PEFT folders (``PeftModel.from_pretrained``), a diffusers file
  (``pipe.load_lora_weights``, with the metadata that keeps ``alpha != r`` right) and a
  kohya file (``lora_unet_... .lora_down / lora_up / alpha``, read by ComfyUI, A1111 and
  diffusers). :func:`load_lora` reads all three back.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.plugins import closest
from . import groups as _groups

__all__ = [
    "AdapterSpec",
    "LoraScheduler",
    "KOHYA_PREFIXES",
    "DIFFUSERS_WEIGHT_NAME",
    "match_targets",
    "peft_config",
    "add_adapter",
    "tuner_layers",
    "activate_adapters",
    "set_adapter_scale",
    "adapter_state_dict",
    "kohya_alphas",
    "kohya_module_names",
    "merge_adapters",
    "to_kohya",
    "from_kohya",
    "save_lora",
    "load_lora",
]

# What kohya's scripts, ComfyUI and A1111 call the parts of a Stable Diffusion model.
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2", "transformer": "lora_unet"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# method -> (PEFT config class, fixed arguments)
_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {}),
    "dora": ("LoraConfig", {"use_dora": True}),
    "rslora": ("LoraConfig", {"use_rslora": True}),
    "loha": ("LoHaConfig", {}),
    "lokr": ("LoKrConfig", {}),
}


class AdapterSpec(BaseModel):
    """One adapter of ``lora_sched.adapters`` (a recipe mapping).

    Args:
        method: ``lora``, ``dora``, ``rslora``, ``loha``, ``lokr`` or any other PEFT type
            name that ``inject_adapter_in_model`` accepts (``oft``, ``boft``, ``ia3``...).
        rank, alpha: rank and alpha (alpha defaults to the rank, a scale of 1).
        dropout: LoRA dropout (``rank_dropout`` for LoHa / LoKr).
        targets: patterns of module names; a mapping ``{model: [patterns]}`` when the
            adapter spans several models with different targets.
        rank_pattern, alpha_pattern: ``{pattern: value}``; the first matching pattern wins.
        scale: a number, ``{"schedule": name, ...}`` (see :mod:`hookengine.core.schedule`) or
            ``module:attr`` of a callable of the step: PEFT's ``set_scale`` factor.
        start_phase: add the adapter when this phase starts (default: at setup).
        models: the models this adapter goes into (default: the plugin's ``model``).
        trainable: train the adapter (False: a fixed adapter, e.g. a loaded style).
        options: further arguments of the PEFT config (``init_lora_weights``...).
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "lora"
    rank: int = Field(default=8, ge=1)
    alpha: float | None = None
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] | dict[str, list[str]]
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    scale: Any = 1.0
    start_phase: str | None = None
    models: list[str] | None = None
    trainable: bool = True
    options: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------------ targets
def _adaptable(module: Any) -> bool:
    from torch import nn

    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection layers


def _close_names(pattern: str, names: Sequence[str]) -> list[str]:
    """Module names (and their last parts) that look like ``pattern``."""
    bare = pattern.removeprefix("re:").strip("*.^$")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    found = difflib.get_close_matches(bare, leaves, n=3, cutoff=0.5)
    found += difflib.get_close_matches(bare, list(names), n=3, cutoff=0.5)
    return list(dict.fromkeys(found))[:5]


def match_targets(model: Any, patterns: Sequence[str], where: str = "targets") -> list[str]:
    """Names of the adaptable modules (Linear, Conv, Embedding) that ``patterns`` select.

    Every pattern must select at least one; otherwise a ``ValueError`` names the pattern,
    the closest module names, and whether it matched only layers PEFT cannot adapt.
    """
    model = _groups.unwrap(model)
    tuned = {n for n, _ in tuner_layers(model)}
    # Layers that already hold an adapter take another one; their insides are PEFT's.
    modules = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(t + ".") for t in tuned)]
    adaptable = [n for n, m in modules if n in tuned or _adaptable(m)]
    selected: list[str] = []
    for pattern in patterns:
        match = _groups.compile_patterns(pattern)
        hits = [n for n in adaptable if match(n)]
        if not hits:
            others = [n for n, _ in modules if match(n)]
            if others:
                kinds = sorted({type(m).__name__ for n, m in modules if n in others})
                raise ValueError(
                    f"{where}: pattern {pattern!r} matches only modules PEFT cannot adapt ({', '.join(kinds)}), "
                    f"e.g. {others[0]!r}; target Linear, Conv or Embedding layers"
                )
            close = _close_names(pattern, [n for n, _ in modules])
            hint = f"; close module names: {close}" if close else f"; modules look like {adaptable[:3]}"
            raise ValueError(f"{where}: pattern {pattern!r} matches no module of {type(model).__name__}{hint}")
        selected.extend(h for h in hits if h not in selected)
    return selected


def _first_match(patterns: Mapping[str, Any], name: str) -> Any:
    for pattern, value in patterns.items():
        if _groups.matches(pattern, name):
            return value
    return None


def _per_module(patterns: Mapping[str, Any], names: Sequence[str], default: Any) -> dict[str, Any]:
    """``{escaped module name: value}`` for modules whose pattern value differs from the default.

    PEFT matches its pattern keys as regular expressions on the module name's tail, so
    exact names are escaped.
    """
    import re

    out = {}
    for name in names:
        value = _first_match(patterns, name)
        if value is not None and value != default:
            out[re.escape(name)] = value
    return out


# ------------------------------------------------------------------------- config
def _config_class(method: str) -> tuple[type, dict[str, Any]]:
    import peft

    if method.lower() in _METHODS:
        cls_name, fixed = _METHODS[method.lower()]
        return getattr(peft, cls_name), dict(fixed)
    mapping = peft.PEFT_TYPE_TO_CONFIG_MAPPING
    key = method.upper()
    if key not in mapping:
        names = sorted([*_METHODS, *(str(k.value if hasattr(k, "value") else k).lower() for k in mapping)])
        raise ValueError(f"unknown PEFT method {method!r}{closest(method.lower(), names)}; known: {names}")
    return mapping[key], {}


def peft_config(spec: AdapterSpec, targets: Sequence[str]) -> Any:
    """The PEFT config of ``spec`` for the (exact) module names ``targets``."""
    import dataclasses

    cls, arguments = _config_class(spec.method)
    fields = {f.name for f in dataclasses.fields(cls)}
    alpha = float(spec.rank if spec.alpha is None else spec.alpha)
    arguments["target_modules"] = list(targets)
    candidates = {
        "r": spec.rank,
        "lora_alpha": alpha,
        "alpha": alpha,
        "lora_dropout": spec.dropout,
        "rank_pattern": _per_module(spec.rank_pattern, targets, spec.rank),
        "alpha_pattern": _per_module(spec.alpha_pattern, targets, alpha),
    }
    if "lora_dropout" not in fields:
        candidates["rank_dropout"] = spec.dropout
    for key, value in candidates.items():
        if key in fields and (value or key in ("r", "lora_alpha", "alpha")):
            arguments[key] = value
    unknown = sorted(set(spec.options) - fields)
    if unknown:
        raise ValueError(f"options {unknown} are not arguments of {cls.__name__}{closest(unknown[0], fields)}")
    arguments.update(spec.options)
    return cls(**arguments)


# ------------------------------------------------------------------- adapters
def tuner_layers(model: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every PEFT tuner layer inside ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in _groups.unwrap(model).named_modules() if isinstance(m, BaseTunerLayer)]


def add_adapter(model: Any, name: str, config: Any) -> None:
    """Inject adapter ``name`` into ``model`` in place (base weights stay frozen)."""
    from peft import inject_adapter_in_model

    model = _groups.unwrap(model)
    if name in getattr(model, "peft_config", {}):
        raise ValueError(f"the model already has an adapter named {name!r}")
    with warnings.catch_warnings():
        # "Already found a peft_config attribute": several adapters are the point here.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, model, adapter_name=name)


def activate_adapters(model: Any, names: Sequence[str], frozen: Iterable[str] = ()) -> None:
    """Make ``names`` the active adapters of every layer (their deltas add up).

    PEFT's ``set_adapter`` marks active adapters trainable; adapters in ``frozen`` are set
    back to ``requires_grad=False``. Call only at structural changes (setup, phase start).
    """
    frozen = set(frozen)
    for _, layer in tuner_layers(model):
        layer.set_adapter(list(names))
        for attribute in layer.adapter_layer_names:
            for key, part in getattr(layer, attribute).items():
                if key in frozen:
                    part.requires_grad_(False)


def set_adapter_scale(model: Any, adapter: str, scale: float) -> None:
    """PEFT's ``set_scale``: the adapter's scaling becomes ``scale × alpha / r`` in every layer."""
    for _, layer in tuner_layers(model):
        if hasattr(layer, "set_scale"):
            layer.set_scale(adapter, scale)
        elif scale != 1.0:
            raise ValueError(f"{type(layer).__name__} has no scale (PEFT's set_scale); use a constant scale of 1")


def adapter_state_dict(model: Any, adapter: str) -> dict[str, Any]:
    """The adapter's weights with PEFT's key names (``<module>.lora_A.weight``, no adapter name)."""
    from peft import get_peft_model_state_dict

    model = _groups.unwrap(model)
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def kohya_alphas(model: Any, adapter: str) -> dict[str, float]:
    """``{module: alpha}`` such that kohya's ``alpha / rank`` equals PEFT's base scaling
    (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)."""
    out = {}
    for name, layer in tuner_layers(model):
        if adapter not in getattr(layer, "lora_A", {}):
            continue
        r = layer.r[adapter]
        alpha = layer.lora_alpha[adapter]
        out[name] = alpha * math.sqrt(r) if layer.use_rslora.get(adapter, False) else float(alpha)
    return out


def merge_adapters(model: Any, adapters: Sequence[str] | None = None) -> None:
    """Merge adapters into the base weights (at their current scale) and remove the PEFT layers.

    Equal to PEFT's ``merge_and_unload`` of the active adapters.
    """
    model = _groups.unwrap(model)
    for name, layer in tuner_layers(model):
        names = [a for a in (adapters or layer.active_adapters) if a in layer._all_available_adapter_names()]
        if names:
            layer.merge(adapter_names=names)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


# --------------------------------------------------------------------- kohya
def _kohya_name(module: str, prefix: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_module_names(model: Any) -> dict[str, str]:
    """``{module name: name in kohya files}``.

    transformers 5 dropped the ``text_model`` level of CLIP text encoders, but kohya,
    ComfyUI and A1111 name their layers ``lora_te_text_model_encoder_...``: it is put back.
    """
    model = _groups.unwrap(model)
    names = [n for n, _ in model.named_modules() if n]
    if type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model"):
        return {n: n if n.startswith("text_projection") else f"text_model.{n}" for n in names}
    return {n: n for n in names}


def to_kohya(state_dict: Mapping[str, Any], prefix: str, alphas: Mapping[str, float] | float) -> dict[str, Any]:
    """PEFT LoRA keys -> kohya keys: ``{prefix}_{module with _}.lora_down.weight / lora_up.weight / alpha``.

    ``state_dict`` is :func:`adapter_state_dict` (``<module>.lora_A.weight``...);
    ``alphas`` is one alpha or ``{module: alpha}``. Only plain LoRA weights can be written.
    """
    import torch

    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        module, part = _split_peft_key(key)
        if part not in ("lora_A.weight", "lora_B.weight"):
            raise ValueError(f"kohya files hold plain LoRA weights only; {key!r} is not one (DoRA, LoHa...)")
        base = _kohya_name(module, prefix)
        out[f"{base}.{'lora_down' if part == 'lora_A.weight' else 'lora_up'}.weight"] = tensor
        alpha = alphas if isinstance(alphas, (int, float)) else alphas[module]
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def _split_peft_key(key: str) -> tuple[str, str]:
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_"):
        if marker in key:
            index = key.index(marker)
            return key[:index], key[index + 1 :]
    module, _, part = key.rpartition(".")
    return module, part


def from_kohya(
    state_dict: Mapping[str, Any], prefix: str, module_names: Iterable[str]
) -> tuple[dict[str, Any], dict[str, float], dict[str, int]]:
    """kohya keys with ``prefix`` -> (PEFT state dict, ``{module: alpha}``, ``{module: rank}``).

    kohya writes module names with ``_`` for ``.``; ``module_names`` (the model's) undo that.
    Keys of other prefixes are ignored; an unknown module is an error naming the key.
    """
    lookup = {_kohya_name(n, prefix): n for n in module_names}
    peft_sd: dict[str, Any] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for key, tensor in state_dict.items():
        base, _, part = key.partition(".")
        if not base.startswith(prefix + "_"):
            continue
        module = lookup.get(base)
        if module is None:
            raise ValueError(f"kohya key {key!r} names no module of the model{closest(base, lookup)}")
        if part == "lora_down.weight":
            peft_sd[f"{module}.lora_A.weight"] = tensor
            ranks[module] = int(tensor.shape[0])
        elif part == "lora_up.weight":
            peft_sd[f"{module}.lora_B.weight"] = tensor
        elif part == "alpha":
            alphas[module] = float(tensor.item())
        else:
            raise ValueError(f"kohya key {key!r}: only lora_down / lora_up / alpha are supported")
    for module, rank in ranks.items():
        alphas.setdefault(module, float(rank))  # kohya: no alpha means alpha = rank
    return peft_sd, alphas, ranks


def _rename_module(key: str, names: Mapping[str, str]) -> str:
    module, part = _split_peft_key(key)
    return f"{names[module]}.{part}"


def _lora_config_from(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> Any:
    """A LoraConfig for exact modules with per-module ranks and alphas."""
    import re
    from collections import Counter

    from peft import LoraConfig

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[m] for m in ranks).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(m): alphas[m] for m in ranks if alphas[m] != alpha},
    )


# ------------------------------------------------------------------ save / load
def _json_safe(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    out = {}
    for key, value in data.items():
        if isinstance(value, set):
            value = sorted(value)
        if hasattr(value, "value") and isinstance(value, str):  # enums like PeftType
            value = value.value
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def _save_safetensors(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    tmp.replace(path)  # a killed process never leaves a half-written file


def save_lora(
    models: Mapping[str, Any],
    adapter: str,
    folder: str | Path,
    formats: Sequence[str] = ("peft", "diffusers", "kohya"),
    kohya_prefixes: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write adapter ``adapter`` of ``models`` (``{component: model}``) into ``folder``.

    - ``peft``: ``folder/peft/<component>/`` with ``adapter_config.json`` and
      ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it);
    - ``diffusers``: ``folder/pytorch_lora_weights.safetensors`` with keys
      ``<component>.<module>.lora_A.weight`` and the adapter configs as metadata
      (``pipe.load_lora_weights(folder)``);
    - ``kohya``: ``folder/<adapter>_kohya.safetensors`` with ``lora_unet_`` / ``lora_te_``
      keys (``kohya_prefixes`` names other components).

    Returns ``{format: path}``.
    """
    folder = Path(folder)
    prefixes = {**KOHYA_PREFIXES, **(kohya_prefixes or {})}
    parts = {c: m for c, m in models.items() if adapter in getattr(_groups.unwrap(m), "peft_config", {})}
    if not parts:
        raise ValueError(f"no model has an adapter named {adapter!r}")
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "peft":
            written[fmt] = _save_peft(parts, adapter, folder / "peft")
        elif fmt == "diffusers":
            written[fmt] = _save_diffusers(parts, adapter, folder / DIFFUSERS_WEIGHT_NAME)
        elif fmt == "kohya":
            written[fmt] = _save_kohya(parts, adapter, folder / f"{adapter}_kohya.safetensors", prefixes)
        else:
            raise ValueError(f"unknown LoRA file format {fmt!r}{closest(fmt, ['peft', 'diffusers', 'kohya'])}")
    return written


def _save_peft(parts: Mapping[str, Any], adapter: str, folder: Path) -> Path:
    for component, model in parts.items():
        target = folder / component
        target.mkdir(parents=True, exist_ok=True)
        config = _groups.unwrap(model).peft_config[adapter]
        weights = {_PEFT_PREFIX + k: v for k, v in adapter_state_dict(model, adapter).items()}
        _save_safetensors(weights, target / PEFT_WEIGHT_NAME)
        (target / PEFT_CONFIG_NAME).write_text(json.dumps(_json_safe(config), indent=2, sort_keys=True))
    return folder


def _save_diffusers(parts: Mapping[str, Any], adapter: str, path: Path) -> Path:
    tensors, metadata = {}, {}
    for component, model in parts.items():
        tensors.update({f"{component}.{k}": v for k, v in adapter_state_dict(model, adapter).items()})
        config = _json_safe(_groups.unwrap(model).peft_config[adapter])
        # Without it diffusers assumes alpha = r and a reloaded adapter is silently wrong (NOTES.md).
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    _save_safetensors(tensors, path, {_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def _save_kohya(parts: Mapping[str, Any], adapter: str, path: Path, prefixes: Mapping[str, str]) -> Path:
    tensors: dict[str, Any] = {}
    dims, alphas_seen = set(), set()
    for component, model in parts.items():
        prefix = prefixes.get(component, f"lora_{component}")
        names = kohya_module_names(model)
        alphas = {names[m]: a for m, a in kohya_alphas(model, adapter).items()}
        sd = {}
        for key, tensor in adapter_state_dict(model, adapter).items():
            module, part = _split_peft_key(key)
            sd[f"{names[module]}.{part}"] = tensor
        tensors.update(to_kohya(sd, prefix, alphas))
        dims.update(int(v.shape[0]) for k, v in sd.items() if k.endswith("lora_A.weight"))
        alphas_seen.update(alphas.values())
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(dims)) if dims else "0",
        "ss_network_alpha": str(max(alphas_seen)) if alphas_seen else "0",
    }
    _save_safetensors(tensors, path, metadata)
    return path


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / PEFT_CONFIG_NAME).is_file():
            return "peft"
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return "diffusers"
        raise ValueError(f"{path}: no {PEFT_CONFIG_NAME} or {DIFFUSERS_WEIGHT_NAME} in this folder")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.split(".", 1)[0].startswith("lora_") and k.endswith((".lora_down.weight", ".alpha")) for k in keys):
        return "kohya"
    return "diffusers"


def load_lora(
    model: Any,
    path: str | Path,
    adapter: str = "default",
    component: str | None = None,
    fmt: Literal["peft", "diffusers", "kohya"] | None = None,
    kohya_prefix: str | None = None,
) -> Any:
    """Add adapter ``adapter`` to ``model`` from a PEFT folder, a diffusers file or a kohya file.

    ``component`` picks the model's part of a multi-model file (``unet``,
    ``text_encoder``); the format is detected when ``fmt`` is None. Returns the PEFT config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file or folder {path} does not exist")
    fmt = fmt or _detect_format(path)
    if fmt == "peft":
        config, weights = _read_peft(path)
    elif fmt == "diffusers":
        config, weights = _read_diffusers(path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path, component)
    elif fmt == "kohya":
        prefix = kohya_prefix or KOHYA_PREFIXES.get(component or "unet", f"lora_{component}")
        real = {alias: name for name, alias in kohya_module_names(model).items()}
        weights, alphas, ranks = from_kohya(load_file(str(path)), prefix, real)
        weights = {_rename_module(k, real): v for k, v in weights.items()}
        alphas, ranks = {real[m]: a for m, a in alphas.items()}, {real[m]: r for m, r in ranks.items()}
        if not weights:
            raise ValueError(f"{path}: no kohya keys with prefix {prefix!r}")
        config = _lora_config_from(ranks, alphas)
    else:
        raise ValueError(f"unknown LoRA file format {fmt!r}")
    _load_into(model, adapter, config, weights, path)
    return config


def _read_peft(folder: Path) -> tuple[Any, dict[str, Any]]:
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    weights = load_file(str(folder / PEFT_WEIGHT_NAME))
    return config, {k.removeprefix(_PEFT_PREFIX): v for k, v in weights.items()}


def _read_diffusers(path: Path, component: str | None) -> tuple[Any, dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
    components = sorted({k.split(".", 1)[0] for k in tensors})
    component = component or (components[0] if len(components) == 1 else None)
    if component not in components:
        raise ValueError(f"{path} holds components {components}; pass component= one of them")
    head = component + "."
    weights = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    meta = {k[len(head):]: v for k, v in metadata.items() if k.startswith(head)}
    if meta:
        return _config_from_dict(meta), weights
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in weights.items() if k.endswith("lora_A.weight")}
    return _lora_config_from(ranks, {m: float(r) for m, r in ranks.items()}), weights


def _config_from_dict(data: Mapping[str, Any]) -> Any:
    from peft import PeftConfig

    return PeftConfig.from_peft_type(**{"peft_type": "LORA", **data})


def _load_into(model: Any, adapter: str, config: Any, weights: Mapping[str, Any], where: Path) -> None:
    from peft import set_peft_model_state_dict

    add_adapter(model, adapter, config)
    result = set_peft_model_state_dict(_groups.unwrap(model), dict(weights), adapter_name=adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} weights fit no adapter layer, e.g. {unexpected[0]!r}")


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
        self.plugin_name = engine.hooks.current_plugin or self.name
        # After the routines build the models (priority 0), before layer/model schedulers
        # look at which parameters train.
        engine.on("setup", self._on_setup, priority=-50)
        engine.on("phase_start", self._on_phase_start, priority=80)
        engine.on("batch_start", self._write_scales, priority=100)
        engine.on("run_end", self._save, priority=10)  # before the final checkpoint
        engine.on("run_end", self._merge, priority=-10)  # after it
        engine.attach("load_checkpoint", self._before_load, priority=50)

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
        phases = [p.name for p in getattr(self.engine.plugins.get("trainer"), "phases", [])]
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
        # DDP must see the new trainable parameters on every rank (NOTES.md).
        if self.engine.hooks.has("rewrap_models"):
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
        if not self.formats or not state.is_main_process:
            return
        root = Path(self.save_dir) if self.save_dir else Path(state.run_dir or "runs/default") / "lora"
        for name in self.added:
            save_lora(self._component_models(name), name, root / name, self.formats, self.kohya_prefixes)

    def _merge(self, state: Any) -> None:
        if not self.merge_at_end:
            return
        self._write_scales(state)
        for model_name in list(self._adapters_of):
            merge_adapters(state.models[model_name], self.added)
            state.models[model_name] = self.engine.runtime.unwrap(state.models[model_name])
        self._adapters_of.clear()
        self._layers.clear()
