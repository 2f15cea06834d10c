"""Parameter groups: naming, pattern matching, layer detection, and lr write-back.

Shared by ``optim_sched`` and ``layer_sched``. Nothing here keeps state; every function
takes modules (torch, diffusers, transformers, or Keras 3 on the torch backend) and returns
plain lists and dicts.

**The lr formula.** A param group's lr is never multiplied into; it is rebuilt from keys
the plugins own, so they never compound and a resume lands on the same value::

    lr = scheduled_lr × lr_scale × lr_mult
    scheduled_lr = base_lr × lr_schedule(t)   (lr_sched; base_lr when it is not used)
    lr_scale: layer-wise decay (layer_sched; timm's convention), lr_mult: group multiplier

Each plugin writes its own key and calls :func:`refresh_lr`.

**Patterns** select parameters by name: a glob (``"down_blocks.*"``, ``"*.bias"``) or a
regular expression with the prefix ``re:``. A pattern matches a parameter when it matches
its full name or the name of any module above it, so ``"encoder.layers.0"`` selects the
whole layer. Keras parameters are named by their Keras path (``"sequential/dense/kernel"``);
for them ``/`` separates the levels.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "Unit",
    "unwrap",
    "is_keras",
    "named_parameters",
    "norm_parameter_names",
    "matches",
    "compile_patterns",
    "layer_units",
    "layer_depths",
    "layer_decay_scales",
    "unet_block_index",
    "block_weight_preset",
    "block_weights",
    "GroupSpec",
    "build_param_groups",
    "split_param_groups",
    "base_lr_of",
    "refresh_lr",
    "hint",
]


def hint(name: str, candidates: Iterable[str]) -> str:
    """:func:`~hookengine.core.plugins.closest`'s hint, where a match that differs only in case wins."""
    from ..core.plugins import closest

    candidates = [str(c) for c in candidates]
    folded = [c for c in candidates if c.lower() == str(name).lower()]
    return closest(folded[0] if folded else name, candidates)

_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel")


# ------------------------------------------------------------------------- naming
def unwrap(model: Any) -> Any:
    """The module inside DDP / FSDP / DataParallel wrappers."""
    while type(model).__name__ in _WRAPPERS and hasattr(model, "module"):
        model = model.module
    return model


