"""Distillation with teachers on Ray workers, on a two-node Ray cluster on this machine, equals
local distillation; teacher load failures and dead workers are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hookengine[scale]')")
pytestmark = pytest.mark.multiprocess

TEACHERS = {"wide": {"width": 4, "hidden": 48}, "deep": {"width": 4, "hidden": 24}}


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Two Ray nodes with one CPU each; this process is the driver."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local Ray
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two exported teachers (folders that model_loader loads) and one with its weights missing."""
    from safetensors.torch import save_file

    from hookengine.demo.digits import DigitsConvNet

    root = tmp_path_factory.mktemp("teachers")
    folders = {}
    for seed, (name, options) in enumerate(TEACHERS.items(), start=1):
        torch.manual_seed(seed)
        net = DigitsConvNet(**options)
        folder = root / name
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "hookengine_model.json").write_text(json.dumps(
            {"format": "torch", "weights": "model.safetensors", "class": "hookengine.demo.digits:DigitsConvNet",
             "options": options}))
        folders[name] = str(folder)
    broken = root / "broken"
    broken.mkdir()
    (broken / "hookengine_model.json").write_text((root / "wide" / "hookengine_model.json").read_text())
    folders["broken"] = str(broken)
    return folders


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand((8, 1, 8, 8), generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


def distill_engine(run_dir: Path, teachers: dict[str, str], steps: int, ray_options: dict[str, Any] | None) -> Any:
    """A distillation run from the two teachers: local (model_loader) or on Ray workers."""
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use_defaults({"trainer": {"max_steps": steps, "lr": 1e-2, "eval_every": 3}, "progress": {"enabled": False},
                         "logging": {"every": 1}})
    options: dict[str, Any] = {}
    if ray_options is None:
        engine.use("model_loader", models={name: teachers[name] for name in TEACHERS})
    else:
        options = {"teachers_on": "ray", "ray": ray_options}
    routine = engine.use(
        "distill", teachers={"wide": 0.7, "deep": {"schedule": "linear", "start": 1.0, "end": 0.2, "steps": steps}},
        model="hookengine.demo.digits:DigitsConvNet", model_options={"width": 4, "hidden": 16, "dropout": 0.0},
        temperature=2.0, hard_weight=0.1, features={"0": "0"}, feature_weight=0.5, **options,
    )
    engine.on("setup", lambda state: state.dataloaders.update(train=batches(4, seed=1), val=batches(2, seed=2)))
    return engine, routine


def run(engine: Any) -> tuple[list[float], list[dict[str, float]]]:
    losses: list[float] = []
    evaluations: list[dict[str, float]] = []
    engine.on("step_end", lambda state, loss: losses.append(float(loss)))
    engine.on("evaluate_end", lambda metrics: evaluations.append(dict(metrics)))
    engine.run()
    return losses, evaluations


def test_teachers_on_two_ray_nodes_give_the_local_distillation(tmp_path: Path, cluster: Any, teachers: dict[str, str]) -> None:
    steps = 6
    local, _ = distill_engine(tmp_path / "local", teachers, steps, None)
    local_losses, local_evals = run(local)
    remote, routine = distill_engine(tmp_path / "ray", teachers, steps,
                                     {"models": {name: teachers[name] for name in TEACHERS},
                                      "teachers_per_worker": 1, "num_cpus": 1, "timeout": 60})
    nodes: list[str] = []
    remote.on("step_end", lambda state, loss: nodes.extend(n["node_id"] for n in routine.remote.nodes) if not nodes else None)
    remote_losses, remote_evals = run(remote)

    assert len(local_losses) == steps
    torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses), rtol=1e-5, atol=1e-6)
    assert [sorted(e) for e in remote_evals] == [sorted(e) for e in local_evals] and len(local_evals) >= 2
    for got, want in zip(remote_evals, local_evals):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    student_local, student_ray = local.state.models["student"], remote.state.models["student"]
    for (key, want), got in zip(student_local.state_dict().items(), student_ray.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    assert local_losses[-1] < local_losses[0]  # the student learned something: the comparison is not of two idle runs
    # One teacher per node; the teacher work of each step was submitted before the step needed it.
    assert len(set(nodes)) == 2 and set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert routine.remote.stats["ahead"] == steps
    assert routine.remote.workers == []  # the workers were stopped at teardown


def test_a_teacher_that_fails_to_load_names_itself_and_the_node(tmp_path: Path, cluster: Any, teachers: dict[str, str]) -> None:
    from hookengine.scale.ray_teachers import RayTeacherError

    engine, _ = distill_engine(tmp_path, teachers, 2, {"models": {"wide": teachers["wide"], "deep": teachers["broken"]}})
    with pytest.raises(RayTeacherError) as caught:
        engine.run()
    message = str(caught.value)
    assert "\n" not in message
    assert "teacher 'deep' failed to load on Ray teacher worker 1 (node " in message
    assert "model.safetensors is missing" in message
    node_ids = {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]}
    assert any(f"id {node}" in message for node in node_ids), message


def test_a_dead_worker_stops_the_run_with_a_message(tmp_path: Path, cluster: Any, teachers: dict[str, str]) -> None:
    from hookengine.scale.ray_teachers import RayTeacherError

    engine, routine = distill_engine(tmp_path, teachers, 6, {"models": {name: teachers[name] for name in TEACHERS},
                                                               "timeout": 30})
    steps: list[int] = []

    def kill_at_step_2(state: Any, loss: Any) -> None:
        steps.append(state.clock.step)
        if state.clock.step == 2:
            worker = routine.remote.workers[1]
            ray.kill(worker, no_restart=True)
            while True:  # the kill is asynchronous: wait (by progress) until calls find the worker dead
                try:
                    ray.get(worker.node.remote(), timeout=30)
                except ray.exceptions.RayActorError:
                    break

    engine.on("step_end", kill_at_step_2)
    with pytest.raises(RayTeacherError, match=r"Ray teacher worker 1 \(teachers \['deep'\]; node [\d.]+, id \w{12}\) died"):
        engine.run()
    # The batch submitted ahead before the kill may have its answer already: at most one more step.
    assert steps in ([1, 2], [1, 2, 3])


def test_workers_the_cluster_cannot_place_fail_after_the_load_timeout(tmp_path: Path, cluster: Any,
                                                                       teachers: dict[str, str]) -> None:
    """Each node has one CPU: a worker asking for two never starts, and the run says so instead of waiting."""
    from hookengine.scale.ray_teachers import RayTeacherError

    engine, routine = distill_engine(tmp_path, teachers, 2, {"models": {name: teachers[name] for name in TEACHERS},
                                                               "num_cpus": 2, "load_timeout": 2})
    with pytest.raises(RayTeacherError, match=r"Ray teacher worker 0 \(teachers \['wide'\]\) did not start and load in 2 s "
                                              r"\(distill.ray.load_timeout\); does the cluster have 2 CPU\(s\)"):
        engine.run()
    assert routine.remote.workers == []
