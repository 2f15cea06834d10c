"""Measure the cost model's parameters here, then predict step time at 8-3500 machines.

Measured on this machine (medians of repeats, one thread per process):

- gloo all-reduce / all-gather / reduce-scatter between 2 processes on loopback, 8 B to
  16 MiB: latency alpha and seconds per byte beta (least-squares fit of the alpha-beta model);
- compute seconds per sample of an MLP workload (1 process), and a 2-process torch DDP step
  of the same workload, which the model predicts from the other figures (a check of the model);
- the engine's own per-step cost: hookengine's loop minus a raw torch loop, as
  ``bench/step_overhead.py`` measures it (paired runs, ``gc.freeze()``);
- the sampler's epoch planning cost per sample (``hookengine.data.sampler.plan_epoch``);
- the checkpoint write cost per byte (``hookengine.training.checkpoint.write_checkpoint``).

The prediction table (``bench/scaling_model.py``) uses these for the engine's own terms and
stated hardware assumptions (one H100 per machine, 40 % MFU, 100 / 400 Gb/s) for the rest.

Run: python bench/scaling.py [--out params.json]      (about a minute)
     python bench/scaling.py --dry params.json        (tables from saved parameters, no measuring)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling_model as model  # noqa: E402

SIZES = [8, 1024, 16 * 1024, 256 * 1024, 1024**2, 4 * 1024**2, 16 * 1024**2]
DDP_WIDTH, DDP_BATCH = 1024, 32  # MLP 256-1024-1024-10 (about 1.3 M parameters, 5 MB of gradients)


def _mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, DDP_WIDTH), torch.nn.ReLU(), torch.nn.Linear(DDP_WIDTH, DDP_WIDTH),
                               torch.nn.ReLU(), torch.nn.Linear(DDP_WIDTH, 10))


def _train_step(net: Any, opt: Any, x: Any, y: Any) -> None:
    import torch

    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------ 2 gloo processes
def _worker(rank: int, port: int, repeats: int, out: str, sizes: list[int]) -> None:
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # *_tensor collectives renamed in torch 2.13
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results: dict[str, Any] = {"all_reduce": {}, "all_gather": {}, "reduce_scatter": {}}

    def timed(fns: dict[str, Any], rounds: int = repeats) -> dict[str, float]:
        """Median seconds of each function, called in turn (interleaved: the same load for each)."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(rounds + 2):
            for name, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= 2:  # the first calls set up buffers
                    times[name].append(time.perf_counter() - t0)
        # Each round costs what its slower rank took (a straggler holds up the collective
        # that follows): the median over rounds of the per-round maximum.
        t = torch.tensor(list(times.values()), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return {name: statistics.median(row) for name, row in zip(fns, t.tolist())}

    def supported(fn: Any) -> bool:
        try:
            fn()
            return True
        except (RuntimeError, NotImplementedError, ValueError):
            return False

    probe, probe_half = torch.ones(4), torch.ones(2)
    gather_ok = supported(lambda: dist.all_gather_into_tensor(probe, probe_half))
    scatter_ok = supported(lambda: dist.reduce_scatter_tensor(probe_half, probe))
    if not scatter_ok:
        del results["reduce_scatter"]  # not in this gloo build; the model uses all-gather's fit
    for size in sizes:
        n = max(2, size // 4)  # float32 elements, even so both ranks hold half
        full = torch.ones(n)
        half = torch.ones(n // 2)
        fns = {"all_reduce": lambda: dist.all_reduce(full)}
        fns["all_gather"] = ((lambda: dist.all_gather_into_tensor(full, half)) if gather_ok
                             else (lambda: dist.all_gather(list(full.chunk(2)), half)))
        if scatter_ok:
            fns["reduce_scatter"] = lambda: dist.reduce_scatter_tensor(half, full)
        for kind, seconds in timed(fns).items():
            results[kind][size] = seconds
    # The model's check: a real DDP step of the MLP workload, next to the same step without
    # DDP on both ranks at once (the compute term under the same CPU contention) and a bare
    # all-reduce of its gradients (the communication term).
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(DDP_BATCH, 256, generator=g), torch.randint(0, 10, (DDP_BATCH,), generator=g)
    plain = _mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    net = torch.nn.parallel.DistributedDataParallel(_mlp())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    grads = torch.ones(sum(p.numel() for p in plain.parameters()))
    steps = timed({"local_step_s": lambda: _train_step(plain, plain_opt, x, y),
                   "ddp_step_s": lambda: _train_step(net, opt, x, y),
                   "grad_all_reduce_s": lambda: dist.all_reduce(grads)}, rounds=2 * repeats)
    results.update(steps)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def measure_collectives(repeats: int, sizes: list[int] = SIZES) -> dict[str, Any]:
    """Spawn 2 gloo processes on loopback; medians per collective and size, and their fits."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        mp.spawn(_worker, args=(port, repeats, out, list(sizes)), nprocs=2, join=True)
        raw = json.loads(Path(out).read_text())
    fits = {}
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        if kind in raw:
            sizes = [float(k) for k in raw[kind]]
            fits[kind] = model.fit_alpha_beta(sizes, list(raw[kind].values()), 2, kind)
    return {"raw": raw, "fits": fits}


# ------------------------------------------------------------ 1 process
def measure_compute(repeats: int) -> dict[str, float]:
    """Seconds per step of the MLP at batch 32 (and 8, interleaved): per sample, all in."""
    import torch

    torch.set_num_threads(1)
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    small, big = DDP_BATCH // 4, DDP_BATCH
    data = {b: (torch.randn(b, 256), torch.randint(0, 10, (b,))) for b in (small, big)}
    times: dict[int, list[float]] = {small: [], big: []}
    for i in range(repeats * 3 + 3):
        for b, (x, y) in data.items():
            t0 = time.perf_counter()
            _train_step(net, opt, x, y)
            if i >= 3:
                times[b].append(time.perf_counter() - t0)
    step = {b: statistics.median(v) for b, v in times.items()}
    grad_bytes = sum(p.numel() for p in net.parameters()) * 4
    # The marginal cost (slope between the two batches) is noisy under load; the model's
    # check uses the whole step.
    return {"compute_s_per_sample": step[big] / big, "compute_s_marginal": (step[big] - step[small]) / (big - small),
            "compute_step_s": step[big], "grad_bytes": grad_bytes}


def measure_engine(repeats: int, steps: int = 500) -> dict[str, float]:
    """hookengine's per-step cost over a raw torch loop (bench/step_overhead.py's method)."""
    import step_overhead as so

    data = so.make_data(steps)
    diffs, raws = [], []
    with contextlib.redirect_stdout(io.StringIO()):  # the engine's end-of-run lines
        so.raw(data[:50])
        so.hookengine(data[:50])
        gc.collect()
        gc.freeze()
        try:
            for _ in range(repeats):
                base = so.raw(data)
                rate = so.hookengine(data)
                raws.append(base)
                diffs.append(1 / rate - 1 / base)
        finally:
            gc.unfreeze()
    return {"engine_step_s": max(statistics.median(diffs), 0.0), "raw_steps_per_s": statistics.median(raws)}


def measure_plan(repeats: int, samples: int = 500_000) -> dict[str, float]:
    """plan_epoch seconds per sample (20 buckets, batch 8), for 1 and 64 replicas."""
    import numpy as np

    from hookengine.data.sampler import plan_epoch

    ids = np.random.default_rng(0).integers(0, 20, samples)
    out = {}
    for replicas in (1, 64):
        times = []
        for epoch in range(repeats):
            t0 = time.perf_counter()
            plan_epoch(ids, 8, num_replicas=replicas, seed=0, epoch=epoch)
            times.append(time.perf_counter() - t0)
        out[f"plan_s_per_sample_{replicas}"] = statistics.median(times) / samples
    out["plan_s_per_sample"] = max(out["plan_s_per_sample_1"], out["plan_s_per_sample_64"])
    return out


def measure_checkpoint(repeats: int, megabytes: int = 32) -> dict[str, float]:
    """write_checkpoint seconds per byte (safetensors, SHA-256 manifest, fsync, rename)."""
    import torch

    from hookengine.training.checkpoint import write_checkpoint

    big = {"model": {"w": torch.randn(megabytes * 2**20 // 4)}, "step": 1}
    small = {"model": {"w": torch.randn(16)}, "step": 1}
    per = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (("small", small), ("big", big)):
            times = []
            for step in range(repeats):
                t0 = time.perf_counter()
                write_checkpoint(tree, Path(tmp) / name, step, keep_last=1)
                times.append(time.perf_counter() - t0)
            per[name] = statistics.median(times)
    nbytes = megabytes * 2**20
    return {"checkpoint_s_per_byte": max(per["big"] - per["small"], 1e-12) / nbytes,
            "checkpoint_fixed_s": per["small"]}


def measure(repeats: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    coll = measure_collectives(repeats)
    params: dict[str, Any] = {}
    alpha, beta = coll["fits"]["all_reduce"]
    params.update(gloo_alpha=alpha, gloo_beta=beta)
    for kind, (a, b) in coll["fits"].items():
        params[f"{kind}_alpha"], params[f"{kind}_beta"] = a, b
    params["collective_medians_s"] = {k: v for k, v in coll["raw"].items() if isinstance(v, dict)}
    params.update(measure_compute(repeats))
    params["ddp2_step_s_measured"] = coll["raw"]["ddp_step_s"]
    params["local2_step_s_measured"] = coll["raw"]["local_step_s"]
    params["grad_all_reduce_s_measured"] = coll["raw"]["grad_all_reduce_s"]
    params.update(measure_engine(repeats))
    params.update(measure_plan(repeats))
    params.update(measure_checkpoint(max(3, repeats // 2)))
    params["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    params["cpus"] = os.cpu_count()
    params["measure_s"] = round(time.perf_counter() - t0, 1)
    return params


# ------------------------------------------------------------ output
def ddp_check(p: dict[str, Any]) -> dict[str, float]:
    """The model's 2-process DDP step of the MLP: the step without DDP, timed on both ranks at
    once, plus a ring all-reduce of the gradients from the gloo fit (no overlap / full overlap)."""
    comm = model.ring_all_reduce(2, p["grad_bytes"], p["gloo_alpha"], p["gloo_beta"])
    local = p.get("local2_step_s_measured", p["compute_step_s"])
    return {"comm_s": comm, "local_s": local, "predicted_no_overlap_s": local + comm,
            "predicted_full_overlap_s": max(local, comm), "measured_s": p["ddp2_step_s_measured"],
            "bare_all_reduce_s": p.get("grad_all_reduce_s_measured", float("nan"))}


def parameter_table(p: dict[str, Any]) -> str:
    """The measured parameters, one per line (lines whose figures are missing are left out)."""
    rows = [
        ("gloo all-reduce latency alpha (loopback, 2 proc)", lambda: f"{p['gloo_alpha'] * 1e6:.1f} µs"),
        ("gloo all-reduce bandwidth 1/beta", lambda: f"{1 / p['gloo_beta'] / 1e9:.2f} GB/s"),
        ("gloo all-gather alpha, 1/beta",
         lambda: f"{p['all_gather_alpha'] * 1e6:.1f} µs, {1 / p['all_gather_beta'] / 1e9:.2f} GB/s"),
        ("gloo reduce-scatter alpha, 1/beta",
         lambda: f"{p['reduce_scatter_alpha'] * 1e6:.1f} µs, {1 / p['reduce_scatter_beta'] / 1e9:.2f} GB/s"),
        ("compute per sample (MLP 256-1024-1024-10, batch 32, 1 thread)",
         lambda: f"{p['compute_s_per_sample'] * 1e6:.1f} µs (marginal {p['compute_s_marginal'] * 1e6:.1f} µs)"),
        ("compute per sample", lambda: f"{p['compute_s_per_sample'] * 1e6:.1f} µs"),
        ("engine per-step cost (hookengine, 20 listeners - raw torch loop)", lambda: f"{p['engine_step_s'] * 1e6:.1f} µs"),
        ("sampler plan_epoch per sample (1 / 64 replicas)",
         lambda: f"{p['plan_s_per_sample_1'] * 1e9:.0f} / {p['plan_s_per_sample_64'] * 1e9:.0f} ns"),
        ("sampler plan_epoch per sample", lambda: f"{p['plan_s_per_sample'] * 1e9:.0f} ns"),
        ("checkpoint write per byte (+ fixed)",
         lambda: f"{p['checkpoint_s_per_byte'] * 1e9:.2f} ns ({1 / p['checkpoint_s_per_byte'] / 1e9:.2f} GB/s) "
                 f"+ {p['checkpoint_fixed_s'] * 1e3:.1f} ms"),
        ("checkpoint write per byte", lambda: f"{p['checkpoint_s_per_byte'] * 1e9:.2f} ns"),
        ("load average (1 min) before / after, CPUs",
         lambda: f"{p['loadavg_1min'][0]} / {p['loadavg_1min'][1]}, {p['cpus']}"),
    ]
    shown: list[tuple[str, str]] = []
    for name, value in rows:
        try:
            text = value()
        except (KeyError, IndexError, TypeError):
            continue
        if not any(other.startswith(name) for other, _ in shown):  # the short form only when the long one is missing
            shown.append((name, text))
    width = max(len(name) for name, _ in shown)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in shown)


def report(p: dict[str, Any]) -> str:
    m = model.Measured.from_json(p)
    parts = ["Measured parameters", parameter_table(p)]
    if "ddp2_step_s_measured" in p:
        c = ddp_check(p)
        parts.append(
            f"\nCheck: 2-process DDP step of the MLP (batch {DDP_BATCH}/rank): step without DDP on both "
            f"ranks {c['local_s'] * 1e3:.2f} ms + all-reduce of {p['grad_bytes'] / 1e6:.1f} MB "
            f"{c['comm_s'] * 1e3:.2f} ms: predicted {c['predicted_full_overlap_s'] * 1e3:.2f}-"
            f"{c['predicted_no_overlap_s'] * 1e3:.2f} ms (full overlap - none), measured {c['measured_s'] * 1e3:.2f} ms "
            f"(with the bare all-reduce of those gradients timed next to it, {c['bare_all_reduce_s'] * 1e3:.2f} ms, "
            f"instead of the fit: {(c['local_s'] + c['bare_all_reduce_s']) * 1e3:.2f} ms, no overlap)")
    parts += ["\nPredicted step time and weak-scaling efficiency, ring collectives "
              "(assumed: H100 bf16 989 TFLOP/s at 40 % MFU, alpha 10 µs, 1 GPU per machine)",
              model.prediction_table(m, "ring"),
              "\nThe same with tree collectives (latency 2 log2(N) alpha)", model.prediction_table(m, "tree"),
              "\nThe engine's own terms (ms per step), SD LoRA DDP, 400 Gb/s, ring", model.engine_table(m, "ring"),
              "\nThe same, tree", model.engine_table(m, "tree"),
              "\nA fixed global batch (strong scaling), 400 Gb/s, tree: per-GPU batch, step time, "
              "efficiency vs the same per-GPU work without communication", model.fixed_batch_table(m),
              "\nCheckpoints: rank 0 writes the trainable state (fp32 weights + Adam, 12 bytes/parameter)",
              model.checkpoint_table(m),
              "\nEpoch planning (plan_epoch on every rank, batch 8 per GPU)", model.planning_table(m)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the measured parameters as JSON here")
    parser.add_argument("--dry", metavar="PARAMS_JSON", help="no measuring: tables from these parameters")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry:
        path = Path(args.dry)
        try:
            params = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            sys.exit(f"scaling: cannot read parameters {path}: {exc}")
        try:
            print(report(params))
        except (ValueError, KeyError) as exc:
            sys.exit(f"scaling: {path}: {exc}")
        return
    params = measure(args.repeats)
    print(report(params))
    if args.out:
        Path(args.out).write_text(json.dumps(params, indent=1))
    print(json.dumps({k: v for k, v in params.items() if k != "collective_medians_s"}))


if __name__ == "__main__":
    main()
