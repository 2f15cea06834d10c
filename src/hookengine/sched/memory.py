"""The ``memory`` plugin: gradient checkpointing and ``torch.compile`` from a recipe.

Big models run out of memory on activations before weights: gradient checkpointing keeps
only the inputs of chosen blocks and recomputes the rest in backward (about a third more
compute, far less activation memory). ``torch.compile`` buys back speed. Both apply at
``setup``, after the routines built the models and adapters were injected, and change no
value: losses and gradients equal the plain path's (tests/sched/test_memory.py).

In a recipe::

    plugins:
      memory:
        use: memory
        gradient_checkpointing: {unet: true, text_encoder: ["encoder.layers.*"]}
        compile: blocks                       # each repeated block, in place
        compile_options: {mode: max-autotune-no-cudagraphs, dynamic: false}

Keeping weights off the GPU between uses (block swap) is the ``block_swap`` plugin
(:mod:`hookengine.sched.block_swap`); 8-bit and fused optimizers are ``train_sched`` options.
"""

from __future__ import annotations

from typing import Any, Literal

from ..core.plugins import closest
from .checkpointing import checkpoint_modules, enable_library_checkpointing
from .compile import compile_blocks, compile_model

__all__ = ["MemoryPlugin"]

# After every built-in setup listener that builds models (default band) or injects adapters
# (late band), before the last band's freezing and callbacks.
_AFTER_ADAPTERS = -90


class MemoryPlugin:
    """Gradient checkpointing and ``torch.compile`` of the run's models, set from a recipe.

    Args:
        gradient_checkpointing: ``true``: every trainable model through its library's own
            switch (diffusers ``enable_gradient_checkpointing()``, transformers
            ``activation_checkpointing_enable()`` or, before it, ``gradient_checkpointing_enable()``;
            non-reentrant); a list of ``MODEL.PATH``
            patterns (the syntax of ``engine.hook_module``: ``*`` one name, ``**`` any number):
            those modules' forward runs under ``torch.utils.checkpoint.checkpoint(...,
            use_reentrant=False)``; or per model, ``{model: true | [PATH patterns]}``. Only
            while training with gradients on; evaluation runs the plain forward. Module hooks
            inside a checkpointed module run again during the recomputation.
        compile: ``model`` compiles each chosen model in place (``module.compile()``);
            ``blocks`` compiles each of its repeated blocks in place (the classes in
            ``_repeated_blocks``, diffusers, or ``_no_split_modules``, transformers; or the
            modules matching ``compile_blocks``), as diffusers' ``compile_repeated_blocks``.
            Module hooks (see ``compile_guard_hooks``) and adapters added after compilation
            trigger a recompilation.
        compile_models: the models to compile (default: every trainable model).
        compile_blocks: ``MODEL.PATH`` patterns of the blocks to compile with ``compile:
            blocks`` (instead of the model's repeated-block classes).
        compile_options: ``torch.compile`` arguments: ``mode`` (``default``,
            ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``),
            ``dynamic``, ``backend`` (``inductor``; ``eager``/``aot_eager`` to debug),
            ``fullgraph``, ``options``.
        compile_guard_hooks: make compiled code guard on module hooks
            (``torch._dynamo.config.skip_nnmodule_hook_guards = False``, process-wide), so
            a hook added or removed after compilation (``engine.hook_module``) recompiles
            instead of being silently ignored (torch's default skips those guards for a
            little speed). Adapters injected later recompile either way.
    """

    name = "memory"

    def __init__(
        self,
        gradient_checkpointing: bool | list[str] | dict[str, bool | list[str]] = False,
        compile: Literal["model", "blocks"] | None = None,
        compile_models: list[str] | None = None,
        compile_blocks: list[str] | None = None,
        compile_options: dict[str, Any] | None = None,
        compile_guard_hooks: bool = True,
    ) -> None:
        self.gradient_checkpointing = gradient_checkpointing
        self.compile = compile
        self.compile_models = compile_models
        self.compile_blocks = compile_blocks
        self.compile_options = dict(compile_options or {})
        self.compile_guard_hooks = compile_guard_hooks
        if compile_blocks and compile != "blocks":
            raise ValueError("memory.compile_blocks: only used with compile: blocks")
        #: what was done, per model: {"checkpointing": [...], "compiled": [...]}
        self.applied: dict[str, dict[str, Any]] = {}

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._apply, priority=_AFTER_ADAPTERS)

    # ---------------------------------------------------------------- apply
    def _apply(self, state: Any) -> None:
        for model_name, spec in self._checkpointing_specs(state).items():
            model = self._model(state, model_name, "gradient_checkpointing")
            if spec is True:
                switch = enable_library_checkpointing(model)
                if switch is None:
                    raise ValueError(
                        f"memory.gradient_checkpointing: model {model_name!r} ({type(model).__name__}) has no "
                        f"gradient checkpointing switch of its own; name its blocks: {{{model_name}: [\"blocks.*\"]}}"
                    )
                done: Any = switch
            else:
                done = checkpoint_modules(model, list(spec), f"memory.gradient_checkpointing.{model_name}")
            self.applied.setdefault(model_name, {})["checkpointing"] = done
        if self.compile is not None:
            self._compile(state)

    def _checkpointing_specs(self, state: Any) -> dict[str, bool | list[str]]:
        spec = self.gradient_checkpointing
        if spec is False or spec is None:
            return {}
        if spec is True:
            return {name: True for name in _trainable_models(state)}
        if isinstance(spec, dict):
            return {name: value for name, value in spec.items() if value}
        per_model: dict[str, list[str]] = {}
        for pattern in spec:
            model, _, path = pattern.partition(".")
            if not path:
                raise ValueError(f"memory.gradient_checkpointing: {pattern!r} is not MODEL.PATH (use true for a whole model)")
            per_model.setdefault(model, []).append(path)
        return per_model  # type: ignore[return-value]

    def _compile(self, state: Any) -> None:
        if self.compile_guard_hooks:
            import torch._dynamo

            torch._dynamo.config.skip_nnmodule_hook_guards = False
        names = self.compile_models if self.compile_models is not None else _trainable_models(state)
        patterns: dict[str, list[str]] = {}
        for pattern in self.compile_blocks or []:
            model, _, path = pattern.partition(".")
            patterns.setdefault(model, []).append(path)
        for model_name in patterns:
            if model_name not in names:
                names = [*names, model_name]
        for model_name in names:
            model = self._model(state, model_name, "compile_models")
            if self.compile == "model":
                compile_model(model, self.compile_options)
                done: Any = "model"
            else:
                done = compile_blocks(model, self.compile_options, patterns.get(model_name),
                                      f"memory.compile (model {model_name!r})")
            self.applied.setdefault(model_name, {})["compiled"] = done

    @staticmethod
    def _model(state: Any, name: str, key: str) -> Any:
        import torch

        if name not in state.models:
            raise ValueError(f"memory.{key}: unknown model {name!r}{closest(name, state.models)}; models: {sorted(state.models)}")
        model = state.unwrap(state.models[name])
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"memory.{key}: model {name!r} is a {type(model).__name__}, not a torch module")
        return model


def _trainable_models(state: Any) -> list[str]:
    return [
        name for name, model in state.models.items()
        if hasattr(model, "parameters") and callable(model.parameters)
        and any(p.requires_grad for p in model.parameters())
    ]
