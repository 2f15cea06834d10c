"""hookengine: one small engine where everything is a hook.

``import hookengine`` is light: torch, accelerate and the model libraries are imported
where they are used.

The package is layered, and imports go one way (core <- plugins <- app):

- ``hookengine.core``: the engine, the hook registry and its declared points, plugins,
  state and the run's plan, the runtime and the schedule algebra;
- ``hookengine.training``, ``models``, ``data``, ``sched``, ``routines``, ``scale``: the
  prepared plugins, each an ordinary entry point;
- ``hookengine.recipe`` and ``hookengine.cli``: the app.
"""

from __future__ import annotations

from .core import schedule
from .core.engine import Engine
from .core.hooks import Handle, HookError
from .core.plugins import PluginError
from .core.state import Clock, Control, State

__version__ = "0.1.0"
__all__ = ["Engine", "Handle", "HookError", "PluginError", "State", "Clock", "Control", "schedule", "__version__"]
