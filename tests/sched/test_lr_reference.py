"""Every schedule name against the installed library, at every step from 0 to T+20.

The reference is the library's own scheduler driven through a real optimizer, step by
step; ours is evaluated at the step (never stepped). Values must agree to 1e-12
(relative); the closed forms and replays are in fact bitwise equal.
"""

from __future__ import annotations

import math

import pytest
import torch

from hookengine.sched.lr_schedules import (
    DIFFUSERS_NAMES,
    TORCH_NAMES,
    TRANSFORMERS_NAMES,
    all_names,
    make_schedule,
)

T, W, LR = 50, 5, 0.1
STEPS = T + 21  # 0 .. T+20


def reference(make, lr=LR, optimizer="SGD", metrics=None, **opt_kwargs):
    """lr (and momentum) used by the k-th update of a real optimizer, k = 0 .. STEPS-1."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = getattr(torch.optim, optimizer)([param], lr=lr, **opt_kwargs)
    sched = make(opt)
    lrs, momenta = [], []
    for k in range(STEPS):
        group = opt.param_groups[0]
        lrs.append(float(group["lr"]))
        momenta.append(group.get("momentum", group.get("betas", (None,))[0]))
        param.grad = torch.ones_like(param)
        opt.step()
        if metrics is not None:
            sched.step(metrics[k])
        else:
            sched.step()
    return lrs, momenta


def ours(name, lr=LR, warmup=0, total=T, options=None, hyper=None, metrics=None):
    schedule = make_schedule(name, base_lr=lr, warmup_steps=warmup, total_steps=total, options=options, hyper=hyper)
    lrs, extras = [], []
    for k in range(STEPS):
        lrs.append(schedule.lr(k, lr))
        extras.append(schedule.extras(k))
        if metrics is not None:
            schedule.observe(metrics[k])
    return lrs, extras


def assert_close(expected, actual, what):
    assert len(expected) == len(actual)
    for k, (e, a) in enumerate(zip(expected, actual)):
        assert math.isclose(e, a, rel_tol=1e-12, abs_tol=1e-300), f"{what}: step {k}: reference {e!r}, ours {a!r}"


TRANSFORMERS_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-3, "num_cycles": 0.7}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-3, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 10, "num_stable_steps": 20}),
    *[
        ("warmup_stable_decay", {"num_decay_steps": 12, "warmup_type": wt, "decay_type": dt, "min_lr_ratio": 0.1})
        for wt in ("linear", "cosine", "1-sqrt")
        for dt in ("linear", "cosine", "1-sqrt")
    ],
]


@pytest.mark.parametrize("name,options", TRANSFORMERS_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("warmup", [0, W])
def test_transformers_get_scheduler(name, options, warmup):
    from transformers import get_scheduler

    kwargs = dict(num_warmup_steps=warmup, num_training_steps=T, scheduler_specific_kwargs=dict(options))
    if name == "constant":
        kwargs = {}
    expected, _ = reference(lambda opt: get_scheduler(name, opt, **kwargs))
    actual, _ = ours(name, warmup=0 if name == "constant" else warmup, options=options)
    assert_close(expected, actual, f"transformers {name} {options}")
    assert expected == actual  # bitwise: the same float operations


DIFFUSERS_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 2}),
    ("polynomial", {"power": 2.0}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("piecewise_constant", {"step_rules": "1:10,0.1:20,0.01:30,0.005"}),
]


@pytest.mark.parametrize("name,options", DIFFUSERS_CASES, ids=lambda v: str(v))
def test_diffusers_get_scheduler(name, options):
    from diffusers.optimization import get_scheduler

    kwargs = dict(num_warmup_steps=W, num_training_steps=T)
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = options["num_cycles"]
    if name == "polynomial":
        kwargs["power"] = options["power"]
    if name == "piecewise_constant":
        kwargs = {"step_rules": options["step_rules"]}
    warmup = W if name not in ("constant", "piecewise_constant") else 0
    expected, _ = reference(lambda opt: get_scheduler(name, opt, **kwargs))
    actual, _ = ours(name, warmup=warmup, options=options)
    assert_close(expected, actual, f"diffusers {name}")


def test_piecewise_constant_list_form_equals_string_form():
    a, _ = ours("piecewise_constant", options={"step_rules": "1:10,0.1:20,0.005"})
    b, _ = ours("piecewise_constant", options={"step_rules": [[1, 10], [0.1, 20], 0.005]})
    assert a == b


def _halve_every_ten(step):
    return 0.5 ** (step // 10)


def _shrink(step):
    return 0.97


TORCH_CASES = [
    ("StepLR", {"step_size": 7, "gamma": 0.5}, {}),
    ("MultiStepLR", {"milestones": [5, 20, 40], "gamma": 0.3}, {}),
    ("ConstantLR", {"factor": 0.25, "total_iters": 9}, {}),
    ("LinearLR", {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 13}, {}),
    ("ExponentialLR", {"gamma": 0.93}, {}),
    ("CosineAnnealingLR", {"T_max": T, "eta_min": 1e-3}, {}),
    ("PolynomialLR", {"total_iters": 30, "power": 2.0}, {}),
    ("CosineAnnealingWarmRestarts", {"T_0": 7, "T_mult": 2, "eta_min": 1e-4}, {}),
    ("LambdaLR", {"lr_lambda": _halve_every_ten}, {}),
    ("MultiplicativeLR", {"lr_lambda": _shrink}, {}),
    ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 6, "mode": "triangular2"}, {"momentum": 0.9}),
    ("OneCycleLR", {"max_lr": 0.3, "total_steps": STEPS + 1}, {"momentum": 0.9}),
    ("OneCycleLR", {"max_lr": 0.3, "total_steps": STEPS + 1, "three_phase": True, "anneal_strategy": "linear"}, {"momentum": 0.9}),
]


@pytest.mark.parametrize("name,options,hyper", TORCH_CASES, ids=lambda v: str(v)[:40])
def test_torch_scheduler_classes(name, options, hyper):
    import torch.optim.lr_scheduler as L

    expected, momenta = reference(lambda opt: getattr(L, name)(opt, **options), **hyper)
    actual, extras = ours(name, options=options, hyper=hyper)
    assert_close(expected, actual, f"torch {name}")
    assert expected == actual
    if name in ("CyclicLR", "OneCycleLR"):
        assert [e["momentum"] for e in extras] == momenta


def test_torch_cyclers_drive_adam_betas():
    import torch.optim.lr_scheduler as L

    options = {"max_lr": 0.3, "total_steps": STEPS + 1}
    expected, beta1 = reference(lambda opt: L.OneCycleLR(opt, **options), optimizer="Adam", betas=(0.9, 0.99))
    actual, extras = ours("OneCycleLR", options=options, hyper={"betas": (0.9, 0.99)})
    assert expected == actual
    assert [e["betas"][0] for e in extras] == beta1


def test_torch_sequential_and_chained():
    import torch.optim.lr_scheduler as L

    seq = {
        "schedulers": [
            {"name": "LinearLR", "start_factor": 0.1, "total_iters": W},
            {"name": "CosineAnnealingLR", "T_max": T - W},
        ],
        "milestones": [W],
    }

    def torch_seq(opt):
        return L.SequentialLR(
            opt, [L.LinearLR(opt, start_factor=0.1, total_iters=W), L.CosineAnnealingLR(opt, T_max=T - W)], milestones=[W]
        )

    expected, _ = reference(torch_seq)
    actual, _ = ours("SequentialLR", options=seq)
    assert_close(expected, actual, "SequentialLR")

    chained = {"schedulers": [{"name": "ConstantLR", "factor": 0.1, "total_iters": 4}, {"name": "ExponentialLR", "gamma": 0.9}]}
    expected, _ = reference(
        lambda opt: L.ChainedScheduler([L.ConstantLR(opt, factor=0.1, total_iters=4), L.ExponentialLR(opt, gamma=0.9)], optimizer=opt)
    )
    actual, _ = ours("ChainedScheduler", options=chained)
    assert_close(expected, actual, "ChainedScheduler")


def test_replay_is_a_pure_function_of_the_step():
    """Asking for an earlier step (a resume) rebuilds and replays: same values."""
    schedule = make_schedule("CosineAnnealingWarmRestarts", base_lr=LR, options={"T_0": 5, "T_mult": 2})
    forward = [schedule.lr(k, LR) for k in range(40)]
    backward = [schedule.lr(k, LR) for k in reversed(range(40))][::-1]
    fresh = make_schedule("CosineAnnealingWarmRestarts", base_lr=LR, options={"T_0": 5, "T_mult": 2})
    assert forward == backward == [fresh.lr(k, LR) for k in range(40)]


METRICS = [1.0, 0.9, 0.95, 0.95, 0.96, 0.97, 0.97, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85] * 6


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "ReduceLROnPlateau"])
def test_reduce_on_plateau(name):
    from transformers import get_scheduler

    options = {"patience": 2, "factor": 0.5, "cooldown": 1}
    expected, _ = reference(
        lambda opt: get_scheduler("reduce_lr_on_plateau", opt, scheduler_specific_kwargs=options), metrics=METRICS
    )
    actual, _ = ours(name, options=options, metrics=METRICS)
    assert expected == actual
    assert min(actual) < LR  # the metric plateaus, so the lr did drop


def test_greedy():
    from transformers import get_scheduler

    options = {"patience": 1, "factor": 0.8, "min_lr": 1e-3, "max_lr": 0.5}
    expected, _ = reference(lambda opt: get_scheduler("greedy", opt, scheduler_specific_kwargs=options), metrics=METRICS)
    actual, _ = ours("greedy", options=options, metrics=METRICS)
    assert expected == actual
    assert len(set(actual)) > 2


def test_metric_schedule_state_round_trip():
    a = make_schedule("ReduceLROnPlateau", base_lr=LR, options={"patience": 1})
    for m in METRICS[:9]:
        a.observe(m)
    b = make_schedule("ReduceLROnPlateau", base_lr=LR, options={"patience": 1})
    b.load_state_dict(a.state_dict())
    for m in METRICS[9:30]:
        a.observe(m)
        b.observe(m)
        assert a.lr(0, LR) == b.lr(0, LR)


@pytest.mark.parametrize("t_mult", [1, 2, 3])
def test_cosine_cycles_equals_torch_warm_restarts(t_mult):
    """timm-style cycles with cycle_mul = T_mult and no limit are torch's SGDR."""
    import torch.optim.lr_scheduler as L

    eta_min = 1e-3
    expected, _ = reference(lambda opt: L.CosineAnnealingWarmRestarts(opt, T_0=6, T_mult=t_mult, eta_min=eta_min))
    actual, _ = ours("cosine_cycles", options={"cycle_steps": 6, "cycle_mul": t_mult, "cycle_limit": None, "min_lr": eta_min})
    assert_close(expected, actual, f"cosine_cycles T_mult={t_mult}")


