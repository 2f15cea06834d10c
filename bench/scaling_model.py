"""Cost model of data-parallel (DDP) and sharded (FSDP) training steps, from measured parameters.

Pure Python (no torch): ``bench/scaling.py`` measures the parameters on this machine and
calls :func:`prediction_table`; ``tests/test_scaling_model.py`` checks the formulas against
hand-computed cases. Times are seconds, sizes bytes, bandwidths bytes per second.

Collectives (alpha-beta model, N processes, message of S bytes, alpha = latency of one
message, beta = seconds per byte on one link):

- ring all-reduce:       2(N-1) alpha + 2 (N-1)/N S beta
- tree all-reduce:       2 ceil(log2 N) alpha + 2 (N-1)/N S beta   (NCCL's double binary
  tree is bandwidth-optimal up to a constant; this is its latency advantage)
- ring all-gather / reduce-scatter of a full buffer of S bytes: (N-1) alpha + (N-1)/N S beta

A step = compute + the wait for the slowest rank + exposed communication + the engine's own
per-step costs (host work, sampler planning and checkpoint coordination amortised per step,
the stop agreement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Algorithm = Literal["ring", "tree"]
Strategy = Literal["ddp", "fsdp"]


# ----------------------------------------------------------------- collectives
def ring_all_reduce(n: int, size: float, alpha: float, beta: float) -> float:
    """Seconds for a ring all-reduce of ``size`` bytes over ``n`` processes."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size * beta


def tree_all_reduce(n: int, size: float, alpha: float, beta: float) -> float:
    """Seconds for a (double binary) tree all-reduce: log-depth latency, ring-like bandwidth."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha + 2 * (n - 1) / n * size * beta


def all_reduce(n: int, size: float, alpha: float, beta: float, algorithm: Algorithm = "ring") -> float:
    """Ring or tree all-reduce time."""
    return (ring_all_reduce if algorithm == "ring" else tree_all_reduce)(n, size, alpha, beta)


def ring_all_gather(n: int, size: float, alpha: float, beta: float, algorithm: Algorithm = "ring") -> float:
    """All-gather (or reduce-scatter) of a ``size``-byte full buffer, each rank holding ``size/n``."""
    if n <= 1:
        return 0.0
    steps = (n - 1) if algorithm == "ring" else math.ceil(math.log2(n))
    return steps * alpha + (n - 1) / n * size * beta


ring_reduce_scatter = ring_all_gather


def fit_alpha_beta(sizes: list[float], times: list[float], n: int, kind: str) -> tuple[float, float]:
    """Least-squares alpha, beta from measured (size, time) pairs of one collective.

    ``kind`` is ``all_reduce`` (T = 2(N-1) a + 2(N-1)/N S b) or ``all_gather`` /
    ``reduce_scatter`` (T = (N-1) a + (N-1)/N S b). Negative fits are clipped to tiny values.
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("fit_alpha_beta: give at least two (size, time) pairs")
    k = 2.0 if kind == "all_reduce" else 1.0
    # T = c0 + c1 S with c0 = k (N-1) alpha, c1 = k (N-1)/N beta.
    mean_s = sum(sizes) / len(sizes)
    mean_t = sum(times) / len(times)
    var = sum((s - mean_s) ** 2 for s in sizes)
    c1 = sum((s - mean_s) * (t - mean_t) for s, t in zip(sizes, times)) / var
    c0 = mean_t - c1 * mean_s
    # Latency from the smallest messages is more robust than the intercept of a line
    # dominated by the largest ones.
    small = min(range(len(sizes)), key=lambda i: sizes[i])
    c0 = max(min(c0, times[small]), times[small] - c1 * sizes[small], 1e-9)
    return c0 / (k * (n - 1)), max(c1, 1e-15) / (k * (n - 1) / n)


