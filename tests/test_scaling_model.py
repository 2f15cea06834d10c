"""The scaling cost model (bench/scaling_model.py): formulas against hand-computed cases, and
``bench/scaling.py --dry`` computing the tables from a parameter file without measuring."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import scaling_model as sm  # noqa: E402

ALPHA, BETA = 1e-5, 1e-9  # 10 µs per message, 1 GB/s
PARAMS = {"gloo_alpha": 100e-6, "gloo_beta": 1e-9, "engine_step_s": 50e-6, "plan_s_per_sample": 300e-9,
          "checkpoint_s_per_byte": 2e-9}


def test_ring_all_reduce_by_hand():
    # N=2: 2(N-1) a + 2(N-1)/N S b = 2 a + S b
    assert sm.ring_all_reduce(2, 1e6, ALPHA, BETA) == pytest.approx(2e-5 + 1e-3)
    # N=8: 14 a + 14/8 S b
    assert sm.ring_all_reduce(8, 1e6, ALPHA, BETA) == pytest.approx(14e-5 + 1.75e-3)
    assert sm.ring_all_reduce(1, 1e6, ALPHA, BETA) == 0.0


def test_tree_latency_is_logarithmic():
    # N=8: 2 log2(8) a = 6 a; same bandwidth term as the ring.
    assert sm.tree_all_reduce(8, 1e6, ALPHA, BETA) == pytest.approx(6e-5 + 1.75e-3)
    n = 3500
    ring = sm.ring_all_reduce(n, 8, ALPHA, BETA)
    tree = sm.tree_all_reduce(n, 8, ALPHA, BETA)
    assert ring == pytest.approx(2 * 3499 * ALPHA, rel=1e-3)
    assert tree == pytest.approx(2 * math.ceil(math.log2(n)) * ALPHA, rel=1e-3)
    assert ring > 100 * tree


def test_all_gather_and_reduce_scatter_by_hand():
    # N=4: 3 a + 3/4 S b each; an all-reduce is a reduce-scatter then an all-gather.
    assert sm.ring_all_gather(4, 4e6, ALPHA, BETA) == pytest.approx(3e-5 + 3e-3)
    assert sm.ring_reduce_scatter(4, 4e6, ALPHA, BETA) + sm.ring_all_gather(4, 4e6, ALPHA, BETA) == pytest.approx(
        sm.ring_all_reduce(4, 4e6, ALPHA, BETA))


def test_fit_recovers_alpha_beta():
    sizes = [8, 1024, 2**16, 2**20, 2**24]
    for kind, fn in (("all_reduce", sm.ring_all_reduce), ("all_gather", sm.ring_all_gather)):
        times = [fn(2, s, 50e-6, 2e-9) for s in sizes]
        alpha, beta = sm.fit_alpha_beta(sizes, times, 2, kind)
        assert alpha == pytest.approx(50e-6, rel=1e-6)
        assert beta == pytest.approx(2e-9, rel=1e-6)
    with pytest.raises(ValueError, match="two"):
        sm.fit_alpha_beta([8], [1e-5], 2, "all_reduce")


def test_efficiency_falls_with_machines_and_lora_sends_less():
    m = sm.Measured.from_json(PARAMS)
    cluster = sm.Cluster(name="100 Gb/s")
    lora, full = sm.WORKLOADS[0], sm.WORKLOADS[1]
    for w in (lora, full):
        for strategy in ("ddp", "fsdp"):
            eff = [sm.efficiency(w, cluster, m, n, strategy) for n in (1, 8, 64, 512, 3500)]
            assert eff[0] == pytest.approx(1.0)
            assert all(a > b for a, b in zip(eff, eff[1:])), (w.name, strategy, eff)
    for n in (8, 3500):
        assert sm.step_time(lora, cluster, m, n, "ddp")["comm"] < sm.step_time(full, cluster, m, n, "ddp")["comm"] / 100
    # FSDP gathers the frozen base too: LoRA under FSDP sends far more than under DDP.
    assert sm.step_time(lora, cluster, m, 8, "fsdp")["comm"] > 50 * sm.step_time(lora, cluster, m, 8, "ddp")["comm"]


def test_engine_terms_by_hand():
    m = sm.Measured.from_json(PARAMS)
    c = sm.Cluster(name="x", host_alpha=0.0)
    w = sm.WORKLOADS[0]  # batch 8 per GPU
    t = sm.engine_terms(w, c, m, 64, "ddp")
    assert t["host"] == pytest.approx(50e-6)
    assert t["plan"] == pytest.approx(300e-9 * 8 * 64)  # every rank plans the whole epoch
    # Two gloo all-reduces of one integer every 10 steps (the finite and the stop checks).
    assert t["agree"] == pytest.approx(sm.ring_all_reduce(64, 8, 100e-6, 1e-9) * 2 / 10)
    # 7B full fine-tune: its state does not fit one H100 with DDP; FSDP shards it.
    assert not sm.fits(sm.WORKLOADS[3], c, "ddp", 8) and sm.fits(sm.WORKLOADS[3], c, "fsdp", 8)


def test_stragglers_and_checkpoints_cost_time():
    m = sm.Measured.from_json(PARAMS)
    w = sm.WORKLOADS[1]  # SD full: 860 M trainable parameters, 12 bytes each in a checkpoint
    steady = sm.Cluster(name="x", jitter_cv=0.0)
    jittery = sm.Cluster(name="x", jitter_cv=0.05)
    t = sm.step_time(w, jittery, m, 3500, "ddp")
    assert t["straggler"] == pytest.approx(t["compute"] * 0.05 * math.sqrt(2 * math.log(3500)))
    assert sm.step_time(w, steady, m, 3500, "ddp")["straggler"] == 0.0
    # Foreground save every 500 steps: state x seconds per byte, spread over 500 steps (plus the copy).
    write = 860e6 * 12 * PARAMS["checkpoint_s_per_byte"] / 500
    assert sm.engine_terms(w, steady, m, 1, "ddp")["checkpoint"] == pytest.approx(write + 860e6 * 12 / 20e9 / 500)


def test_missing_parameter_is_named():
    with pytest.raises(ValueError, match="plan_s_per_sample"):
        sm.Measured.from_json({k: v for k, v in PARAMS.items() if k != "plan_s_per_sample"})


def test_dry_run_prints_the_table_without_measuring(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(PARAMS))
    out = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--dry", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sm.prediction_table(sm.Measured.from_json(PARAMS), "ring") in out.stdout
    assert "N=3500" in out.stdout and "SD UNet LoRA r16" in out.stdout
    m = sm.Measured.from_json(PARAMS)
    for table in (sm.engine_table(m, "tree"), sm.fixed_batch_table(m), sm.checkpoint_table(m), sm.planning_table(m)):
        assert table in out.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gloo_alpha": 1e-4}))
    out = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--dry", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "missing key" in out.stderr and "bad.json" in out.stderr


@pytest.mark.multiprocess
def test_two_gloo_processes_measure_positive_parameters():
    """The bench's measuring half: 2 gloo processes, every collective, the DDP check (seconds)."""
    import scaling

    out = scaling.measure_collectives(repeats=2, sizes=[8, 4096, 65536])
    for kind in ("all_reduce", "all_gather"):
        alpha, beta = out["fits"][kind]
        assert alpha > 0 and beta > 0, (kind, alpha, beta)
        assert set(out["raw"][kind]) == {"8", "4096", "65536"}
    for key in ("ddp_step_s", "local_step_s", "grad_all_reduce_s"):
        assert out["raw"][key] > 0
