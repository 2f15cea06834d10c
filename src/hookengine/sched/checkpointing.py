"""Gradient (activation) checkpointing: recompute activations in backward instead of keeping them.

A diffusers model (``enable_gradient_checkpointing()``) or a transformers model
(``activation_checkpointing_enable()``, formerly ``gradient_checkpointing_enable()``) is switched with the library's own switch, which knows
where its blocks are. Any other model, or a chosen part of one, is checkpointed by module
name patterns (the syntax of ``engine.hook_module``): the matched modules' ``forward`` runs
inside ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while training with
gradients enabled, and as it is otherwise (evaluation, ``torch.no_grad``).

Checkpointing changes memory and time, never values: the recomputation replays the RNG
state (dropout draws the same masks), so losses and gradients equal the plain path's.
"""

from __future__ import annotations

import functools
from typing import Any

from ..core.module_hooks import aliases, match, unwrap

__all__ = ["enable_library_checkpointing", "checkpoint_modules", "matched_modules"]

_MARK = "_hookengine_checkpointed"


def _library_model(model: Any) -> Any:
    """The diffusers/transformers model inside a PEFT wrapper (or the model itself)."""
    model = unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def enable_library_checkpointing(model: Any) -> str | None:
    """Switch on the model's own gradient checkpointing; the switch's name, or None when it has none."""
    target = _library_model(model)
    # transformers: non-reentrant, so frozen inputs (LoRA on a frozen base) still get gradients.
    # Newer releases renamed the switch (the old name warns that it goes away in v6).
    if callable(getattr(target, "activation_checkpointing_enable", None)) and target.supports_gradient_checkpointing:
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return "activation_checkpointing_enable"
    if callable(getattr(target, "gradient_checkpointing_enable", None)) and getattr(
        target, "supports_gradient_checkpointing", True
    ):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "gradient_checkpointing_enable"
    if callable(getattr(target, "enable_gradient_checkpointing", None)) and getattr(
        target, "_supports_gradient_checkpointing", True
    ):
        target.enable_gradient_checkpointing()
        return "enable_gradient_checkpointing"
    return None


def matched_modules(model: Any, patterns: list[str], where: str) -> list[tuple[str, Any]]:
    """``(name, module)`` of the submodules of ``model`` whose name matches any pattern, in module order.

    Names and patterns as in ``engine.hook_module`` (``*`` one name, ``**`` any number; PEFT
    prefixes optional). A module matched twice is listed once, under its shortest name; a
    pattern that matches nothing is an error naming ``where``.
    """
    names = aliases(unwrap(model))
    found: dict[int, tuple[str, Any]] = {}
    for pattern in patterns:
        hits = [(n, m) for n, m in names.items() if n and match(pattern, n)]
        if not hits:
            from ..core.plugins import closest

            raise ValueError(f"{where}: pattern {pattern!r} matches no module{closest(pattern, [n for n in names if n])}")
        for name, module in hits:
            known = found.get(id(module))
            if known is None or name.count(".") < known[0].count("."):
                found[id(module)] = (name, module)
    order = {id(m): i for i, m in enumerate(unwrap(model).modules())}
    return sorted(found.values(), key=lambda item: order.get(id(item[1]), 0))


def checkpoint_modules(model: Any, patterns: list[str], where: str = "gradient_checkpointing") -> list[str]:
    """Run the forward of every module matching ``patterns`` under non-reentrant checkpointing.

    Returns the names of the modules checkpointed now (a module already done is skipped;
    one inside another matched module is left alone, its ancestor recomputes it anyway).
    """
    chosen = matched_modules(model, patterns, where)
    real = {id(m): n for n, m in unwrap(model).named_modules()}
    prefixes = {real[id(m)] + "." for _, m in chosen if real.get(id(m))}
    done: list[str] = []
    for name, module in chosen:
        own = real.get(id(module), "")
        if getattr(module, _MARK, False) or any(own.startswith(p) for p in prefixes):
            continue
        module.forward = functools.partial(_checkpointed, module, module.forward)
        setattr(module, _MARK, True)
        done.append(name)
    return done


def _checkpointed(module: Any, forward: Any, *args: Any, **kwargs: Any) -> Any:
    import torch
    from torch.utils.checkpoint import checkpoint

    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)

