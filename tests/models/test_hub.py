"""Hub ids: from a pre-filled cache offline, and downloaded from a local hub server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hookengine.models.loader import ModelLoadError, load_model

from .hub_server import LocalHub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _prefill_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay a folder out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_repo_id_from_prefilled_cache_offline(tiny_sd: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _prefill_cache(cache, "tiny/sd", tiny_sd)
    pipe = load_model("tiny/sd", cache_dir=str(cache))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    unet = load_model("tiny/sd", subfolder="unet", revision=COMMIT, cache_dir=str(cache))
    assert torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)
    with pytest.raises(ModelLoadError, match="tiny/other.*not in the local cache"):
        load_model("tiny/other", cache_dir=str(cache))


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch):
    """Switch huggingface_hub online for one test (the suite runs with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as constants

    def use(endpoint: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    return use


def test_download_from_local_hub_server_then_offline(tiny_sd: Path, tiny_lm: Path, tmp_path: Path, online, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    pickled = tmp_path / "lm-with-pickle"
    shutil.copytree(tiny_lm, pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "extra.bin")
    cache = tmp_path / "hub"
    with LocalHub({"tiny/sd": tiny_sd, "tiny/lm": pickled}) as hub:
        online(hub.endpoint)
        pipe = load_model("tiny/sd", cache_dir=str(cache))
        lm = load_model("tiny/lm", cache_dir=str(cache))
        resolved = [path for method, path in hub.requests if "/resolve/" in path]
        assert any(path.endswith("unet/diffusion_pytorch_model.safetensors") for path in resolved)
        assert not any(path.endswith(".bin") for path in resolved), "pickle files are not downloaded"
        with pytest.raises(ModelLoadError, match="tiny/missing"):
            load_model("tiny/missing", cache_dir=str(cache))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(lm).__name__ == "GPT2LMHeadModel"
    # The server is gone: offline, the same repo ids load from the cache.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = load_model("tiny/sd", subfolder="unet", cache_dir=str(cache))
    assert torch.equal(again.conv_in.weight, pipe.unet.conv_in.weight)
