"""A tiny model only the loader tests use, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# tiny_sd and tiny_lm come from tests/conftest.py.


@pytest.fixture(scope="session")
def tiny_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved TinyNet (a class that only ``module:Class`` can find)."""
    from hookengine.testing import save_tiny_net

    return save_tiny_net(tmp_path_factory.mktemp("models") / "tiny-net")
