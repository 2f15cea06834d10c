"""SIGTERM / SIGINT stop at a step boundary with a checkpoint; real signals, timed by progress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from hookengine import Engine
from hookengine.training.checkpoint import latest_checkpoint, load_tree
from hookengine.training.signals import StoppedBySignal

ROOT = Path(__file__).resolve().parents[2]


def engine_for(run_dir: Path, max_steps: int, resume: str | None = None, **trainer) -> Engine:
    from tests.training.signal_plugins import toy_data

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(toy_data)
    engine.use("supervised", model="tests.training.signal_plugins:TinyMLP", loss="mse_loss")
    engine.use_defaults({
        "trainer": {"max_steps": max_steps, "lr": 0.01, **trainer},
        "checkpoint": {"every": 0, "keep_last": 0, "resume": resume},
        "logging": {"every": 1, "plot": False},
        "progress": {"enabled": False},
    })
    return engine


def signal_self_at(engine: Engine, step: int, *signums: int) -> None:
    @engine.on("step_end", once=step)
    def send(state) -> None:
        for signum in signums:
            os.kill(os.getpid(), signum)  # a real signal; Python runs the handler right after


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(run_dir: Path, signum: int, code: int) -> None:
    before = signal.getsignal(signum)
    engine = engine_for(run_dir, max_steps=50)
    signal_self_at(engine, 5, signum)
    with pytest.raises(StoppedBySignal) as stopped:
        engine.run()
    assert stopped.value.code == code
    assert f"stopped by {signal.Signals(signum).name} at step 5" in str(stopped.value)
    assert engine.state.clock.step == 5
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None and newest.name == "step-00000005"
    assert load_tree(newest)["clock"]["step"] == 5
    assert signal.getsignal(signum) is before  # restored at teardown
    # it continues to the end from there
    again = engine_for(run_dir, max_steps=8, resume="latest")
    again.run()
    assert again.state.clock.step == 8


def test_a_second_sigint_stops_at_once_without_a_checkpoint(run_dir: Path) -> None:
    engine = engine_for(run_dir, max_steps=50)
    signal_self_at(engine, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.state.clock.step == 3
    assert latest_checkpoint(run_dir / "checkpoints") is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_handlers_outside_the_main_thread(run_dir: Path) -> None:
    seen: list[object] = []
    engine = engine_for(run_dir, max_steps=3)
    engine.on("step_end", lambda state: seen.append(signal.getsignal(signal.SIGTERM)))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            engine.run()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors and engine.state.clock.step == 3
    assert seen and all(handler is signal.getsignal(signal.SIGTERM) for handler in seen)


def test_an_unknown_signal_name_is_an_error_naming_it(run_dir: Path) -> None:
    with pytest.raises(Exception, match="unknown signal 'SIGNOPE'"):
        engine_for(run_dir, max_steps=3, stop_signals=["SIGNOPE"])


# ------------------------------------------------------------------ real processes
def write_recipe(tmp: Path, name: str, max_steps: int, hold_at: int, **trainer) -> Path:
    data = {
        "name": name,
        "seed": 0,
        "run_dir": str(tmp / name),
        "plugins": {
            "data": {"use": "tests.training.signal_plugins:toy_data"},
            "mlp": {"use": "supervised", "model": "tests.training.signal_plugins:TinyMLP", "loss": "mse_loss"},
            "hold": {"use": "tests.training.signal_plugins:Hold", "folder": str(tmp / "progress"), "hold_at": hold_at},
        },
        "trainer": {"max_steps": max_steps, "lr": 0.01, "eval_at_phase_end": False, **trainer},
        "checkpoint": {"every": 0, "keep_last": 0},
        "logging": {"every": 1, "plot": False},
        "progress": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}


def wait_for(condition, process: subprocess.Popen, what: str, log: Path, timeout: float = 180) -> None:
    """Poll ``condition``; fail if the process ends first (the timeout only guards a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def launch(cmd: list[str], tmp: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=out, stderr=subprocess.STDOUT)


def hookengine(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hookengine", "run", str(recipe), *args]


def test_sigterm_to_hookengine_run_then_resume_to_the_end(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "single", max_steps=10_000, hold_at=7)
    progress, log = tmp_path / "progress", tmp_path / "single.log"
    process = launch(hookengine(recipe), tmp_path, log)
    wait_for(lambda: (progress / "rank0.held").exists(), process, "step 7", log)
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in log.read_text(), process, "the handler's note", log)
    (progress / "go").touch()
    assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM at step 7" in text, text[-3000:]
    checkpoints = tmp_path / "single" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-00000007"
    resumed = subprocess.run(hookengine(recipe, "--resume", "--set", "trainer.max_steps=12", "--set", "plugins.hold.hold_at=-1"),
                             cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "finished at step 12" in resumed.stdout  # the end-of-run summary
    assert latest_checkpoint(checkpoints).name == "step-00000012"


def test_a_second_sigterm_ends_the_process_at_once(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "twice", max_steps=10_000, hold_at=4)
    progress, log = tmp_path / "progress", tmp_path / "twice.log"
    process = launch(hookengine(recipe), tmp_path, log)
    wait_for(lambda: (progress / "rank0.held").exists(), process, "step 4", log)
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in log.read_text(), process, "the handler's note", log)
    process.send_signal(signal.SIGTERM)  # still held at step 4: no boundary was reached
    assert process.wait(timeout=60) == -signal.SIGTERM, log.read_text()[-3000:]
    assert latest_checkpoint(tmp_path / "twice" / "checkpoints") is None


# ----------------------------------------------------------------- two processes
def torchrun(recipe: Path, *args: str) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "hookengine", "run", str(recipe), *args]


