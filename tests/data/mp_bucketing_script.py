"""Run by test_multiprocess.py under torchrun (2 processes, gloo): the real loop with DDP.

Usage: torchrun --standalone --nproc_per_node 2 mp_bucketing_script.py IMAGE_DIR OUT_DIR
Each rank writes OUT_DIR/rank<r>.json: per step, the sample indices and the target size.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    image_dir, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    # one datasets cache per rank: two processes never write the same cache files
    os.environ["HF_DATASETS_CACHE"] = os.path.join(out_dir, f"cache{rank}")
    import torch

    from hookengine import Engine

    engine = Engine(seed=0, cpu=True)
    # remainder is the dataset's option now (one policy for the dataset and bucketing)
    engine.use("dataset", path="imagefolder", data_dir=image_dir, batch_size=2, remainder="drop")
    engine.use("bucketing", max_resolution=128, min_size=64, max_size=256, step=32, random_crop=True)
    module = torch.nn.Linear(1, 1)
    engine.state.models["m"] = module
    engine.use("trainer", epochs=2, lr=0.01)
    steps = []

    @engine.attach("compute_loss")
    def loss(next_impl, batch):
        steps.append({
            "epoch": engine.state.clock.epoch,
            "index": batch["index"].tolist(),
            "target": batch["target_size_hw"].tolist(),
        })
        x = batch["image"].mean(dim=(1, 2, 3)).unsqueeze(1)
        return engine.state.models["m"](x).pow(2).mean()

    engine.call("run")  # ends with a barrier, then accelerate's end_training
    runtime = engine.runtime
    result = {
        "rank": runtime.process_index,
        "world": runtime.num_processes,
        "steps": steps,
        "weight": engine.runtime.unwrap(engine.state.models["m"]).weight.item(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
