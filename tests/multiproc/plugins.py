"""Plugins used by the multi-process tests (referenced from recipes as module:attr)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DumpWeights:
    """At the end of a run, every rank writes its model weights and lr values."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, engine: Any) -> None:
        self.engine = engine
        self.lrs: list[float] = []
        engine.on("step_end", self._lr)
        engine.on("run_end", self._dump)

    def _lr(self, state: Any) -> None:
        self.lrs.append(next(iter(state.optimizers.values())).param_groups[0]["lr"])

    def _dump(self, state: Any) -> None:
        import json

        from safetensors.torch import save_file

        rank = self.engine.runtime.process_index
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {
            f"{name}.{k}": v.detach().cpu().contiguous()
            for name, model in state.models.items()
            for k, v in self.engine.runtime.unwrap(model).state_dict().items()
        }
        save_file(weights, str(self.folder / f"rank{rank}.safetensors"))
        (self.folder / f"rank{rank}.json").write_text(
            json.dumps({"step": state.clock.step, "lrs": self.lrs, "world": self.engine.runtime.num_processes})
        )


class DieAt:
    """Rank ``rank`` exits abruptly at optimizer step ``step`` (a crashed worker)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def setup(self, engine: Any) -> None:
        def maybe_die(state: Any) -> None:
            if engine.runtime.process_index == self.rank and state.clock.step == self.step:
                os._exit(3)

        engine.on("step_end", maybe_die)


class PhaseDump:
    """At every phase end, every rank writes its (unwrapped) weights and optimizer type."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("phase_end", self._dump, priority=-100)

    def _dump(self, state: Any, phase: Any) -> None:
        import json

        from safetensors.torch import save_file

        rank = self.engine.runtime.process_index
        self.folder.mkdir(parents=True, exist_ok=True)
        model = self.engine.runtime.unwrap(state.models["model"])
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, str(self.folder / f"{phase.name}-rank{rank}.safetensors"))
        optimizer = next(iter(state.optimizers.values()))
        inner = getattr(optimizer, "optimizer", optimizer)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        (self.folder / f"{phase.name}-rank{rank}.json").write_text(
            json.dumps({"optimizer": type(inner).__name__, "trainable": trainable, "step": state.clock.step})
        )
