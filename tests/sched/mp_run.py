"""Run under ``torchrun --nproc_per_node 2``: schedules and freezing on several processes.

Writes ``rank{N}.json`` into the folder given as the first argument: the lr of every
group at every optimizer step and a checksum of the model's parameters after every step.
With ``--no-rewrap`` the slot ``rewrap_models`` does nothing (the negative control).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

PLUGINS = [
    ("optim_sched", {"optimizer": "AdamW", "weight_decay": 0.01}),
    ("layer_sched", {"unfreeze_every": 3, "layer_decay": 0.8}),
    ("lr_sched", {"schedule": "cosine", "warmup": 0.25}),
]
TRAINER = {"max_steps": 12, "lr": 0.05}


def checksum(model) -> str:
    from hookengine.sched.groups import unwrap

    digest = hashlib.sha256()
    for tensor in unwrap(model).state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def run(run_dir: str, rewrap: bool = True) -> dict:
    from tests.sched.helpers import make_engine, record_lrs

    engine = make_engine(run_dir, trainer=TRAINER, plugins=PLUGINS)
    if not rewrap:
        engine.attach("rewrap_models", lambda next_impl: None, priority=1000)
    lrs = record_lrs(engine)
    sums: list[str] = []
    where: dict[str, int] = {}
    # Read while the process group is up (the run ends it).
    engine.on("setup", lambda state: where.update(rank=engine.runtime.process_index, processes=engine.runtime.num_processes))
    engine.on("step_end", lambda state: sums.append(checksum(state.models["model"])), priority=-1000)
    engine.run()
    return {"lrs": lrs, "checksums": sums, **where}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(str(out / "run"), rewrap="--no-rewrap" not in sys.argv)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
