"""SIGTERM and SIGINT as a stop request served at the next step boundary.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before SIGKILL, and torchrun
forwards it to its workers. The handler only notes the signal (Python runs handlers in
the main thread, between bytecodes); the trainer reads the note at its step boundaries,
writes a checkpoint and raises :class:`StoppedBySignal`, a ``SystemExit`` whose code is
``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, as a shell reports a process
killed by that signal).

A second signal stops at once: the previous handlers come back and the signal goes to
them (SIGINT: ``KeyboardInterrupt``; SIGTERM by default: the process ends there), without
a checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["StopSignals", "StoppedBySignal", "signal_number"]


class StoppedBySignal(SystemExit):
    """The run stopped at a step boundary after a signal; ``code`` is ``128 + signum``.

    A ``SystemExit``, so a script (or ``hookengine run``) exits with the conventional
    status unless it catches it; ``str(error)`` says where it stopped and what was written.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.code = 128 + signum


def signal_number(name: str) -> int:
    """``"SIGTERM"``/``"TERM"`` -> its number; an unknown name is an error naming it."""
    key = name.upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    number = getattr(signal, key, None)
    if not isinstance(number, signal.Signals):
        raise ValueError(f"trainer.stop_signals: unknown signal {name!r}")
    return int(number)


class StopSignals:
    """Handlers that note the first stop signal; install in the main thread, then restore.

    Args:
        names: the signals to handle (``SIGTERM``, ``SIGINT``...).
    """

    def __init__(self, names: list[str]) -> None:
        self.numbers = [signal_number(n) for n in names]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install the handlers; a no-op outside the main thread. Returns whether installed."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return False
        self.received = None
        for number in self.numbers:
            previous = signal.getsignal(number)
            if previous is signal.SIG_IGN:  # the launcher asked to ignore it (nohup): keep that
                continue
            self._previous[number] = previous
            signal.signal(number, self._handle)
        return bool(self._previous)

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another print.
            os.write(2, f"hookengine: {name} received; stopping at the next step boundary "
                        f"(send it again to stop at once)\n".encode())
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)  # e.g. Python's default SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action: the process ends here