def is_keras(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 layer or model (checked by its module, no import)."""
    return any(c.__module__.startswith("keras") for c in type(model).__mro__)


def _keras_variables(model: Any) -> list[Any]:
    # Keras lists a dropout seed tensor among the weights (docs/TRAPS.md): only float tensors train.
    out = []
    for variable in model.weights:
        value = variable.value
        if "seed_generator" in variable.path or not getattr(value, "is_floating_point", lambda: False)():
            continue
        out.append(variable)
    return out


def named_parameters(model: Any) -> list[tuple[str, Any]]:
    """``(name, parameter)`` in registration order, tied parameters once.

    Keras models are named by Keras paths, in the order of their weights.
    """
    model = unwrap(model)
    if is_keras(model):
        return [(v.path, v.value) for v in _keras_variables(model)]
    return list(model.named_parameters())


def norm_parameter_names(model: Any) -> set[str]:
    """Names of parameters that belong to normalisation layers (LayerNorm, GroupNorm, RMSNorm...)."""
    model = unwrap(model)
    names: set[str] = set()
    if is_keras(model):
        for layer in _keras_layers(model):
            if "normalization" in type(layer).__name__.lower():
                names.update(v.path for v in layer.weights)
        return names
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _keras_layers(model: Any) -> list[Any]:
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        layers.extend(_keras_layers(layer))
    return layers


# ----------------------------------------------------------------------- patterns
def _levels(name: str) -> list[str]:
    """The name and the names of every module above it: ``a.b.c`` -> ``a.b.c, a.b, a``."""
    parts = re.split(r"([./])", name)
    out = []
    for end in range(len(parts), 0, -2):
        out.append("".join(parts[:end]))
    return out


def compile_patterns(patterns: str | Sequence[str] | None) -> Callable[[str], bool]:
    """A predicate ``name -> bool`` for globs, ``re:`` regular expressions and plain names
    (a plain name also matches as a dotted suffix, as PEFT's ``target_modules`` do)."""
    if patterns is None:
        return lambda name: False
    if isinstance(patterns, str):
        patterns = [patterns]
    regexes = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regexes.append(re.compile(pattern[3:]))
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        elif not any(c in pattern for c in "*?["):
            # A plain name matches as in PEFT's target_modules: the name itself or a suffix
            # after a dot ("to_q" selects "down_blocks.0.attentions.0.to_q").
            regexes.append(re.compile(rf"(?:.*\.)?{re.escape(pattern)}"))
        else:
            regexes.append(re.compile(fnmatch.translate(pattern)))

    def predicate(name: str) -> bool:
        levels = _levels(name)
        return any(r.fullmatch(level) for r in regexes for level in levels)

    return predicate


def matches(patterns: str | Sequence[str], name: str) -> bool:
    """Whether ``name`` (or a module above it) matches any of ``patterns``."""
    return compile_patterns(patterns)(name)


# ------------------------------------------------------------------------- layers
@dataclass
class Unit:
    """One layer unit (embeddings, a block, the head), from the input side to the output."""

    name: str
    params: list[str] = field(default_factory=list)
    kind: str = "block"  # "stem", "block", "pooler", "head"


def layer_units(model: Any) -> list[Unit]:
    """The model cut into units in input-to-output order.

    - diffusers UNets (``down_blocks``/``mid_block``/``up_blocks``): stem, each down block,
      the mid block, each up block, head;
    - models with a stack of blocks (the largest ``ModuleList``: BERT's ``encoder.layer``,
      GPT-2's ``h``, Llama's ``layers``, CLIP's ``encoder.layers``): what comes before it
      (embeddings), each block, a pooler if any, and what comes after (head);
    - Keras models: their layers; anything else: its children that hold parameters.
    """
    model = unwrap(model)
    params = [n for n, _ in named_parameters(model)]
    if is_keras(model):
        return _keras_units(model, params)
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        return _unet_units(model, params)
    stack = _largest_module_list(model)
    if stack is not None:
        return _stack_units(stack[0], len(stack[1]), params)
    return _children_units(model)


def _keras_units(model: Any, params: list[str]) -> list[Unit]:
    units = []
    for layer in model.layers:
        names = [v.path for v in _keras_variables(layer)]
        if names:
            units.append(Unit(layer.name, names))
    rest = set(params) - {n for u in units for n in u.params}
    if rest:
        units.append(Unit("rest", [n for n in params if n in rest], "head"))
    return units


def _unet_units(model: Any, params: list[str]) -> list[Unit]:
    blocks = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if getattr(model, "mid_block", None) is not None:
        blocks.append("mid_block")
    blocks += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    units = {b: Unit(b) for b in blocks}
    stem, head = Unit("stem", kind="stem"), Unit("head", kind="head")
    head_prefixes = ("conv_norm_out", "conv_act", "conv_out")
    for name in params:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is not None:
            units[block].params.append(name)
        elif name.startswith(head_prefixes):
            head.params.append(name)
        else:
            stem.params.append(name)
    ordered = [stem, *units.values(), head]
    return [u for u in ordered if u.params]


def _largest_module_list(model: Any) -> tuple[str, Any] | None:
    from torch import nn

    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            count = sum(p.numel() for p in module.parameters())
            if best is None or count > best[0]:
                best = (count, name, module)
    return None if best is None or best[0] == 0 else (best[1], best[2])


def _stack_units(prefix: str, length: int, params: list[str]) -> list[Unit]:
    stem, pooler, head = Unit("embeddings", kind="stem"), Unit("pooler", kind="pooler"), Unit("head", kind="head")
    blocks = [Unit(f"{prefix}.{i}") for i in range(length)]
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    seen_block = False
    for name in params:
        match = pattern.match(name)
        if match:
            blocks[int(match.group(1))].params.append(name)
            seen_block = True
        elif not seen_block:
            stem.params.append(name)
        elif "pooler" in name.split("."):
            pooler.params.append(name)
        else:
            head.params.append(name)
    return [u for u in [stem, *blocks, pooler, head] if u.params]


def _children_units(model: Any) -> list[Unit]:
    prefix = ""
    module = model
    # Descend through single wrappers (a model holding only ``self.net``).
    while True:
        children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        direct = list(module.named_parameters(recurse=False))
        if len(children) == 1 and not direct:
            name, module = children[0]
            prefix = f"{prefix}{name}."
            continue
        break
    units: list[Unit] = []
    for name, param in module.named_parameters(recurse=False):
        units.append(Unit(prefix + name, [prefix + name]))
    for name, child in module.named_children():
        names = [f"{prefix}{name}.{n}" for n, _ in child.named_parameters()]
        if names:
            units.append(Unit(prefix + name, names))
    if units:
        units[0].kind = "stem" if len(units) > 2 else units[0].kind
        units[-1].kind = "head" if len(units) > 1 else units[-1].kind
    return units


def layer_depths(units: Sequence[Unit], formula: str = "beit") -> tuple[dict[str, int], int]:
    """Depth of every parameter and the largest depth.

    ``beit``: embeddings 0, block i -> i + 1, everything after the blocks L + 1.
    ``electra``: the same, but a pooler is L + 1 and the task head L + 2.
    Units without a stem or head (a Keras stack) count blocks from 1; the last is the top.
    """
    if formula not in ("beit", "electra"):
        raise ValueError(f"layer decay formula must be 'beit' or 'electra', got {formula!r}")
    blocks = [u for u in units if u.kind == "block"]
    depths: dict[str, int] = {}
    for i, unit in enumerate(blocks):
        for p in unit.params:
            depths[p] = i + 1
    top = len(blocks)
    for unit in units:
        if unit.kind == "stem":
            depth = 0
        elif unit.kind == "pooler":
            depth = len(blocks) + 1
        elif unit.kind == "head":
            depth = len(blocks) + (2 if formula == "electra" else 1)
        else:
            continue
        top = max(top, depth)
        for p in unit.params:
            depths[p] = depth
    return depths, top


def layer_decay_scales(units: Sequence[Unit], decay: float, formula: str = "beit") -> dict[str, float]:
    """``lr_scale = decay ** (max_depth - depth)`` for every parameter (timm's ``lr_scale``)."""
    depths, top = layer_depths(units, formula)
    return {name: decay ** (top - depth) for name, depth in depths.items()}


# -------------------------------------------------------------- UNet block weights
_UNET_RE = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def unet_block_index(name: str, per_block: int) -> tuple[str, int] | None:
    """kohya's block index of a UNet parameter: ``("down"|"up", index)``, ``("mid", 0)`` or None.

    ``index = per_block * block + position``; samplers take the last position of a block.
    kohya's SD 1.x layout has ``per_block = 3`` (12 indices per side).
    """
    match = _UNET_RE.match(name)
    if match:
        side, block, kind, position = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if kind in ("downsamplers", "upsamplers"):
            position = per_block - 1
        return side, per_block * block + position
    if name.startswith("mid_block."):
        return "mid", 0
    return None


def block_weight_preset(preset: str, length: int) -> list[float]:
    """kohya's presets: ``cosine``, ``sine``, ``linear``, ``reverse_linear``, ``zeros``,
    each optionally ``+offset`` (``"sine+0.5"``): weights for ``length`` blocks, shallow to deep."""
    name, _, offset_text = preset.partition("+")
    offset = float(offset_text) if offset_text else 0.0
    span = max(1, length - 1)
    if name == "cosine":
        return [math.sin(math.pi * (i / span) / 2) + offset for i in reversed(range(length))]
    if name == "sine":
        return [math.sin(math.pi * (i / span) / 2) + offset for i in range(length)]
    if name == "linear":
        return [i / span + offset for i in range(length)]
    if name == "reverse_linear":
        return [i / span + offset for i in reversed(range(length))]
    if name == "zeros":
        return [0.0 + offset] * length
    from ..core.plugins import closest

    presets = ["cosine", "sine", "linear", "reverse_linear", "zeros"]
    raise ValueError(f"unknown block weight preset {preset!r}{closest(name, presets)}; known: {presets}")


def block_weights(
    model: Any,
    down: str | Sequence[float] | None = None,
    mid: float | None = None,
    up: str | Sequence[float] | None = None,
    zero_threshold: float = 0.0,
) -> dict[str, float]:
    """lr multipliers of a UNet's parameters from down / mid / up block weights.

    Lists shorter than the number of blocks are filled with 1 (as kohya's scripts);
    weights at or below ``zero_threshold`` become 0. Parameters outside the blocks keep 1.
    """
    model = unwrap(model)
    if not hasattr(model, "down_blocks"):
        raise ValueError("block weights need a diffusers UNet (a model with down_blocks / mid_block / up_blocks)")
    per_block = len(model.down_blocks[0].resnets) + 1
    length = per_block * len(model.down_blocks)

    def expand(weights: str | Sequence[float] | None) -> list[float] | None:
        if weights is None:
            return None
        values = block_weight_preset(weights, length) if isinstance(weights, str) else [float(w) for w in weights]
        values = (values + [1.0] * length)[:length]
        return [w if w > zero_threshold else 0.0 for w in values]

    sides = {"down": expand(down), "up": expand(up)}
    mid_weight = None if mid is None else (float(mid) if mid > zero_threshold else 0.0)
    out: dict[str, float] = {}
    for name, _ in named_parameters(model):
        where = unet_block_index(name, per_block)
        if where is None:
            continue
        side, index = where
        if side == "mid":
            if mid_weight is not None:
                out[name] = mid_weight
        elif sides[side] is not None:
            out[name] = sides[side][min(index, length - 1)]  # type: ignore[index]
    return out


# ------------------------------------------------------------------ group building
@dataclass
class GroupSpec:
    """Parameters selected by patterns, with their hyper-parameters.

    Args:
        name: the group's name (shown in logs, used by schedules of hyper-parameters).
        params: patterns (globs, ``re:`` regexes); default: everything not yet taken.
        model: only parameters of this model (name in ``state.models``).
        lr: base lr of the group (default: the optimizer's lr).
        lr_mult: multiplier of the lr.
        weight_decay: weight decay (default: the optimizer's).
        wd_mult: multiplier of the weight decay.
        train: False leaves the parameters out of the optimizer.
        options: other optimizer hyper-parameters for this group (``betas``, ``momentum``...).
    """

    name: str = "default"
    params: list[str] | None = None
    model: str | None = None
    lr: float | None = None
    lr_mult: float = 1.0
    weight_decay: float | None = None
    wd_mult: float = 1.0
    train: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any] | "GroupSpec", where: str) -> "GroupSpec":
        if isinstance(value, GroupSpec):
            return value
        known = set(cls.__dataclass_fields__)
        data = dict(value)
        options = dict(data.pop("options", {}) or {})
        # Unknown keys are optimizer hyper-parameters (betas, eps, momentum...).
        for key in [k for k in data if k not in known]:
            options[key] = data.pop(key)
        if isinstance(data.get("params"), str):
            data["params"] = [data["params"]]
        try:
            return cls(**data, options=options)
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in f".{name}."


