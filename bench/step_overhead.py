"""Training-step overhead: hookengine (20 listeners attached) vs a hand-written torch loop.

Same model, data, optimizer and seed; two workloads: ``--workload mlp`` (MLP 64-32-10, a
few µs of compute per step: the loop's own cost dominates) and ``--workload convnet``
(two convolutions on 1x16x16 images, a few ms per step: the ordinary case). Runs interleaved, one thread,
medians of paired runs, ``gc.freeze()`` after warm-up (back-to-back raw runs differ by 5-17 % on shared machines). Ignite and
Lightning are measured on the same work when installed (``pip install -e .[bench]``).

Run: python bench/step_overhead.py [--workload mlp|convnet --steps 1000 --repeats 7]   (JSON line last)
Targets: hookengine steps/s ÷ raw steps/s >= 0.97 on the MLP, >= 0.99 on the convnet.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time
import warnings

import torch

torch.set_num_threads(1)
BATCH = 32


WORKLOAD = "mlp"  # set by --workload before anything is built
_INPUT = {"mlp": (64,), "convnet": (1, 16, 16)}
TARGETS = {"mlp": 0.97, "convnet": 0.99}


def make_data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, *_INPUT[WORKLOAD], generator=g)
    y = torch.randint(0, 10, (steps * BATCH,), generator=g)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, steps * BATCH, BATCH)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    if WORKLOAD == "convnet":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
        )
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def raw(data) -> float:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.functional.cross_entropy
    t0 = time.perf_counter()
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(data) / (time.perf_counter() - t0)


def hookengine(data) -> float:
    from hookengine import Engine

    engine = Engine(seed=None)
    model = make_model()
    loss_fn = torch.nn.functional.cross_entropy

    def setup(state):
        state.models["model"] = model
        state.optimizers["main"] = torch.optim.SGD(model.parameters(), lr=0.01)
        state.dataloaders["train"] = data

    engine.on("setup", setup)
    engine.attach("compute_loss", lambda nxt, batch: loss_fn(model(batch[0]), batch[1]))
    engine.use_defaults(
        {
            "trainer": {"max_steps": len(data), "eval_at_phase_end": False},
            "checkpoint": {"save_at_end": False},
            "logging": {"every": 100, "plot": False},
            "progress": {"enabled": False},
        }
    )
    # 20 listeners of the kinds users attach: counters, filtered loggers, watchers.
    counter = [0]
    for i in range(10):
        engine.on("step_end", lambda state, **kw: counter.__setitem__(0, counter[0] + 1))
    for i in range(5):
        engine.on("step_end", lambda state: None, every=50)
    for i in range(5):
        engine.on("batch_start", lambda state, batch: None)
    times = {}
    engine.on("phase_start", lambda state: times.__setitem__("t0", time.perf_counter()))
    engine.on("phase_end", lambda state: times.__setitem__("t1", time.perf_counter()), priority=100)
    engine.run()
    return len(data) / (times["t1"] - times["t0"])


def ignite(data) -> float | None:
    try:
        from ignite.engine import Engine as IgniteEngine, Events
    except ImportError:
        return None
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.functional.cross_entropy

    def step(engine, batch):
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    trainer = IgniteEngine(step)
    times = {}
    trainer.add_event_handler(Events.STARTED, lambda e: times.__setitem__("t0", time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda e: times.__setitem__("t1", time.perf_counter()))
    trainer.run(data, max_epochs=1)
    return len(data) / (times["t1"] - times["t0"])


class _Batches:
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def lightning(data) -> float | None:
    try:
        import lightning as L
    except ImportError:
        return None
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    times = {}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_start(self):
            times["t0"] = time.perf_counter()

        def on_train_end(self):
            times["t1"] = time.perf_counter()

    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(Module(), train_dataloaders=_Batches(data))  # a bare list means "several loaders"
    return len(data) / (times["t1"] - times["t0"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workload", choices=sorted(_INPUT), default="mlp")
    args = parser.parse_args()
    global WORKLOAD
    WORKLOAD = args.workload
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = make_data(args.steps)
    runners = {"hookengine": hookengine, "ignite": ignite, "lightning": lightning}
    for fn in (raw, *runners.values()):  # warm-up: imports, allocator, first-call costs
        fn(data[:50])
    gc.collect()
    gc.freeze()
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    rates: dict[str, list[float]] = {name: [] for name in ("raw", *runners)}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            base = raw(data)  # paired: a raw run right next to each framework run
            rate = fn(data)
            if rate is None:
                continue
            rates["raw"].append(base)
            rates[name].append(rate)
            ratios[name].append(rate / base)
    figures = {
        "workload": args.workload,
        "steps": args.steps,
        "raw_steps_per_s": round(statistics.median(rates["raw"]), 1),
        "ratio": round(statistics.median(ratios["hookengine"]), 4),
        "overhead_us_per_step": round(
            (1 / statistics.median(rates["hookengine"]) - 1 / statistics.median(rates["raw"])) * 1e6, 1
        ),
        "peers": {name: round(statistics.median(r), 4) for name, r in ratios.items() if r and name != "hookengine"},
        "target": TARGETS[args.workload],
    }
    for name, r in ratios.items():
        if r:
            print(f"{name:11s} steps/s ÷ raw: median {statistics.median(r):.4f}  (runs: {', '.join(f'{v:.3f}' for v in r)})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