# ----------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One model and how it is trained.

    Attributes:
        name: shown in tables.
        params: all parameters.
        trainable: parameters with gradients (LoRA: the adapters only).
        flops_per_sample: forward FLOPs of one sample.
        batch_per_gpu: samples per GPU per step (weak scaling: global batch = N x this).
        fsdp_units: wrapped units (layers) of FSDP; each is one all-gather / reduce-scatter.
        dataset_samples: samples in one epoch (sampler planning).
        seq_tokens: tokens per sample (informational).
    """

    name: str
    params: float
    trainable: float
    flops_per_sample: float
    batch_per_gpu: int
    fsdp_units: int
    dataset_samples: float
    seq_tokens: int = 0

    @property
    def lora(self) -> bool:
        return self.trainable < self.params

    def train_flops_per_sample(self) -> float:
        """Forward + backward FLOPs: 3x forward for full training; a frozen base needs the
        activation gradients but not its weight gradients, so LoRA is about 2x forward."""
        return self.flops_per_sample * (2.0 if self.lora else 3.0)

    def backward_fraction(self) -> float:
        return 0.5 if self.lora else 2.0 / 3.0


@dataclass(frozen=True)
class Cluster:
    """Assumed hardware of one machine (one GPU) and the network between machines."""

    name: str
    peak_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.40
    gpu_memory: float = 80e9
    link_bytes_per_s: float = 100e9 / 8  # 100 Gb/s per machine
    alpha: float = 10e-6  # one network message, NCCL over RDMA
    host_alpha: float = 50e-6  # one gloo (TCP) message between machines, added to the measured software cost
    algorithm: Algorithm = "ring"
    ddp_bucket_bytes: float = 25 * 2**20  # torch DDP's default bucket_cap_mb
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    host_copy_bytes_per_s: float = 20e9  # GPU -> host copy of the checkpointed state
    checkpoint_background: bool = False  # the checkpoint plugin's default: rank 0 writes in the step
    jitter_cv: float = 0.02  # step-to-step spread of one GPU's compute time (std / mean)
    agreements_per_step: float = 2 / 10  # the trainer's finite and stop checks, each every 10 steps

    @property
    def beta(self) -> float:
        return 1.0 / self.link_bytes_per_s


@dataclass
class Measured:
    """Parameters measured on this machine (``bench/scaling.py``); defaults are placeholders."""

    gloo_alpha: float = 50e-6  # s per message (all-reduce fit, loopback)
    gloo_beta: float = 1e-9  # s per byte
    engine_step_s: float = 25e-6  # hookengine loop minus raw torch loop, per step
    plan_s_per_sample: float = 3e-7  # plan_epoch, per sample in the epoch
    checkpoint_s_per_byte: float = 1e-9  # write_checkpoint (safetensors + SHA-256 + fsync)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Measured":
        keys = ("gloo_alpha", "gloo_beta", "engine_step_s", "plan_s_per_sample", "checkpoint_s_per_byte")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"measured parameters: missing key(s) {', '.join(missing)}")
        return cls(**{k: float(data[k]) for k in keys}, extra={k: v for k, v in data.items() if k not in keys})


# ----------------------------------------------------------------- one step
GRAD_BYTES = 4  # fp32 gradients (DDP on fp32 master weights; FSDP reduce in fp32)
PARAM_BYTES = 2  # bf16 parameters gathered by FSDP
STATE_BYTES = 12  # fp32 weights + Adam's two moments, per trainable parameter (checkpoint)


def memory_per_gpu(w: Workload, strategy: Strategy, n: int) -> float:
    """Bytes of model state per GPU (activations left out): bf16 base + for each trainable
    parameter bf16 weight, fp32 gradient, fp32 master and two Adam moments (16 bytes)."""
    frozen = (w.params - w.trainable) * 2
    trainable = w.trainable * 16
    if strategy == "ddp":
        return frozen + trainable
    return (frozen + trainable) / n + 2 * w.params / w.fsdp_units * 2  # shard + two gathered units


def step_time(w: Workload, c: Cluster, m: Measured, n: int, strategy: Strategy) -> dict[str, float]:
    """Predicted seconds of one optimizer step on ``n`` machines, split into its terms."""
    compute = w.batch_per_gpu * w.train_flops_per_sample() / (c.peak_flops * c.mfu)
    backward = compute * w.backward_fraction()
    if strategy == "ddp":
        grad = w.trainable * GRAD_BYTES
        buckets = max(1, math.ceil(grad / c.ddp_bucket_bytes))
        comm = buckets * all_reduce(n, grad / buckets, c.alpha, c.beta, c.algorithm)
        # Buckets are reduced while backward runs; the last one cannot be hidden.
        exposed = max(comm - backward, comm / buckets)
    else:
        # FSDP (ZeRO-3): all-gather every unit's bf16 parameters in forward and again in
        # backward, reduce-scatter the gradients of trainable ones. Frozen weights are
        # sharded too, so a LoRA run still gathers the whole base model.
        units = w.fsdp_units
        gather = units * ring_all_gather(n, w.params * PARAM_BYTES / units, c.alpha, c.beta, c.algorithm)
        scatter = units * ring_reduce_scatter(n, w.trainable * GRAD_BYTES / units, c.alpha, c.beta, c.algorithm)
        comm = 2 * gather + scatter
        # Prefetch overlaps the next unit's gather with this unit's compute; the first is exposed.
        exposed = max(comm - compute, comm / units) if n > 1 else 0.0
    if n <= 1:
        comm = exposed = 0.0
    # Every collective waits for the slowest rank: the expected maximum of N normal compute
    # times is about mean + std * sqrt(2 ln N).
    straggler = compute * c.jitter_cv * math.sqrt(2 * math.log(n)) if n > 1 else 0.0
    engine = engine_terms(w, c, m, n, strategy)
    total = compute + straggler + exposed + sum(engine.values())
    return {"compute": compute, "straggler": straggler, "comm": comm, "exposed": exposed, **engine, "total": total}


def engine_terms(w: Workload, c: Cluster, m: Measured, n: int, strategy: Strategy) -> dict[str, float]:
    """The engine's own per-step costs, which do not shrink with a faster GPU."""
    host = m.engine_step_s
    # Every rank plans the whole epoch (dataset_samples) once per epoch; an epoch has
    # dataset_samples / (batch x N) steps, so per step this is plan_s x batch x N.
    plan = m.plan_s_per_sample * w.batch_per_gpu * n
    # Agreements: one gloo all-reduce of one integer for the non-finite check every
    # trainer.finite_check_every (10) steps and one for stop signals every stop_check_every (10).
    gloo_alpha = m.gloo_alpha + c.host_alpha
    agree = all_reduce(n, 8, gloo_alpha, m.gloo_beta, c.algorithm) * c.agreements_per_step if n > 1 else 0.0
    # Checkpoint: gather every rank's RNG state to rank 0 (gather_object), two barriers,
    # rank 0 writes trainable state (12 bytes/param); FSDP first gathers it to rank 0.
    state = w.trainable * STATE_BYTES
    coord = (ring_all_gather(n, 5000 * n, gloo_alpha, m.gloo_beta, c.algorithm)
             + 2 * all_reduce(n, 8, c.alpha, c.beta, c.algorithm)) if n > 1 else 0.0
    gather_state = state / c.link_bytes_per_s if strategy == "fsdp" and n > 1 else 0.0
    write = state / c.host_copy_bytes_per_s
    if not c.checkpoint_background:
        write += state * m.checkpoint_s_per_byte
    # (A background write is hidden while it is shorter than checkpoint_every steps; the
    # next save waits for it otherwise: see checkpoint_table.)
    ckpt = (coord + gather_state + write) / c.checkpoint_every
    return {"host": host, "plan": plan, "agree": agree, "checkpoint": ckpt}