def test_cosine_cycles_decay_limit_and_k_decay():
    """Peaks shrink by cycle_decay, the run ends at the minimum after cycle_limit cycles,
    and k-decay follows cos(pi * t**k / T**k) (arXiv:2004.05909)."""
    opts = {"cycle_steps": 10, "cycle_decay": 0.5, "cycle_limit": 3, "min_lr_ratio": 0.01}
    actual, _ = ours("cosine_cycles", options=opts)
    assert [actual[i] for i in (0, 10, 20)] == pytest.approx([LR, LR * 0.5, LR * 0.25])
    assert all(v == pytest.approx(LR * 0.01) for v in actual[30:])
    k = 2.0
    actual, _ = ours("cosine_cycles", options={"cycle_steps": T, "k_decay": k})
    for t in range(T):
        assert actual[t] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * t**k / T**k)), rel=1e-12)
    warm, _ = ours("cosine_cycles", warmup=W, options={"cycle_steps": T, "warmup_init_ratio": 0.1})
    assert warm[0] == pytest.approx(0.1 * LR) and warm[W - 1] < LR


def test_every_library_name_is_covered():
    """The name lists follow the installed libraries: a new name fails this test."""
    from diffusers.optimization import SchedulerType as DiffusersType
    from transformers.trainer_utils import SchedulerType as TransformersType
    import torch.optim.lr_scheduler as L

    assert {t.value for t in TransformersType} <= set(all_names())
    assert {t.value for t in DiffusersType} <= set(all_names())
    torch_classes = {n for n in L.__all__ if n.endswith("LR") or n in ("ChainedScheduler", "CosineAnnealingWarmRestarts", "ReduceLROnPlateau")}
    torch_classes -= {"LRScheduler"}
    assert torch_classes <= set(TORCH_NAMES)
    tested = {c[0] for c in TRANSFORMERS_CASES} | {"reduce_lr_on_plateau", "greedy"}
    assert set(TRANSFORMERS_NAMES) <= tested
    assert set(DIFFUSERS_NAMES) <= {c[0] for c in DIFFUSERS_CASES}


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="did you mean 'cosine_with_restarts'"):
        make_schedule("cosine_with_restart", base_lr=LR, total_steps=T)
    with pytest.raises(ValueError, match="did you mean 'num_cycles'"):
        make_schedule("cosine", base_lr=LR, total_steps=T, options={"num_cycle": 2})
    with pytest.raises(ValueError, match="did you mean 'gamma'"):
        make_schedule("ExponentialLR", base_lr=LR, options={"gama": 0.9})
