"""Elastic restarts: a run restarted by torchelastic resumes itself.

``torchrun --max-restarts N`` restarts every worker of the group when one fails, with
``TORCHELASTIC_RESTART_COUNT`` set to the number of restarts so far. A restarted worker
that was not told where to resume from (``checkpoint.resume`` unset) continues from the
newest valid checkpoint of its run folder instead of starting over (:func:`resume_mode`).
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["restart_count", "resume_mode"]


def restart_count() -> int:
    """How many times torchelastic restarted this worker group (0: first attempt, or no torchelastic)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def resume_mode(configured: str | None, say: Callable[[str], None] | None = None) -> str | None:
    """The resume mode to use: ``configured`` when set; after a torchelastic restart ``"latest"``
    (said in one line through ``say``); otherwise ``None`` (start fresh)."""
    if configured:
        return configured
    restarts = restart_count()
    if not restarts:
        return None
    if say is not None:
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
        of = f" of {limit}" if limit else ""
        say(f"restarted by torchelastic (restart {restarts}{of}): resuming from the newest valid checkpoint")
    return "latest"