def efficiency(w: Workload, c: Cluster, m: Measured, n: int, strategy: Strategy) -> float:
    """Weak-scaling efficiency: samples/s per machine at ``n`` over that at one machine."""
    return step_time(w, c, m, 1, strategy)["total"] / step_time(w, c, m, n, strategy)["total"]


def fits(w: Workload, c: Cluster, strategy: Strategy, n: int) -> bool:
    """Whether the model state fits the GPU, leaving 25 % for activations."""
    return memory_per_gpu(w, strategy, n) <= 0.75 * c.gpu_memory


# ----------------------------------------------------------------- the tables
SD_FORWARD_FLOPS = 2 * 339e9  # SD-1.x UNet, 64x64 latents (512 px): 339 G MACs per forward
LLM_TOKENS = 2048

WORKLOADS = [
    Workload("SD UNet LoRA r16", 860e6, 3.2e6, SD_FORWARD_FLOPS, 8, 16, 10e6),
    Workload("SD UNet full", 860e6, 860e6, SD_FORWARD_FLOPS, 8, 16, 10e6),
    Workload("7B LoRA r16", 6.74e9, 40e6, 2 * 6.74e9 * LLM_TOKENS, 4, 32, 10e6, LLM_TOKENS),
    Workload("7B full", 6.74e9, 6.74e9, 2 * 6.74e9 * LLM_TOKENS, 4, 32, 10e6, LLM_TOKENS),
]
MACHINES = [8, 64, 512, 3500]
NETWORKS = [("100 Gb/s", 100e9 / 8), ("400 Gb/s", 400e9 / 8)]


