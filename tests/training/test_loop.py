"""The loop: equal to a hand-written torch loop, two-way control, accumulation, bad loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hookengine import Engine
from hookengine.demo.digits import DigitsConvNet, load_digits_split
from hookengine.data.shuffle import EpochBatchSampler
from hookengine.training.trainer import NonFiniteLossError


def digits_engine(run_dir: Path, **trainer) -> Engine:
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("digits", batch_size=32)
    engine.use("supervised", model="hookengine.demo.digits:DigitsConvNet", accuracy=True)
    engine.use_defaults({"trainer": {"lr": 0.002, **trainer}, "progress": {"enabled": False}})
    return engine


def plain_torch_loop(steps: int, accumulation: int = 1) -> torch.nn.Module:
    """What a user would write by hand: same seed, data order, model and optimizer."""
    from accelerate.utils import set_seed

    set_seed(0)
    tx, ty, _, _ = load_digits_split()
    model = DigitsConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.0)
    sampler = EpochBatchSampler(len(tx), 32, seed=0, drop_last=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tx, ty), batch_sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    done, micro, epoch = 0, 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            (loss / accumulation if accumulation > 1 else loss).backward()
            micro += 1
            if micro % accumulation == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == steps:
                    break
        epoch += 1
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_engine_equals_hand_written_loop_bitwise(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=60)  # crosses an epoch boundary (44 batches)
    engine.run()
    assert engine.state.clock.step == 60
    assert_same_weights(engine.state.models["model"], plain_torch_loop(60))


def test_gradient_accumulation_equals_hand_written_loop(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=10, gradient_accumulation_steps=3)
    engine.run()
    assert engine.state.clock.micro_step == 30
    assert_same_weights(engine.state.models["model"], plain_torch_loop(10, accumulation=3))


def test_listener_can_stop_skip_and_request_checkpoint_and_evaluation(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=100)
    evaluated_at: list[int] = []

    @engine.on("batch_start")
    def skip_third_batch(state):
        if state.clock.batch_in_epoch == 2:
            state.control.skip_step()

    @engine.on("step_end", once=5)
    def ask(state):
        state.control.checkpoint_now()
        state.control.evaluate_now()

    @engine.on("step_end", once=7)
    def stop(state):
        state.control.stop("enough")

    engine.on("evaluate_end", lambda state: evaluated_at.append(state.clock.step))
    engine.run()
    clock = engine.state.clock
    assert clock.step == 7
    assert clock.batch_in_epoch == 8  # 7 steps + 1 skipped batch
    assert evaluated_at[0] == 5
    assert (run_dir / "checkpoints" / "step-00000005").is_dir()
    assert (run_dir / "checkpoints" / "step-00000007").is_dir()  # the final one


def test_wrapping_compute_loss_changes_training(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=3)
    losses: list[float] = []

    @engine.attach("compute_loss")
    def doubled(next_impl, batch):
        loss = next_impl(batch)
        losses.append(float(loss.detach()))
        return 2 * loss

    recorded: list[float] = []
    engine.on("step_end", lambda state, loss: recorded.append(float(loss)))
    engine.run()
    assert recorded == pytest.approx([2 * x for x in losses])


def test_nan_loss_stops_with_step_named_and_checkpoint_kept(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=20)
    engine.use("checkpoint", name="ckpt_every_2", every=2, folder=str(run_dir / "ckpt"))

    @engine.attach("compute_loss")
    def poisoned(next_impl, batch):
        loss = next_impl(batch)
        return loss * float("nan") if engine.state.clock.step == 5 else loss

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 5"):
        engine.run()
    from hookengine.training.checkpoint import latest_checkpoint, load_tree

    newest = latest_checkpoint(run_dir / "ckpt")
    assert newest is not None and newest.name == "step-00000004"
    assert load_tree(newest)["clock"]["step"] == 4


def test_nan_loss_skip_policy_counts_and_goes_on(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=6, nonfinite="skip")

    @engine.attach("compute_loss")
    def poisoned(next_impl, batch):
        loss = next_impl(batch)
        return loss * float("inf") if engine.state.clock.batch_in_epoch in (1, 3) else loss

    engine.run()
    assert engine.state.clock.step == 6
    assert engine.state.metrics["skipped_nonfinite"] == 2
    weights = torch.cat([p.flatten() for p in engine.state.models["model"].parameters()])
    assert torch.isfinite(weights).all()


def test_run_leaves_metrics_and_loss_plot(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=30, eval_every=10)
    engine.run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert [r["step"] for r in evals] == [10, 20, 30, 30]  # every 10, and at the phase end
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["lr/main"] == 0.002 for r in train)
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_phases_run_in_order_with_events(run_dir: Path) -> None:
    engine = digits_engine(
        run_dir,
        phases=[{"name": "warm", "steps": 3}, {"name": "main", "steps": 4}, {"name": "last", "epochs": 1}],
    )
    events: list[tuple[str, str, int]] = []
    engine.on("phase_start", lambda state, phase: events.append(("start", phase.name, state.clock.step)))
    engine.on("phase_end", lambda state, phase: events.append(("end", phase.name, state.clock.step)))
    engine.run()
    # the last phase continues the data where "main" left it and ends at the epoch end
    assert events == [
        ("start", "warm", 0), ("end", "warm", 3),
        ("start", "main", 3), ("end", "main", 7),
        ("start", "last", 7), ("end", "last", 44),
    ]


def test_a_raising_listener_fires_exception_and_names_the_plugin(run_dir: Path) -> None:
    engine = digits_engine(run_dir, max_steps=5)
    seen: list[BaseException] = []
    engine.on("exception", lambda state, error: seen.append(error))

    def fragile(state):
        if state.clock.step == 2:
            raise RuntimeError("listener broke")

    engine.use(lambda e: e.on("step_end", fragile), name="fragile_plugin")
    with pytest.raises(RuntimeError, match="listener broke") as info:
        engine.run()
    assert seen and seen[0] is info.value
    assert any("fragile_plugin" in note for note in info.value.__notes__)


def test_background_checkpoints_equal_foreground_ones(tmp_path: Path) -> None:
    from hookengine.training.checkpoint import load_tree

    trees = {}
    for mode in ("foreground", "background"):
        engine = digits_engine(tmp_path / mode, max_steps=12)
        engine.use("checkpoint", name="every4", every=4, keep_last=0, background=mode == "background",
                   folder=str(tmp_path / mode / "ck"))
        engine.run()
        folder = tmp_path / mode / "ck"
        assert [p.name for p in sorted(folder.glob("step-*"))] == ["step-00000004", "step-00000008", "step-00000012"]
        assert not list(folder.glob(".*tmp*"))
        trees[mode] = load_tree(folder / "step-00000004")
    fg, bg = trees["foreground"], trees["background"]
    for name, tensor in fg["models"]["model"].items():
        assert torch.equal(tensor, bg["models"]["model"][name]), name  # a snapshot of step 4, not later


def test_a_phase_naming_an_unknown_routine_or_data_is_a_clear_error(run_dir: Path) -> None:
    from hookengine import PluginError

    engine = digits_engine(run_dir, phases=[{"name": "a", "steps": 2, "routine": "supervisd"}])
    with pytest.raises(PluginError, match=r"phase 'a': unknown routine 'supervisd' \(did you mean 'supervised'\?\)"):
        engine.run()
    engine = digits_engine(run_dir, phases=[{"name": "b", "steps": 2, "data": "trian"}])
    with pytest.raises(PluginError, match=r"phase 'b' reads data 'trian' \(did you mean 'train'\?\)"):
        engine.run()
