"""Benchmark: switching among three models with the model cache vs reloading from disk.

Three MLPs that together fit the cache budget are used in turn (a, b, c, a, b, c, ...).
The peer reloads the model from its safetensors file at every switch (the fastest plain
reload: meta skeleton + ``load_state_dict(assign=True)``). The ratio is measured on the
switch alone (get the model ready, nothing else); a second pair of timings adds one forward
per switch, which both sides pay equally. A last line shows the cache when the budget holds
only two of the three (round robin is LRU's worst case: every switch reads its disk tier).

    python bench/model_cache.py [--width 1024] [--depth 8] [--switches 60]

Prints the ratio (target >= 10x) and the bytes moved; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hookengine.models.cache import ModelCache
from hookengine.testing import build_tiny_mlp


def reload_from_disk(path: Path, width: int, depth: int) -> torch.nn.Module:
    """The peer: a fresh skeleton on meta, weights assigned straight from the file."""
    with torch.device("meta"):
        model = build_tiny_mlp(width, depth)
    model.load_state_dict(load_file(str(path)), assign=True)
    return model


def run_reload(paths: dict[str, Path], order: list[str], x: torch.Tensor | None, width: int, depth: int) -> float:
    started = time.perf_counter()
    for name in order:
        model = reload_from_disk(paths[name], width, depth)
        if x is not None:
            with torch.no_grad():
                model(x)
        del model
    return time.perf_counter() - started


def run_cache(cache: ModelCache, order: list[str], x: torch.Tensor | None) -> float:
    started = time.perf_counter()
    for name in order:
        with cache.acquire(name, "cpu") as model:
            if x is not None:
                with torch.no_grad():
                    model(x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--switches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ["a", "b", "c"]
    order = [names[i % 3] for i in range(args.switches)]
    x = torch.randn(4, args.width)

    with tempfile.TemporaryDirectory(prefix="bench-model-cache-") as tmp:
        root = Path(tmp)
        models = {n: build_tiny_mlp(args.width, args.depth, seed=i) for i, n in enumerate(names)}
        paths = {}
        for name, model in models.items():
            paths[name] = root / f"{name}.safetensors"
            save_file(model.state_dict(), str(paths[name]))
        model_bytes = sum(p.numel() * p.element_size() for p in models["a"].parameters())

        fits = ModelCache(budgets={"cpu": 3 * model_bytes}, offload_dir=str(root / "fits"))
        tight = ModelCache(budgets={"cpu": 2 * model_bytes}, offload_dir=str(root / "tight"))
        for name, model in models.items():
            fits.add(name, model, frozen=True)
        # The tight cache gets its own copies (a model belongs to one cache).
        for i, name in enumerate(names):
            tight.add(name, build_tiny_mlp(args.width, args.depth, seed=i), frozen=True)
        run_cache(fits, names, x)  # first use: every model is in place
        run_cache(tight, names, x)
        bytes_before = {"fits": fits.stats["bytes_moved"], "tight": tight.stats["bytes_moved"]}

        reload_s, cache_s, tight_s, reload_fw, cache_fw = [], [], [], [], []
        for _ in range(args.repeats):  # paired runs, medians: these machines are noisy
            reload_s.append(run_reload(paths, order, None, args.width, args.depth))
            cache_s.append(run_cache(fits, order, None))
            tight_s.append(run_cache(tight, order, None))
            reload_fw.append(run_reload(paths, order, x, args.width, args.depth))
            cache_fw.append(run_cache(fits, order, x))
        moved = {k: (c.stats["bytes_moved"] - bytes_before[k]) / args.repeats for k, c in (("fits", fits), ("tight", tight))}
        fits.close()
        tight.close()

    reload_med, cache_med, tight_med, reload_fw_med, cache_fw_med = (
        statistics.median(v) for v in (reload_s, cache_s, tight_s, reload_fw, cache_fw)
    )
    ratio = reload_med / cache_med
    print(f"models: 3 x {model_bytes / 1e6:.1f} MB MLPs ({args.width} wide, {args.depth} layers), {args.switches} switches")
    print(f"reload from disk every switch : {reload_med * 1e3:9.1f} ms  ({reload_med / args.switches * 1e3:.2f} ms/switch)")
    print(f"model_cache, all three fit    : {cache_med * 1e3:9.1f} ms  ({cache_med / args.switches * 1e3:.2f} ms/switch), "
          f"bytes moved {moved['fits']:.0f}")
    print(f"model_cache, budget for two   : {tight_med * 1e3:9.1f} ms  ({tight_med / args.switches * 1e3:.2f} ms/switch), "
          f"bytes moved {moved['tight'] / 1e6:.1f} MB (round robin: every switch reads the disk tier)")
    print(f"with one forward per switch   : reload {reload_fw_med * 1e3:.1f} ms, cache {cache_fw_med * 1e3:.1f} ms "
          f"({reload_fw_med / cache_fw_med:.2f}x end to end)")
    print(f"ratio reload / cache (switch): {ratio:.1f}x (target >= 10x); reload / tight cache: {reload_med / tight_med:.2f}x")
    print(json.dumps({
        "bench": "model_cache",
        "ratio": round(ratio, 2),
        "target": 10,
        "reload_s": round(reload_med, 5),
        "cache_s": round(cache_med, 5),
        "tight_cache_s": round(tight_med, 5),
        "tight_ratio": round(reload_med / tight_med, 3),
        "with_forward_ratio": round(reload_fw_med / cache_fw_med, 3),
        "bytes_moved_fits": int(moved["fits"]),
        "bytes_moved_tight": int(moved["tight"]),
        "model_bytes": model_bytes,
        "switches": args.switches,
    }))


if __name__ == "__main__":
    main()
