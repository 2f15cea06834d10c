"""Two processes through phase changes: freezing, an optimizer swap, adapters added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .test_ddp import assert_ok, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_ranks_stay_in_sync_after_every_phase_change(tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {
        "name": "phases",
        "seed": 2,
        "run_dir": str(tmp_path / "run"),
        "plugins": {
            "digits": {"use": "digits", "batch_size": 16},
            "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet",
                           "model_options": {"dropout": 0.0}},
            "layers": {"use": "layer_sched", "phases": {"frozen": ["0", "2"]}},  # the two convolutions
            "optim": {"use": "optim_sched", "optimizer": "AdamW",
                      "phases": {"frozen": {"optimizer": "SGD", "lr": 0.05}}},
            "lora": {"use": "lora_sched", "model": "model",
                     "adapters": {"late": {"rank": 4, "alpha": 8, "targets": ["6", "9"], "start_phase": "adapted"}}},
            "dump": {"use": "tests.multiproc.plugins:PhaseDump", "folder": str(out)},
        },
        "phases": [{"name": "warm", "steps": 5}, {"name": "frozen", "steps": 5}, {"name": "adapted", "steps": 5}],
        "trainer": {"lr": 0.003, "eval_at_phase_end": False},
        "checkpoint": {"save_at_end": False},
        "progress": {"enabled": False},
    }
    path = tmp_path / "phases.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_ok(torchrun(path))

    weights = {(p, r): load_file(str(out / f"{p}-rank{r}.safetensors"))
               for p in ("warm", "frozen", "adapted") for r in (0, 1)}
    info = {(p, r): json.loads((out / f"{p}-rank{r}.json").read_text()) for p in ("warm", "frozen", "adapted") for r in (0, 1)}
    for phase in ("warm", "frozen", "adapted"):
        a, b = weights[(phase, 0)], weights[(phase, 1)]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"ranks differ after phase {phase}"
        assert info[(phase, 0)] == info[(phase, 1)]
    # the swap and the freeze happened, and trained what they should
    assert info[("warm", 0)]["optimizer"] == "AdamW" and info[("frozen", 0)]["optimizer"] == "SGD"
    warm, frozen = weights[("warm", 0)], weights[("frozen", 0)]
    assert torch.equal(warm["0.weight"], frozen["0.weight"]) and torch.equal(warm["2.weight"], frozen["2.weight"])
    assert not torch.equal(warm["6.weight"], frozen["6.weight"])
    adapted = weights[("adapted", 0)]
    lora_keys = [k for k in adapted if "lora_B" in k]
    assert lora_keys and any(adapted[k].abs().sum() > 0 for k in lora_keys)  # B starts at zero, so it trained
