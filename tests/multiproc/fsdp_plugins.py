"""Plugin of the FSDP tests: every rank records its losses and writes the full weights at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class FullDump:
    """Per-step losses of this rank, then the whole (gathered) weights, as ``rank{R}.*`` in ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, engine: Any) -> None:
        self.engine = engine
        self.losses: dict[int, float] = {}
        engine.on("step_end", self._loss)
        engine.on("run_end", self._dump, priority=-100)

    def _loss(self, state: Any, loss: Any) -> None:
        self.losses[state.clock.step] = float(loss)

    def _dump(self, state: Any) -> None:
        from safetensors.torch import save_file

        runtime = self.engine.runtime
        weights = {}
        for name, model in state.models.items():
            for key, value in runtime.unwrap(model).state_dict().items():
                if hasattr(value, "full_tensor"):  # sharded: every rank gathers (a collective)
                    value = value.full_tensor()
                weights[f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
        sharded = [type(p).__name__ for m in state.models.values() for p in runtime.unwrap(m).parameters()]
        self.folder.mkdir(parents=True, exist_ok=True)
        rank = runtime.process_index
        save_file(weights, str(self.folder / f"rank{rank}.safetensors"))
        info = {"losses": self.losses, "world": runtime.num_processes, "parameter_types": sorted(set(sharded))}
        (self.folder / f"rank{rank}.json").write_text(json.dumps(info))