def stopped_steps(text: str) -> dict[int, int]:
    """rank -> the step its stop message names."""
    import re

    return {int(r): int(s) for s, r in re.findall(r"stopped by SIGTERM at step (\d+) \(rank (\d)\)", text)}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resumes(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "ddp", max_steps=10_000, hold_at=6, stop_check_every=2)
    progress, log = tmp_path / "progress", tmp_path / "ddp.log"
    process = launch(torchrun(recipe), tmp_path, log)
    wait_for(lambda: all((progress / f"rank{r}.held").exists() for r in (0, 1)), process, "step 6 on both ranks", log)
    process.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to its workers
    wait_for(lambda: log.read_text().count("SIGTERM received") >= 2, process, "both handlers' notes", log)
    (progress / "go").touch()
    process.wait(timeout=120)
    text = log.read_text()
    assert stopped_steps(text) == {0: 6, 1: 6}, text[-3000:]
    checkpoints = tmp_path / "ddp" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-00000006"
    resumed = subprocess.run(torchrun(recipe, "--resume", "--set", "trainer.max_steps=10", "--set", "plugins.hold.hold_at=-1"),
                             cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert latest_checkpoint(checkpoints).name == "step-00000010"
    assert {(progress / f"rank{r}.step").read_text() for r in (0, 1)} == {"10"}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "one", max_steps=10_000, hold_at=4, stop_check_every=2)
    progress, log = tmp_path / "progress", tmp_path / "one.log"
    process = launch(torchrun(recipe), tmp_path, log)
    wait_for(lambda: all((progress / f"rank{r}.held").exists() for r in (0, 1)), process, "step 4 on both ranks", log)
    os.kill(int((progress / "rank1.pid").read_text()), signal.SIGTERM)  # rank 1 only
    wait_for(lambda: "SIGTERM received" in log.read_text(), process, "rank 1's note", log)
    (progress / "go").touch()
    process.wait(timeout=120)
    text = log.read_text()
    assert text.count("SIGTERM received") == 1, text[-3000:]
    assert stopped_steps(text) == {0: 4, 1: 4}, text[-3000:]
    assert latest_checkpoint(tmp_path / "one" / "checkpoints").name == "step-00000004"
