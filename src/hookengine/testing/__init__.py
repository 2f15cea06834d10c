"""Helpers for tests, demos and benchmarks: tiny models built from configs, offline.

It imports torch; diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

from . import tiny_models
from .tiny_models import *  # noqa: F403 - the public helpers, listed once in tiny_models.__all__

__all__ = list(tiny_models.__all__)