def prediction_rows(m: Measured, algorithm: Algorithm = "ring") -> list[dict[str, Any]]:
    """One row per (workload, strategy, network): step time and efficiency at each N."""
    rows = []
    for w in WORKLOADS:
        for strategy in ("ddp", "fsdp"):
            for net, bw in NETWORKS:
                c = Cluster(name=net, link_bytes_per_s=bw, algorithm=algorithm)
                row: dict[str, Any] = {"workload": w.name, "strategy": strategy, "network": net,
                                       "one_machine_ms": step_time(w, c, m, 1, strategy)["total"] * 1e3}
                for n in MACHINES:
                    t = step_time(w, c, m, n, strategy)
                    row[n] = {"ms": t["total"] * 1e3, "eff": efficiency(w, c, m, n, strategy),
                              "fits": fits(w, c, strategy, n), "terms": t}
                rows.append(row)
    return rows


def prediction_table(m: Measured, algorithm: Algorithm = "ring") -> str:
    """Markdown table: step ms and weak-scaling efficiency for 8, 64, 512, 3500 machines."""
    head = "| workload | strategy | network | 1 machine | " + " | ".join(f"N={n}" for n in MACHINES) + " |"
    lines = [head, "|" + "---|" * (4 + len(MACHINES))]
    for row in prediction_rows(m, algorithm):
        cells = []
        for n in MACHINES:
            cell = row[n]
            text = f"{cell['ms']:.0f} ms, {cell['eff'] * 100:.0f} %"
            cells.append(text if cell["fits"] else f"({text}) no fit")
        lines.append(f"| {row['workload']} | {row['strategy'].upper()} | {row['network']} | "
                     f"{row['one_machine_ms']:.0f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def engine_table(m: Measured, algorithm: Algorithm = "ring") -> str:
    """The engine's own terms (ms per step) at each N, for the SD LoRA DDP run on 400 Gb/s."""
    w = WORKLOADS[0]
    c = Cluster(name="400 Gb/s", link_bytes_per_s=400e9 / 8, algorithm=algorithm)
    lines = ["| N | compute | straggler | exposed comm | host | sampler plan | agreements | checkpoint | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in [1, *MACHINES]:
        t = step_time(w, c, m, n, "ddp")
        lines.append(f"| {n} | " + " | ".join(f"{t[k] * 1e3:.3f}" for k in
                     ("compute", "straggler", "exposed", "host", "plan", "agree", "checkpoint", "total")) + " |")
    return "\n".join(lines)


def with_algorithm(c: Cluster, algorithm: Algorithm) -> Cluster:
    return replace(c, algorithm=algorithm)


def fixed_batch_table(m: Measured, global_batch: dict[str, int] | None = None, algorithm: Algorithm = "tree") -> str:
    """Strong scaling: the global batch stays fixed, so each GPU's batch shrinks as N grows.

    DDP for the LoRA runs and SD full, FSDP for 7B full; 400 Gb/s. Below one sample per GPU
    the run cannot use the machines at all.
    """
    global_batch = global_batch or {"SD UNet LoRA r16": 2048, "SD UNet full": 2048, "7B LoRA r16": 512, "7B full": 512}
    c = Cluster(name="400 Gb/s", link_bytes_per_s=400e9 / 8, algorithm=algorithm)
    lines = ["| workload | strategy | global batch | " + " | ".join(f"N={n}" for n in MACHINES) + " |",
             "|" + "---|" * (3 + len(MACHINES))]
    for w in WORKLOADS:
        strategy: Strategy = "fsdp" if w.name == "7B full" else "ddp"
        g = global_batch[w.name]
        cells = []
        for n in MACHINES:
            if g < n:
                cells.append(f"{g / n:.2f} samples/GPU: idle GPUs")
                continue
            wn = replace(w, batch_per_gpu=g // n)
            t = step_time(wn, c, m, n, strategy)
            ideal = step_time(wn, c, m, 1, strategy)["total"]  # the same per-GPU work, no communication
            cells.append(f"b={g // n}: {t['total'] * 1e3:.0f} ms, {ideal / t['total'] * 100:.0f} %")
        lines.append(f"| {w.name} | {strategy.upper()} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpoint_table(m: Measured, every: int = 500) -> str:
    """Rank 0 writes the whole trainable state: seconds per save at this machine's write rate,
    its share of each step (foreground, every ``every`` steps) and what FSDP adds."""
    lines = ["| workload | state written | write per save | per step (every %d, 8 machines, 400 Gb/s) | "
             "FSDP: gather to rank 0 / rank-0 host memory |" % every, "|---|---|---|---|---|"]
    for w in WORKLOADS:
        state = w.trainable * STATE_BYTES
        write = state * m.checkpoint_s_per_byte
        c = Cluster(name="400 Gb/s", link_bytes_per_s=400e9 / 8, checkpoint_every=every, algorithm="tree")
        t = step_time(w, c, m, 8, "ddp")
        lines.append(f"| {w.name} | {state / 1e9:.2f} GB | {write:.1f} s | {t['checkpoint'] * 1e3:.1f} ms of "
                     f"{t['total'] * 1e3:.0f} ms | {state / c.link_bytes_per_s:.1f} s / {state / 1e9:.1f} GB |")
    return "\n".join(lines)


def planning_table(m: Measured, batch: int = 8) -> str:
    """Every rank plans the whole epoch: seconds at each epoch start, the plan's memory on each
    rank, and the cost per step at 3500 machines (an epoch is samples / (batch x N) steps)."""
    lines = ["| samples per epoch | plan (every rank, each epoch) | plan memory per rank | per step at N=512 / 3500 |",
             "|---|---|---|---|"]
    for samples in (1e6, 1e7, 1e8, 1e9, 5e9):
        plan = samples * m.plan_s_per_sample
        per_step = [m.plan_s_per_sample * batch * n * 1e3 for n in (512, 3500)]
        lines.append(f"| {samples:.0e} | {plan:.1f} s | {samples * 8 / 1e9:.2f} GB | "
                     f"{per_step[0]:.1f} / {per_step[1]:.1f} ms |")
    return "\n".join(lines)
