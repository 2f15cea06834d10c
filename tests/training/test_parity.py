"""Parity: a user's own loop, written from the plugin guide, replaces the built-in trainer.

Every prepared plugin (lr_sched, lora_sched, model_sched, layer_sched,
checkpoint, logging, progress) works with it through State and the declared points
alone, and the run equals the built-in loop's: losses, learning rates, weights, the
LoRA file and the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hookengine import Engine
from tests.sched.helpers import data, record_lrs

PHASES = [{"name": "base", "steps": 4}, {"name": "head", "steps": 3, "train": ["model.head"]}, {"name": "lora", "steps": 3}]


class MyLoop:
    """The minimal loop of docs/PLUGINS.md: phases, epochs, batches, one optimizer step each."""

    name = "my_loop"

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        engine.attach("run", self.run)

    def run(self, next_impl: Any) -> Any:
        engine, state = self.engine, self.engine.state
        plan, clock = state.plan, state.clock
        try:
            engine.fire("setup")
            engine.call("prepare")  # train_sched: optimizer, models on the device
            engine.fire("resume")
            while True:
                phase = state.phase
                clock.phase = phase.name
                engine.fire("phase_start", phase=phase)
                while not (plan.phase_done(clock) or plan.run_done(clock)):
                    engine.fire("epoch_start")
                    loader = state.dataloaders[phase.data]
                    for batch in engine.call("epoch_batches", loader, clock.epoch, clock.batch_in_epoch):
                        engine.fire("batch_start", batch=batch)
                        loss = engine.call("compute_loss", batch)
                        loss.backward()
                        engine.fire("before_optimizer_step")
                        for optimizer in state.optimizers.values():
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        clock.step, clock.phase_step, clock.micro_step = clock.step + 1, clock.phase_step + 1, clock.micro_step + 1
                        clock.batch_in_epoch += 1
                        state.metrics["loss"] = loss.detach()
                        engine.fire("step_end", loss=loss.detach())
                        if plan.phase_done(clock) or plan.run_done(clock):
                            break
                    else:  # the epoch ran out
                        clock.epoch, clock.phase_epoch, clock.batch_in_epoch = clock.epoch + 1, clock.phase_epoch + 1, 0
                        engine.fire("epoch_end")
                engine.fire("phase_end", phase=phase)
                if plan.run_done(clock) or not plan.advance(clock):
                    break
            engine.fire("run_end")
        finally:
            engine.fire("teardown")
        return state


def _engine(run_dir: Path, loop: Any) -> tuple[Engine, list[list[float]]]:
    engine = Engine(seed=0, run_dir=run_dir, cpu=True, defaults=False)
    engine.use(data, samples=64)
    engine.use("supervised", model="tests.sched.helpers:stack")
    engine.use("train_sched", phases=PHASES, lr=0.02)
    engine.use("lr_sched", schedule="cosine", warmup=3)
    engine.use("lora_sched", name="lora", model="model", save=["peft"],
               adapters={"style": {"rank": 2, "alpha": 4, "targets": ["blocks.*.0"], "start_phase": "lora"}})
    engine.use("model_sched")  # the phases' train lists
    engine.use("layer_sched", freeze=["embed"])
    if loop == "trainer":
        engine.use("trainer", eval_at_phase_end=False)
    else:
        engine.use(loop)
    engine.use("checkpoint", every=4, keep_last=1)
    engine.use("logging", every=1)
    engine.use("progress", refresh_every=2)
    return engine, record_lrs(engine)


def test_a_users_loop_drives_every_prepared_plugin_like_the_trainer(tmp_path: Path, capsys: Any) -> None:
    runs = {}
    for loop in ("trainer", MyLoop):
        run_dir = tmp_path / ("builtin" if loop == "trainer" else "mine")
        engine, lrs = _engine(run_dir, loop)
        capsys.readouterr()
        state = engine.run()
        assert "10/10" in capsys.readouterr().err  # progress: the bar knew the run's length
        runs[run_dir.name] = (engine, state, lrs, run_dir)
    (builtin, b_state, b_lrs, b_dir), (mine, m_state, m_lrs, m_dir) = runs["builtin"], runs["mine"]

    assert m_state.clock.step == b_state.clock.step == 10
    assert m_lrs == b_lrs and len(m_lrs) == 10 and m_lrs[3] != m_lrs[-1]  # lr_sched wrote the same schedule

    def losses(run_dir: Path) -> list[float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(m_dir) == losses(b_dir) and len(losses(b_dir)) == 10  # logging
    assert (m_dir / "loss.png").is_file()
    b_model, m_model = (e.state.unwrap(e.state.models["model"]) for e in (builtin, mine))
    for (name, b), (_, m) in zip(b_model.state_dict().items(), m_model.state_dict().items()):
        assert torch.equal(b, m), name
    assert any("lora_A.style" in k for k in m_model.state_dict())  # lora_sched added it in the last phase
    assert b_state.metrics.get("frozen_units") == m_state.metrics.get("frozen_units")
    for sub in ("lora/style/peft/model/adapter_model.safetensors",):
        b_file, m_file = (load_file(str(d / sub)) for d in (b_dir, m_dir))
        assert b_file.keys() == m_file.keys() and all(torch.equal(b_file[k], m_file[k]) for k in b_file)
    b_ckpt, m_ckpt = (sorted(p.name for p in (d / "checkpoints").iterdir()) for d in (b_dir, m_dir))
    assert m_ckpt == b_ckpt and m_ckpt  # checkpoint: same steps kept