def _is_lora_embedding(name: str) -> bool:
    # PEFT's create_loraplus_optimizer gives both matrices of an embedding LoRA
    # (lora_embedding_A and lora_embedding_B) their own lr, without the ratio.
    return ".lora_embedding_A." in f".{name}." or ".lora_embedding_B." in f".{name}."


def build_param_groups(
    models: Mapping[str, Any],
    specs: Sequence[GroupSpec | Mapping[str, Any]] = (),
    *,
    lr: float,
    weight_decay: float = 0.0,
    no_decay: bool | Sequence[str] = True,
    loraplus_ratio: float | None = None,
    loraplus_lr_embedding: float = 1e-6,
    param_mults: Mapping[str, Mapping[str, float]] | None = None,
    include: Callable[[str, str, Any], bool] | None = None,
    where: str = "optim_sched.groups",
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Optimizer param groups from pattern specs; returns ``(groups, names)``.

    Each parameter goes to the first spec that selects it (specs without ``model`` look in
    every model); the rest goes to a ``default`` group. Each group is then split into
    decaying and non-decaying parameters (``no_decay=True``: biases, 1-d tensors and norm
    layers; or a list of patterns), LoRA B matrices (LoRA+: lr × ``loraplus_ratio``; both
    matrices of an embedding LoRA get ``loraplus_lr_embedding`` instead, as PEFT's
    ``create_loraplus_optimizer``, unless their group spec sets an lr), and
    by ``param_mults`` (``{model: {param: mult}}``, e.g. UNet block weights).

    Group keys: ``params``, ``name``, ``lr``, ``base_lr``, ``lr_mult``, ``weight_decay``,
    plus each spec's options. ``names`` maps ``id(param)`` to ``"model:param"``.
    ``include(model, name, param)`` decides which parameters count (default: requires_grad).
    """
    parsed = [GroupSpec.from_mapping(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    for spec in parsed:
        if spec.model is not None and spec.model not in models:
            from ..core.plugins import closest

            raise ValueError(f"{where}: group {spec.name!r} names model {spec.model!r}{closest(spec.model, models)}; models: {sorted(models)}")
    selectors = [compile_patterns(s.params) if s.params is not None else (lambda n: True) for s in parsed]
    include = include or (lambda model, name, param: bool(param.requires_grad))
    default = GroupSpec()
    buckets: dict[tuple[Any, ...], dict[str, Any]] = {}
    names: dict[int, str] = {}
    used = [False] * len(parsed)
    for model_name, model in models.items():
        if not hasattr(model, "parameters") and not is_keras(model):
            continue
        norms = norm_parameter_names(model) if no_decay is True else set()
        no_decay_match = compile_patterns(no_decay) if isinstance(no_decay, (list, tuple)) else None
        mults = (param_mults or {}).get(model_name, {})
        for name, param in named_parameters(model):
            if id(param) in names or not include(model_name, name, param):
                continue
            index = next(
                (i for i, s in enumerate(parsed) if (s.model in (None, model_name)) and selectors[i](name)),
                None,
            )
            spec = parsed[index] if index is not None else default
            if index is not None:
                used[index] = True
            if not spec.train:
                continue
            names[id(param)] = f"{model_name}:{name}"
            if no_decay is True:
                skip_decay = param.ndim <= 1 or name in norms
            else:
                skip_decay = bool(no_decay_match and no_decay_match(name))
            lora_b = loraplus_ratio is not None and _is_lora_b(name)
            lora_embedding = loraplus_ratio is not None and _is_lora_embedding(name)
            mult = float(mults.get(name, 1.0))
            key = (index, skip_decay, lora_b, lora_embedding, mult)
            group = buckets.get(key)
            if group is None:
                group = buckets[key] = _new_group(spec, skip_decay, lora_b, mult, lr, weight_decay, loraplus_ratio)
                if lora_embedding:
                    base = spec.lr if spec.lr is not None else float(loraplus_lr_embedding)
                    group.update(name=group["name"] + "/lora_embedding", base_lr=base, lr=base * group["lr_mult"])
            group["params"].append(param)
    for i, spec in enumerate(parsed):
        if not used[i] and spec.params is not None:
            raise ValueError(f"{where}: group {spec.name!r} selects no parameter with patterns {spec.params}")
    return list(buckets.values()), names


def _new_group(
    spec: GroupSpec, skip_decay: bool, lora_b: bool, mult: float, lr: float, weight_decay: float, ratio: float | None
) -> dict[str, Any]:
    base = spec.lr if spec.lr is not None else lr
    lr_mult = spec.lr_mult * (ratio if lora_b and ratio is not None else 1.0) * mult
    wd = (spec.weight_decay if spec.weight_decay is not None else weight_decay) * spec.wd_mult
    suffix = ("/no_decay" if skip_decay else "") + ("/lora_B" if lora_b else "") + (f"/x{mult:g}" if mult != 1.0 else "")
    group = {
        "params": [],
        "name": spec.name + suffix,
        "base_lr": base,
        "lr_mult": lr_mult,
        "lr": base * lr_mult,
        "weight_decay": 0.0 if skip_decay else wd,
        **spec.options,
    }
    return group


def split_param_groups(optimizer: Any, key: Callable[[Any], Any], extra: Callable[[Any], Mapping[str, Any]]) -> None:
    """Split every group of a fresh optimizer by ``key(param)``, adding ``extra(param)`` keys.

    Used to add layer-wise scales to an optimizer someone else built. The optimizer must
    not have stepped yet (its state would not follow a changed group layout).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if any(inner.state.values()):
        raise RuntimeError("cannot split the param groups of an optimizer that has already stepped")
    old = list(inner.param_groups)
    inner.param_groups = []
    for group in old:
        hyper = {k: v for k, v in group.items() if k != "params"}
        parts: dict[Any, list[Any]] = {}
        for param in group["params"]:
            parts.setdefault(key(param), []).append(param)
        for params in parts.values():
            new = {**hyper, **extra(params[0]), "params": params}
            new.setdefault("base_lr", group.get("base_lr", group["lr"]))
            inner.add_param_group(new)
            refresh_lr(inner.param_groups[-1])


# --------------------------------------------------------------------- lr write
def base_lr_of(group: dict[str, Any]) -> float:
    """The group's base lr; recorded from its current lr the first time it is asked."""
    if "base_lr" not in group:
        group["base_lr"] = float(group["lr"]) / (group.get("lr_scale", 1.0) * group.get("lr_mult", 1.0) or 1.0)
    return group["base_lr"]


def refresh_lr(group: dict[str, Any]) -> None:
    """``lr = scheduled_lr × lr_scale × lr_mult`` (``scheduled_lr`` defaults to ``base_lr``)."""
    scheduled = group.get("scheduled_lr")
    if scheduled is None:
        scheduled = base_lr_of(group)
    group["lr"] = scheduled * group.get("lr_scale", 1.0) * group.get("lr_mult", 1.0)

