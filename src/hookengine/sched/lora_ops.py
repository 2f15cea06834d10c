"""PEFT operations on models in place: adapters added by module-name pattern, scaled,
activated, merged. No plugin and no files here (see :mod:`hookengine.sched.lora` and
:mod:`hookengine.sched.lora_files`).

Adapters are injected with PEFT's ``inject_adapter_in_model`` (the way diffusers'
``add_adapter`` does it), so the model objects stay the same. Any PEFT method that
``inject_adapter_in_model`` accepts can be used: ``lora``, ``dora``, ``rslora``, ``loha``,
``lokr``, ``oft``, ``boft``, ``ia3``...

Targets are globs or ``re:`` regular expressions on module names; a pattern matches a
module or any module above it (``"down_blocks.0"`` adapts every layer inside it). A
pattern that matches no adaptable module is an error naming the pattern and the closest
module names.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ..core.plugins import closest
from . import groups as _groups

__all__ = [
    "AdapterSpec",
    "match_targets",
    "peft_config",
    "add_adapter",
    "tuner_layers",
    "activate_adapters",
    "set_adapter_scale",
    "adapter_state_dict",
    "merge_adapters",
]

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
