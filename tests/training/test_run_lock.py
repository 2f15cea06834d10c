"""One run per folder: a second process is refused while the first holds the lock; the lock
of a process that died is taken over, saying whose it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hookengine import Engine
from hookengine.training.run_lock import LOCK_FILE, RunLock, RunLockError, lock_holder

HOLD = """
import sys, time
from hookengine.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def hold_in_child(folder: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_process_is_refused_then_takes_over_when_the_first_is_killed(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"run folder {tmp_path} is in use by pid {child.pid} on \S+ since "):
            RunLock(tmp_path).acquire()
        assert lock_holder(tmp_path)["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead child's flock
    try:
        assert lock.took_over["pid"] == child.pid
        assert f"took over the lock of pid {child.pid}" in lock.takeover_message()
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None  # released: empty, so the next run takes no stale lock
    again = RunLock(tmp_path).acquire()
    assert again.took_over is None
    again.release()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over_by_a_run(run_dir: Path, capsys) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": child.pid, "host": "gone", "started": "earlier", "command": "x"}))
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use("digits", batch_size=16)
    engine.use("supervised", model="hookengine.demo.digits:DigitsConvNet")
    engine.use_defaults({"trainer": {"max_steps": 1, "eval_at_phase_end": False}, "checkpoint": {"save_at_end": False},
                         "logging": {"plot": False}, "progress": {"enabled": False}})
    engine.run()
    out = capsys.readouterr().out
    assert f"run folder {run_dir}: took over the lock of pid {child.pid} on gone since earlier (x)" in out
    assert lock_holder(run_dir) is None  # released at teardown


def test_the_same_process_may_lock_again_and_releases_last(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()
    assert second is first
    second.release()
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    first.release()
    assert lock_holder(tmp_path) is None


@pytest.mark.slow
def test_a_second_cli_run_into_a_locked_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "locked",
        "plugins": {"digits": {"use": "digits", "batch_size": 16},
                    "classifier": {"use": "supervised", "model": "hookengine.demo.digits:DigitsConvNet"}},
        "trainer": {"max_steps": 1}, "progress": {"enabled": False},
    }))
    child = hold_in_child(run)  # a real first process holds the folder
    try:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "hookengine", "run", str(recipe), "--run-dir", str(run)],
                                capture_output=True, text=True, timeout=240)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"is in use by pid {child.pid}" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert time.monotonic() - start < 120
