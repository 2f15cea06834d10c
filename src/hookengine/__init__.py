"""hookengine: one small engine where everything is a hook.

``import hookengine`` is light: torch, accelerate and the model libraries are imported
where they are used.
"""

from __future__ import annotations

from .engine import Engine
from .hooks import Handle, HookError
from .plugins import PluginError
from .state import Clock, Control, State

__version__ = "0.1.0"
__all__ = ["Engine", "Handle", "HookError", "PluginError", "State", "Clock", "Control", "__version__"]
