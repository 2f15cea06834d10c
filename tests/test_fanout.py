"""Many-model work over a local Ray cluster equals the same work done here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hookengine import Engine

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_checkpoints_evaluated_over_ray_equal_local_evaluation(tmp_path: Path, ray_cluster) -> None:
    engine = Engine(seed=0, run_dir=tmp_path)
    engine.use("digits", batch_size=32)
    engine.use("supervised", model="hookengine.demo.digits:DigitsConvNet")
    engine.use_defaults({"trainer": {"max_steps": 30}, "checkpoint": {"every": 10, "keep_last": 0},
                         "progress": {"enabled": False}})
    fan = engine.use("hookengine.scale.fanout:RayFanout", num_cpus=2)
    engine.run()
    paths = [str(p) for p in sorted((tmp_path / "checkpoints").glob("step-*"))]
    assert len(paths) == 3
    job = "hookengine.demo.digits:evaluate_checkpoint"
    options = {"model": "hookengine.demo.digits:DigitsConvNet"}
    remote = engine.call("fan_out", job, paths, **options)
    fan.backend = "local"
    local = engine.call("fan_out", job, paths, **options)
    assert remote == local
    assert [r["step"] for r in remote] == [10, 20, 30]
    assert remote[-1]["val_accuracy"] > remote[0]["val_accuracy"]


def test_teacher_outputs_from_ray_feed_a_distillation_loss(ray_cluster) -> None:
    engine = Engine(seed=0)
    engine.use("hookengine.scale.fanout:RayFanout")
    teachers = [{"model": "hookengine.demo.digits:DigitsConvNet", "seed": s} for s in (1, 2, 3)]
    inputs = torch.rand(8, 1, 8, 8)
    outputs = engine.call("fan_out", "hookengine.scale.fanout:teacher_logits", teachers, inputs=inputs)
    from hookengine.scale.fanout import teacher_logits

    for teacher, got in zip(teachers, outputs):
        assert torch.equal(got, teacher_logits(teacher, inputs))
    assert not torch.equal(outputs[0], outputs[1])  # different teachers, different targets
    target = torch.stack(outputs).softmax(-1).mean(0)  # gathered into one distillation target
    assert torch.allclose(target.sum(-1), torch.ones(8))


def test_fan_out_names_a_bad_function(ray_cluster) -> None:
    engine = Engine()
    engine.use("hookengine.scale.fanout:RayFanout")
    with pytest.raises(ValueError, match="module:attr"):
        engine.call("fan_out", lambda x: x, [1])
    from hookengine import PluginError

    with pytest.raises(PluginError, match="no attribute 'nope'"):
        engine.call("fan_out", "hookengine.scale.fanout:nope", [1])
