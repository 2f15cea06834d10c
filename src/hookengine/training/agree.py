"""One small integer agreed by every process of a run (a max over the ranks).

The trainer's stop and non-finite decisions must be the same on every rank, or one rank
would leave the loop (or skip a checkpoint's barrier) while the others wait for it. The
value goes through a gloo group of its own, on the CPU: with NCCL that costs a network
round trip but no GPU synchronisation (the training stream is not touched).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Agreement"]


class Agreement:
    """Max-reduce a non-negative integer over the processes of ``runtime``.

    Every process must call :meth:`max` at the same point of the run (a collective).
    """

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._group: Any = None
        self._ready = False

    def max(self, value: int) -> int:
        """The largest ``value`` over all processes (``value`` itself in a single process)."""
        if not self.runtime.distributed:
            return value
        import torch
        import torch.distributed as dist

        if not self._ready:
            # Created at the first call, which every rank reaches at the same point.
            if dist.get_backend() == "gloo":
                self._group = None
            else:
                from datetime import timedelta

                timeout = timedelta(seconds=getattr(self.runtime, "timeout_s", 300.0))
                self._group = dist.new_group(backend="gloo", timeout=timeout)
            self._ready = True
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def all(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process."""
        return self.max(0 if ok else 1) == 0
