"""LoRA files: PEFT folders, diffusers files and kohya files, written and read back.

- **PEFT**: ``<folder>/peft/<component>/`` with ``adapter_config.json`` and
  ``adapter_model.safetensors`` (``PeftModel.from_pretrained``).
- **diffusers**: one ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``),
  with the adapter configs as metadata so that ``alpha != r`` stays right.
- **kohya**: ``lora_unet_... .lora_down / lora_up / alpha`` keys, read by ComfyUI, A1111
  and diffusers.

:func:`save_lora` writes any of them, :func:`load_lora` reads all three back; the key
conversions (:func:`to_kohya`, :func:`from_kohya`) are public for other tools.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from ..core.plugins import closest
from . import groups as _groups
from .lora_ops import add_adapter, adapter_state_dict, tuner_layers

__all__ = [
    "KOHYA_PREFIXES",
    "DIFFUSERS_WEIGHT_NAME",
    "kohya_alphas",
    "kohya_module_names",
    "to_kohya",
    "from_kohya",
    "save_lora",
    "load_lora",
    "task_type_of",
    "base_model_path",
    "copy_tokenizer",
]

# What kohya's scripts, ComfyUI and A1111 call the parts of a Stable Diffusion model.
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2", "transformer": "lora_unet"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


# --------------------------------------------------------------------- kohya
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
    weights: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write adapter ``adapter`` of ``models`` (``{component: model}``) into ``folder``.

    - ``peft``: ``folder/peft/<component>/`` with ``adapter_config.json`` and
      ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it);
    - ``diffusers``: ``folder/pytorch_lora_weights.safetensors`` with keys
      ``<component>.<module>.lora_A.weight`` and the adapter configs as metadata
      (``pipe.load_lora_weights(folder)``);
    - ``kohya``: ``folder/<adapter>_kohya.safetensors`` with ``lora_unet_`` / ``lora_te_``
      keys (``kohya_prefixes`` names other components).

    ``weights`` (``{component: adapter_state_dict(model, adapter)}``) gives the tensors to
    write when the models do not hold them whole (sharded models: gathered by the caller).

    Returns ``{format: path}``.
    """
    folder = Path(folder)
    prefixes = {**KOHYA_PREFIXES, **(kohya_prefixes or {})}
    parts = {c: m for c, m in models.items() if adapter in getattr(_groups.unwrap(m), "peft_config", {})}
    if not parts:
        raise ValueError(f"no model has an adapter named {adapter!r}")
    weights = {c: (weights or {}).get(c) or adapter_state_dict(m, adapter) for c, m in parts.items()}
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "peft":
            written[fmt] = _save_peft(parts, weights, adapter, folder / "peft")
        elif fmt == "diffusers":
            written[fmt] = _save_diffusers(parts, weights, adapter, folder / DIFFUSERS_WEIGHT_NAME)
        elif fmt == "kohya":
            written[fmt] = _save_kohya(parts, weights, adapter, folder / f"{adapter}_kohya.safetensors", prefixes)
        else:
            raise ValueError(f"unknown LoRA file format {fmt!r}{closest(fmt, ['peft', 'diffusers', 'kohya'])}")
    return written


# transformers' tables of head classes -> PEFT task types (AutoPeftModel* picks its class from it).
_TASK_TABLES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
)
# What a tokenizer folder may hold; copied next to an adapter so the folder is self-contained.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)


def task_type_of(model: Any) -> str | None:
    """PEFT's ``task_type`` for a transformers model with a head (``CAUSAL_LM``...), from its class."""
    model = _groups.unwrap(model)
    if not type(model).__module__.startswith("transformers"):
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for table, task in _TASK_TABLES:
        for value in getattr(modeling_auto, table, {}).values():
            if name in (value if isinstance(value, (tuple, list)) else (value,)):
                return task
    # A bare encoder (CLIPTextModel...): PEFT's FEATURE_EXTRACTION wrapper passes arguments
    # such models do not take, so it stays a plain PeftModel.
    return None


def base_model_path(model: Any) -> str | None:
    """The base model's folder or hub id: the model loader's spec, else ``name_or_path``."""
    from ..core.model_state import model_source

    return model_source(_groups.unwrap(model))


def copy_tokenizer(source: str | Path | None, target: Path) -> bool:
    """Copy the tokenizer files of folder ``source`` (if it has a tokenizer) into ``target``."""
    import shutil

    if source is None or not Path(source).is_dir() or not (Path(source) / "tokenizer_config.json").is_file():
        return False
    target.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, target / name)
    return True


def _save_peft(parts: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], adapter: str, folder: Path) -> Path:
    for component, model in parts.items():
        target = folder / component
        target.mkdir(parents=True, exist_ok=True)
        config = _json_safe(_groups.unwrap(model).peft_config[adapter])
        # AutoPeftModel* needs both to rebuild the base (PEFT leaves them None when injecting).
        # The loader's source wins over PEFT's own: PEFT copies ``name_or_path`` as given, so a
        # folder named relative to the run's working directory would not load from anywhere else.
        base = base_model_path(model)
        if base:
            config["base_model_name_or_path"] = base
        if not config.get("task_type"):
            config["task_type"] = task_type_of(model)
        _save_safetensors({_PEFT_PREFIX + k: v for k, v in weights[component].items()}, target / PEFT_WEIGHT_NAME)
        (target / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        if type(_groups.unwrap(model)).__module__.startswith("transformers"):
            copy_tokenizer(base, target)
    return folder


def _save_diffusers(parts: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], adapter: str, path: Path) -> Path:
    tensors, metadata = {}, {}
    for component, model in parts.items():
        tensors.update({f"{component}.{k}": v for k, v in weights[component].items()})
        config = _json_safe(_groups.unwrap(model).peft_config[adapter])
        # Without it diffusers assumes alpha = r and a reloaded adapter is silently wrong (docs/TRAPS.md).
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    _save_safetensors(tensors, path, {_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def _save_kohya(
    parts: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], adapter: str, path: Path,
    prefixes: Mapping[str, str],
) -> Path:
    tensors: dict[str, Any] = {}
    dims, alphas_seen = set(), set()
    for component, model in parts.items():
        prefix = prefixes.get(component, f"lora_{component}")
        names = kohya_module_names(model)
        alphas = {names[m]: a for m, a in kohya_alphas(model, adapter).items()}
        sd = {}
        for key, tensor in weights[component].items():
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

