"""Fan many-model work out over a Ray cluster and gather the results into the run.

Distillation targets from many teachers, or the evaluation of many checkpoints, are
independent jobs: each is a ``module:attr`` function applied to one item. The plugin
attaches the slot ``fan_out(function, items, **kwargs) -> list``; with ``backend: ray``
the jobs run as Ray tasks (``ray.init(address=...)`` joins a cluster, no address starts
a local one), with ``backend: local`` they run one after another in this process, which
is also the reference the Ray results are tested against.

Jobs here load their model each time. Distillation during training, where every step needs
the teachers' outputs for its batch, keeps the teachers loaded on Ray workers instead:
``distill``'s ``teachers_on: ray`` (:mod:`hookengine.scale.ray_teachers`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from ..core.plugins import resolve

__all__ = ["RayFanout", "fan_out_local", "teacher_logits"]


def _call(reference: str, item: Any, kwargs: dict[str, Any]) -> Any:
    # Runs inside a Ray worker: the function is found by reference, never pickled code.
    return resolve(reference)(item, **kwargs)


def fan_out_local(reference: str, items: Sequence[Any], **kwargs: Any) -> list[Any]:
    """Apply ``reference`` to every item here, in order."""
    return [_call(reference, item, kwargs) for item in items]


class RayFanout:
    """Run independent jobs over Ray and gather their results, in item order.

    Args:
        backend: ``ray`` or ``local``.
        address: a Ray cluster address; ``None`` starts a local cluster.
        num_cpus: CPUs of a local cluster (``None``: all).
        cpus_per_job: CPUs Ray reserves for each job.
        shutdown_at_end: shut Ray down at ``teardown`` if this plugin started it.
    """

    name = "fan_out"

    def __init__(
        self,
        backend: Literal["ray", "local"] = "ray",
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_job: float = 1.0,
        shutdown_at_end: bool = True,
    ) -> None:
        self.backend = backend
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_job = cpus_per_job
        self.shutdown_at_end = shutdown_at_end
        self._started_ray = False

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("fan_out", self._fan_out)
        engine.on("teardown", self._teardown)

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=self.num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self._started_ray = True
        return ray

    def _fan_out(self, next_impl: Callable[..., Any], function: str, items: Sequence[Any], **kwargs: Any) -> list[Any]:
        if not isinstance(function, str) or ":" not in function:
            raise ValueError(f"fan_out: give the function as 'module:attr', got {function!r}")
        resolve(function)  # fail here, with a clear message, rather than in a worker
        if self.backend == "local":
            return fan_out_local(function, items, **kwargs)
        ray = self._ray()
        job = ray.remote(num_cpus=self.cpus_per_job)(_call)
        results = ray.get([job.remote(function, item, kwargs) for item in items])
        self.engine.fire("fan_out_done", function=function, count=len(results))
        return results

    def _teardown(self, state: Any) -> None:
        if self._started_ray and self.shutdown_at_end:
            import ray

            ray.shutdown()
            self._started_ray = False


# ------------------------------------------------------------------ prepared jobs
def teacher_logits(teacher: dict[str, Any], inputs: Any) -> Any:
    """Logits of one teacher (``{"model": "module:attr", "options": {...}, "seed": n}``)."""
    import torch

    torch.manual_seed(teacher.get("seed", 0))
    net = resolve(teacher["model"], "model", "teacher.model")(**teacher.get("options", {}))
    net.eval()
    with torch.no_grad():
        return net(inputs)
