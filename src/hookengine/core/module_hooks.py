"""Hooks on the models' own submodules, chosen by a name pattern.

A pattern is ``MODEL.PATH``: the first component names a model in ``state.models``, the
rest is a dotted module path in which ``*`` is one name component and ``**`` any number of
them (zero included); each component is matched with :func:`fnmatch.fnmatchcase`, so a
pattern without wildcards is an exact module path::

    handle = engine.hook_module("unet.down_blocks.*.attentions.*", lambda module, args, output: None)
    handle.modules      # ['down_blocks.0.attentions.0']
    handle.detach()

Kinds: ``forward`` (``fn(module, args, output)``, may return a replacement output),
``forward_pre`` (``fn(module, args)``, may return replacement args) and ``backward``
(``fn(module, grad_input, grad_output)``, torch's full backward hook).

Names are those of the *unwrapped* model (DDP's ``.module`` and ``torch.compile``'s
``._orig_mod`` are looked through). For PEFT models, names also match with PEFT's
``base_model.model.`` prefix and ``.base_layer`` components left out, so a path names the
same place before and after a LoRA is injected; after injection the hook is on the LoRA
layer that sits at that path (its output includes the LoRA delta).

Hooks follow the models only when told to: whoever swaps, re-wraps or injects adapters into
a model in ``state.models`` calls ``engine.module_hooks.refresh()`` afterwards (the training
loop does so at the end of ``rewrap_models``). Moving a model with ``.to()`` keeps its module
objects, so hooks survive that without a refresh. A hook whose model is not registered yet
waits and is installed by the next ``refresh()``.

torch is imported inside the functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import weakref
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterator

from .hooks import _describe
from .plugins import closest

__all__ = ["ModuleHandle", "ModuleHooks", "KINDS"]

#: hook kind -> the ``nn.Module`` method that registers it
KINDS = {
    "forward": "register_forward_hook",
    "forward_pre": "register_forward_pre_hook",
    "backward": "register_full_backward_hook",
}
_PEFT_PREFIX = "base_model.model"
_WRAPPER_CHILDREN = ({"module"}, {"_orig_mod"})  # DDP / DataParallel / trivial wrappers, torch.compile


def match(pattern: str, name: str) -> bool:
    """Whether a dotted module ``name`` matches ``pattern`` (``*``: one component, ``**``: any number).

    >>> match("down_blocks.*.attentions.*", "down_blocks.0.attentions.1")
    True
    >>> match("**.attn", "transformer.h.0.attn"), match("*.attn", "transformer.h.0.attn")
    (True, False)
    """
    return _match(_split(pattern), _split(name))


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


def _match(parts: tuple[str, ...], names: tuple[str, ...]) -> bool:
    if not parts:
        return not names
    head, rest = parts[0], parts[1:]
    if head == "**":
        return any(_match(rest, names[i:]) for i in range(len(names) + 1))
    return bool(names) and fnmatchcase(names[0], head) and _match(rest, names[1:])


def unwrap(module: Any) -> Any:
    """Look through wrappers whose only child is the model (DDP's ``module``, compile's ``_orig_mod``)."""
    while set(getattr(module, "_modules", {})) in _WRAPPER_CHILDREN:
        module = next(iter(module._modules.values()))
    return module


def aliases(root: Any) -> dict[str, Any]:
    """Every name a submodule of ``root`` answers to -> the module.

    Real names come first and win; then, for PEFT models, the names without PEFT's
    ``base_model.model.`` prefix; then the names without ``.base_layer`` components, only
    where no module has that name already (after injection the LoRA layer does).
    """
    named = dict(root.named_modules())
    out = dict(named)
    peft = hasattr(root, "peft_config")
    for name, module in named.items():
        if peft and (name == _PEFT_PREFIX or name.startswith(_PEFT_PREFIX + ".")):
            out.setdefault(name[len(_PEFT_PREFIX) + 1:], module)
    for name, module in list(out.items()):
        parts = _split(name)
        if "base_layer" in parts:
            out.setdefault(".".join(p for p in parts if p != "base_layer"), module)
    return out


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


class ModuleHandle:
    """The torch hooks one :meth:`ModuleHooks.add` installed; ``detach()`` removes them all.

    >>> with engine.hook_module("lm.transformer.h.*.attn", record) as handle:  # doctest: +SKIP
    ...     model(ids)
    >>> handle.attached  # doctest: +SKIP
    False
    """

    def __init__(
        self, owner: "ModuleHooks", path: str, fn: Callable[..., Any], kind: str, plugin: str | None,
        model: str | None, root: Any = None, label: str | None = None,
    ) -> None:
        self._owner = owner
        self.path, self.fn, self.kind, self.plugin = path, fn, kind, plugin
        self.model = model  # the name in state.models, or None for a handle on a module object
        self._root = weakref.ref(root) if root is not None else None  # never keeps a cached model alive
        self.pattern = ".".join(p for p in ((model or label or type(root).__name__), path) if p)
        # id(module) -> (matched path, weak reference to the module, torch's removable handle)
        self._installed: dict[int, tuple[str, Any, Any]] = {}
        self._attached = True

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def modules(self) -> list[str]:
        """The paths of the modules hooked now."""
        return [path for path, _, _ in self._installed.values()]

    def target(self) -> Any:
        """The unwrapped model this handle resolves against now (None when there is none)."""
        if self._root is not None:
            obj = self._root()
        else:
            obj = self._owner.state.models.get(self.model)
            obj = self._owner.state.unwrap(obj) if _is_module(obj) else obj  # accelerate's unwrap
        return unwrap(obj) if _is_module(obj) else None  # pipelines, tokenizers: nothing to hook

    def detach(self) -> None:
        """Remove every torch hook this handle installed; detaching twice is harmless."""
        for _, _, removable in self._installed.values():
            removable.remove()
        self._installed.clear()
        if self._attached:
            self._attached = False
            self._owner._handles.remove(self)

    def __enter__(self) -> "ModuleHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = f"on {len(self._installed)} modules" if self._attached else "detached"
        return f"<ModuleHandle {self.kind} {self.pattern!r} {state}, plugin={self.plugin!r}>"

    # ------------------------------------------------------------- internals
    def _matches(self, names: dict[str, Any]) -> dict[int, tuple[str, Any]]:
        """id(module) -> (shortest matching name, module), in module order."""
        found: dict[int, tuple[str, Any]] = {}
        parts = _split(self.path)
        for name, module in names.items():
            if _match(parts, _split(name)):
                known = found.get(id(module))
                if known is None or name.count(".") < known[0].count("."):
                    found[id(module)] = (name, module)
        return found

    def _sync(self, matches: dict[int, tuple[str, Any]]) -> None:
        """Hook exactly the matched modules, once each: keep, add, and drop the ones that left."""
        installed: dict[int, tuple[str, Any, Any]] = {}
        for key, (name, module) in matches.items():
            old = self._installed.pop(key, None)
            if old is not None and old[1]() is module:
                installed[key] = (name, old[1], old[2])
                continue
            if old is not None:  # a dead module whose id was reused
                old[2].remove()
            installed[key] = (name, weakref.ref(module), getattr(module, KINDS[self.kind])(self.fn))
        for _, _, removable in self._installed.values():  # no longer at a matched path
            removable.remove()
        self._installed = installed


class ModuleHooks:
    """Every hook on models' submodules of one engine (``engine.module_hooks``).

    >>> hooks = ModuleHooks(state)  # doctest: +SKIP
    >>> handle = hooks.add("unet.down_blocks.*.attentions.*", print_shapes)  # doctest: +SKIP
    >>> state.models["unet"] = wrap(state.models["unet"]); hooks.refresh()  # doctest: +SKIP
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self._handles: list[ModuleHandle] = []

    @property
    def handles(self) -> list[ModuleHandle]:
        """The attached handles, oldest first."""
        return list(self._handles)

    def add(
        self, pattern: str, fn: Callable[..., Any], *, kind: str = "forward",
        plugin: str | None = None, model: str | None = None,
    ) -> ModuleHandle:
        """Hook the submodules matching ``pattern`` (``MODEL.PATH``, or just ``PATH`` with ``model=``).

        Raises ``ValueError`` when the named model is registered and nothing in it matches;
        when the model is not registered yet, the hook waits for :meth:`refresh`.

        >>> engine.module_hooks.add("h.*.attn", fn, model="lm", kind="forward_pre")  # doctest: +SKIP
        """
        _check_kind(kind)
        if model is None:
            model, _, pattern = pattern.partition(".")
        handle = ModuleHandle(self, pattern, fn, kind, plugin, model)
        if model in self.state.models:
            target = handle.target()
            if target is None:
                obj = self.state.models[model]
                what = type(obj).__name__
                raise ValueError(f"module hook {handle.pattern!r}: model {model!r} is a {what}, not a torch module")
            self._install(handle, aliases(target))
        self._handles.append(handle)
        return handle

    def add_to(
        self, module: Any, pattern: str, fn: Callable[..., Any], *, kind: str = "forward",
        plugin: str | None = None, label: str | None = None,
    ) -> ModuleHandle:
        """Hook the submodules of a module object that is not in ``state.models`` (a cached teacher).

        ``pattern`` is a path inside ``module``; ``label`` names it in ``describe`` (default: its
        class name). The handle holds the module weakly and re-resolves in it on :meth:`refresh`.

        >>> engine.module_hooks.add_to(teacher, "encoder.layers.3", keep, label="teacher")  # doctest: +SKIP
        """
        _check_kind(kind)
        if not _is_module(module):
            raise ValueError(f"module hook {pattern!r}: {type(module).__name__} is not a torch module")
        handle = ModuleHandle(self, pattern, fn, kind, plugin, None, root=module, label=label)
        self._install(handle, aliases(handle.target()))
        self._handles.append(handle)
        return handle

    def refresh(self) -> None:
        """Re-resolve every handle against the models now registered.

        Call after swapping a model, wrapping it (DDP, compile) or injecting adapters: hooks
        on modules that no longer sit at a matched path are removed, new matches are hooked,
        and a module already hooked by a handle is never hooked twice by it.
        """
        names: dict[int, dict[str, Any]] = {}  # id(target) -> aliases, computed once per model
        for handle in self._handles:
            target = handle.target()
            if target is None:
                handle._sync({})
                continue
            if id(target) not in names:
                names[id(target)] = aliases(target)
            handle._sync(handle._matches(names[id(target)]))

    def describe(self) -> list[dict[str, Any]]:
        """One row per handle, shaped like the hook registry's rows."""
        rows: list[dict[str, Any]] = []
        positions: dict[str, int] = {}
        for handle in self._handles:
            point = f"module:{handle.pattern}"
            position = positions[point] = positions.get(point, -1) + 1
            rows.append({
                "point": point,
                "kind": f"module_{handle.kind}",
                "position": position,
                "function": _describe(handle.fn),
                "plugin": handle.plugin,
                "priority": 0,
                "before": [],
                "after": [],
                "filters": {"modules": len(handle._installed)},
            })
        return rows

    def __iter__(self) -> Iterator[ModuleHandle]:
        return iter(list(self._handles))

    def __len__(self) -> int:
        return len(self._handles)

    def _install(self, handle: ModuleHandle, names: dict[str, Any]) -> None:
        matches = handle._matches(names)
        if not matches:
            real = [n for n in names if n]
            near = difflib.get_close_matches(handle.path, real, n=5, cutoff=0.0)
            raise ValueError(
                f"module hook {handle.pattern!r} matches no module of {type(handle.target()).__name__}"
                f"{closest(handle.path, real)}; close names: {near}"
            )
        handle._sync(matches)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"module hook kind {kind!r} is not one of {sorted(KINDS)}{closest(kind, KINDS)}")
