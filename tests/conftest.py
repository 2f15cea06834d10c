"""Test settings: nothing reaches the network, nothing writes outside a test folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports transformers, datasets, keras or torch's inductor.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_scratch = Path(tempfile.mkdtemp(prefix="hookengine-tests-"))
os.environ.setdefault("KERAS_HOME", str(_scratch / "keras"))
os.environ.setdefault("HF_HOME", str(_scratch / "hf"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run folder for one test."""
    path = tmp_path / "run"
    path.mkdir()
    return path
