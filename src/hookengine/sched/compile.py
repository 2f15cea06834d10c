"""``torch.compile`` of a whole model or of its repeated blocks (regional compilation).

Both compile *in place* with ``module.compile()``: the module objects, their names and
``state_dict`` keys stay as they are, so checkpoints, exports, module hooks
(``engine.hook_module``) and PEFT adapters keep working. Dynamo guards on the modules'
children, so an adapter injected after compilation recompiles; it guards on their hook
dictionaries only with ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` (torch's
default is True: a hook added after compilation is silently ignored), which the ``memory``
plugin sets when it compiles (tests/sched/test_memory.py checks both).

*Regional* compilation (diffusers' ``compile_repeated_blocks``) compiles each block of the
classes a model lists in ``_repeated_blocks`` (diffusers) or ``_no_split_modules``
(transformers), or of given name patterns: identical blocks share one compiled graph, so
compiling takes a fraction of the whole model's time for most of the speed-up.
"""

from __future__ import annotations

from typing import Any

from ..core.module_hooks import unwrap
from .checkpointing import _library_model, matched_modules

__all__ = ["compile_model", "compile_blocks", "repeated_block_classes"]


def compile_model(model: Any, options: dict[str, Any]) -> None:
    """Compile ``model`` in place (``model.compile(**options)``)."""
    unwrap(model).compile(**options)


def repeated_block_classes(model: Any) -> list[str]:
    """The class names of a model's repeated blocks (``_repeated_blocks``, else ``_no_split_modules``)."""
    target = _library_model(model)
    for attribute in ("_repeated_blocks", "_no_split_modules"):
        names = getattr(target, attribute, None)
        if names:
            return list(names)
    return []


def compile_blocks(model: Any, options: dict[str, Any], patterns: list[str] | None, where: str) -> list[str]:
    """Compile in place each block of ``model`` matching ``patterns`` (or of its repeated classes).

    Returns the names of the compiled blocks; a model with neither is an error naming ``where``.
    """
    root = unwrap(model)
    if patterns:
        blocks = matched_modules(root, patterns, where)
    else:
        classes = set(repeated_block_classes(model))
        if not classes:
            raise ValueError(
                f"{where}: {type(root).__name__} lists no repeated blocks (_repeated_blocks or _no_split_modules); "
                "name them with compile_blocks patterns, or compile the whole model (compile: model)"
            )
        blocks = [(n, m) for n, m in root.named_modules() if type(m).__name__ in classes]
        if not blocks:
            raise ValueError(f"{where}: no module of the classes {sorted(classes)} in {type(root).__name__}")
    for _, block in blocks:
        block.compile(**options)
    return [name for name, _ in blocks]
