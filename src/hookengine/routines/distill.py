"""Distillation from several teachers: logit (KL) and feature (MSE) losses, scheduled.

loss = Σ_k w_k(t) · T(t)² · KL(softmax(teacher_k / T) ‖ softmax(student / T))
     + feature_weight(t) · Σ_k w_k(t) · Σ_layers MSE(student feature, teacher_k feature)
     + hard_weight(t) · CE(student, targets)

with ``t = state.clock.step``. Teacher weights, the temperature and the other weights are
schedules (a number, a callable, ``module:attr`` or ``{"schedule": NAME, ...}``); they are
not normalised. Teachers run in eval mode without gradients; they come from
``state.models`` or, when a model cache holds them, through its ``acquire_model`` slot.

With ``teachers_on: ray`` the teachers live on Ray workers instead (see
:mod:`hookengine.scale.ray_teachers`): each worker loads a few of them from model loader
specs into its own model cache, the trainer sends each batch's inputs and gets their logits
(and features) back in order, and combines them exactly as above.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Literal

from ..core.hooks import HookError
from .base import Routine, built_by

__all__ = ["Distillation", "kd_loss"]


def kd_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over samples (and tokens)."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def _logits(output: Any) -> Any:
    """The logits of a model output: a tensor, an output object with ``.logits``, or a tuple's first item."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class Distillation(Routine):
    """Train ``student`` to match several teachers (logits and, optionally, features).

    Metrics: ``distill_kl``, ``distill_temperature``; when batches have labels, the
    student's ``accuracy`` (argmax against the labels, -100 ignored); for each teacher
    with a non-zero weight, ``agreement/TEACHER`` (the fraction of argmaxes the student
    shares with it). Evaluation reports them as ``val_loss``, ``val_kl``, ``val_accuracy``,
    ``val_agreement/TEACHER``.

    Args:
        student: the student's name in ``state.models``.
        teachers: teacher names (weight 1 each) or name -> weight schedule.
        model, model_options: ``module:attr`` factory of the student when it is not in
            ``state.models`` yet.
        temperature: the softmax temperature (a schedule).
        logit_weight: weight of the summed KL terms (a schedule).
        features: student module path -> teacher module path whose outputs are matched
            with MSE (the same path in every teacher).
        feature_weight: weight of the feature terms (a schedule).
        hard_weight: weight of the cross entropy against the batch's targets (a schedule).
        inputs, targets: keys (dict batches) or positions (tuple batches) of the model
            input and of the labels (``None``, or a batch without that key: no labels).
            ``inputs=None`` passes a dict batch, less its targets, as keyword arguments.
        teachers_on: where the teachers run: ``local`` (``state.models`` or a model cache
            in this process) or ``ray`` (Ray workers, configured by ``ray``).
        ray: with ``teachers_on: ray``: ``models`` (teacher name -> model loader spec: a
            folder, file or hub id, or a mapping of spec fields; local paths must exist on
            every node), ``address`` (the cluster; none: the Ray already started here, else a
            local one), ``teachers_per_worker`` (1), ``num_cpus`` (1) and ``num_gpus`` (0) per
            worker, ``device`` (default ``cuda`` with GPUs, else ``cpu``), ``spread`` (true:
            workers on different nodes where possible), ``lookahead`` (1: the next batch's
            teacher work is submitted before the current step; batches are read that far
            ahead), ``timeout`` (120: seconds one batch's outputs may take before the run
            stops), ``load_timeout`` (600), ``cache`` (each worker's model cache options).
    """

    name = "distill"

    def __init__(
        self,
        teachers: list[str] | dict[str, Any],
        student: str = "student",
        model: str | None = None,
        model_options: dict[str, Any] | None = None,
        temperature: Any = 1.0,
        logit_weight: Any = 1.0,
        features: dict[str, str] | None = None,
        feature_weight: Any = 1.0,
        hard_weight: Any = 0.0,
        inputs: str | int | None = 0,
        targets: str | int | None = 1,
        teachers_on: Literal["local", "ray"] = "local",
        ray: dict[str, Any] | None = None,
    ) -> None:
        from ..sched.optim import value_schedule

        if not teachers:
            raise ValueError("distill.teachers: name at least one teacher")
        weights = teachers if isinstance(teachers, dict) else {name: 1.0 for name in teachers}
        self.teacher_weights = {n: value_schedule(w, f"distill.teachers.{n}") for n, w in weights.items()}
        self.student_name = student
        self.model_ref, self.model_options = model, dict(model_options or {})
        self.temperature = value_schedule(temperature, "distill.temperature")
        self.logit_weight = value_schedule(logit_weight, "distill.logit_weight")
        self.features = dict(features or {})
        self.feature_weight = value_schedule(feature_weight, "distill.feature_weight")
        self.hard_weight = value_schedule(hard_weight, "distill.hard_weight")
        self.inputs, self.targets = inputs, targets
        self._captured: dict[str, dict[str, Any]] = {}  # model name -> module path -> output
        self._handles: dict[str, list[Any]] = {}  # model name -> its feature hooks (ModuleHandle)
        self._cached_objects: dict[str, Any] = {}  # cached teacher name -> weakref to the object hooked
        if teachers_on not in ("local", "ray"):
            raise ValueError(f"distill.teachers_on must be 'local' or 'ray', got {teachers_on!r}")
        if ray is not None and teachers_on != "ray":
            raise ValueError("distill.ray is set but distill.teachers_on is 'local'; set teachers_on: ray")
        self.remote: Any = None  # RayTeachers with teachers_on: ray
        if teachers_on == "ray":
            self.remote = _ray_teachers(list(self.teacher_weights), list(self.features.values()), ray or {})

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        if self.remote is not None:
            engine.attach("epoch_batches", self._epoch_batches)
            engine.on("teardown", lambda: self.remote.close())

    def _epoch_batches(self, next_impl: Any, loader: Any, epoch: int, start_batch: int) -> Any:
        batches = next_impl(loader, epoch, start_batch)
        return self.remote.lookahead(batches, self._host_inputs) if self.active() else batches

    # ------------------------------------------------------------------- build
    def build(self, state: Any) -> None:
        from ..core.plugins import resolve

        self.device = self.engine.runtime.device
        if self.student_name not in state.models:
            if self.model_ref is None:
                raise ValueError(f"distill: no student {self.student_name!r} in state.models; give model= (a module:attr factory)")
            factory = resolve(self.model_ref, "model", "distill.model")
            state.models[self.student_name] = built_by(factory(**self.model_options), self.model_ref, self.model_options)
        if self.remote is not None:
            self.remote.start()
        for name in self.teacher_weights if self.remote is None else ():
            teacher = self._teacher_object(name)
            teacher.requires_grad_(False)  # never in the optimizer, never a graph
            if self._cached(name) is None:
                self._hook_features(name, list(self.features.values()))
        self._hook_features(self.student_name, list(self.features))

    def _cached(self, name: str) -> Any:
        """The teacher a model cache holds (through its ``cached_model`` slot), or ``None``."""
        if not self.engine.has("cached_model"):
            return None
        try:
            return self.engine.call("cached_model", name)
        except HookError:  # no cache holds it: the chain ran past every implementation
            return None

    def _teacher_object(self, name: str) -> Any:
        cached = self._cached(name)
        if cached is not None:
            return cached
        if name in self.engine.state.models:
            return self.engine.runtime.unwrap(self.engine.state.models[name])
        where = " or in a model cache" if self.engine.has("cached_model") else ""
        raise KeyError(f"distill: no teacher {name!r} in state.models{where}; models: {sorted(self.engine.state.models)}")

    @contextlib.contextmanager
    def teacher(self, name: str) -> Iterator[Any]:
        """The teacher ready to run: on the device (through the cache when it holds it), in eval mode."""
        if self._cached(name) is not None:
            with self.engine.call("acquire_model", name, str(self.device)) as model:
                self._hook_cached_features(name, model)
                yield self._ready(model)
        else:
            yield self._ready(self._teacher_object(name))

    @staticmethod
    def _ready(model: Any) -> Any:
        if model.training:  # the loop puts every registered model in train mode
            model.eval()
        return model

    # --------------------------------------------------------------- features
    def _hook_features(self, name: str, paths: list[str]) -> None:
        """Keep the outputs of the named submodules of model ``name`` on each forward.

        These are module hooks by model name: listed by ``describe_hooks``, removed by
        :meth:`detach_features`, and moved along when the model is re-wrapped or gets adapters.
        """
        if not paths or name in self._handles:
            return
        store = self._captured.setdefault(name, {})
        self._handles[name] = self._add_hooks(
            lambda path: self.engine.module_hooks.add(path, _capture(store, path), model=name, plugin=self._plugin),
            paths,
        )

    def _hook_cached_features(self, name: str, model: Any) -> None:
        """Hook a teacher that only the model cache holds, through the module object it hands out."""
        if not self.features or self._cached_objects.get(name, lambda: None)() is model:
            return
        for handle in self._handles.pop(name, []):  # the cache handed out another object
            handle.detach()
        store = self._captured.setdefault(name, {})
        self._handles[name] = self._add_hooks(
            lambda path: self.engine.module_hooks.add_to(
                model, path, _capture(store, path), plugin=self._plugin, label=name
            ),
            list(self.features.values()),
        )
        self._cached_objects[name] = weakref.ref(model)

    @staticmethod
    def _add_hooks(add: Callable[[str], Any], paths: list[str]) -> list[Any]:
        handles: list[Any] = []
        try:
            for path in paths:
                handles.append(add(path))
        except ValueError as exc:
            for handle in handles:
                handle.detach()
            raise ValueError(f"distill.features: {exc}") from None
        return handles

    def detach_features(self) -> None:
        """Remove every feature hook this routine installed."""
        for handles in self._handles.values():
            for handle in handles:
                handle.detach()
        self._handles.clear()
        self._cached_objects.clear()

    @property
    def _plugin(self) -> str:
        return getattr(self, "plugin_name", self.name)  # the name the hooks are listed under

    def _features_of(self, name: str) -> dict[str, Any]:
        return self._captured.get(name, {})

    # -------------------------------------------------------------------- loss
    def _host_inputs(self, batch: Any) -> Any:
        """The batch's model inputs as they are sent to Ray workers (on the CPU)."""
        if self.inputs is None:
            return {k: v.cpu() for k, v in batch.items() if k != self.targets}
        return batch[self.inputs].cpu()

    def _split(self, batch: Any) -> tuple[Any, Any]:
        targets = None if self.targets is None or not _has(batch, self.targets) else batch[self.targets]
        if self.inputs is None:
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != self.targets}
        else:
            inputs = batch[self.inputs].to(self.device)
        return inputs, targets.to(self.device) if targets is not None else None

    @staticmethod
    def _run(model: Any, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    def loss(self, batch: Any) -> Any:
        terms = self.losses(batch)
        metrics = self.engine.state.metrics
        metrics["distill_kl"] = terms["kl"].detach()
        metrics["distill_temperature"] = float(self.temperature(self.engine.state.clock.step))
        for key, value in terms.items():  # tensors: read only when the metrics are logged
            if key == "accuracy" or key.startswith("agreement/"):
                metrics[key] = value
        return terms["loss"]

    def losses(self, batch: Any) -> dict[str, Any]:
        """Every term of the loss of one batch, their weighted sum as ``loss``, and (without
        gradients) the student's ``accuracy`` when the batch has labels and its argmax
        ``agreement/TEACHER`` with each teacher."""
        import torch

        step = self.engine.state.clock.step
        temperature = float(self.temperature(step))
        inputs, targets = self._split(batch)
        pending = None if self.remote is None else self.remote.pending_for(batch, self._host_inputs(batch))
        student = self.engine.state.models[self.student_name]
        student_logits = _logits(self._run(student, inputs))
        student_features = dict(self._features_of(self.student_name))
        kl = student_logits.new_zeros((), dtype=torch.float32)
        agreement: dict[str, Any] = {}
        feature = student_logits.new_zeros((), dtype=torch.float32)
        remote = None if pending is None else self.remote.gather(pending)
        for name, weight_of in self.teacher_weights.items():
            weight = float(weight_of(step))
            if weight == 0.0:
                continue
            if remote is None:
                teacher_logits, teacher_features = self._teacher_outputs(name, inputs)
            else:
                teacher_logits, teacher_features = _on_device(remote[name], self.device)
            self._check_shape(name, "logits", student_logits, teacher_logits)
            kl = kl + weight * kd_loss(student_logits, teacher_logits, temperature)
            feature = feature + weight * self._feature_loss(name, student_features, teacher_features)
            agreement[f"agreement/{name}"] = _agreement(student_logits, teacher_logits)
        terms = {"kl": kl, "feature": feature}
        loss = float(self.logit_weight(step)) * kl
        if self.features:
            loss = loss + float(self.feature_weight(step)) * feature
        hard_weight = float(self.hard_weight(step))
        if hard_weight:
            if targets is None:
                raise ValueError("distill.hard_weight is not 0 but batches have no targets (distill.targets is None)")
            terms["hard"] = self._hard_loss(student_logits, targets)
            loss = loss + hard_weight * terms["hard"]
        terms["loss"] = loss
        accuracy = _accuracy(student_logits, targets)
        if accuracy is not None:
            terms["accuracy"] = accuracy
        terms.update(agreement)
        return terms

    def _teacher_outputs(self, name: str, inputs: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        with self.teacher(name) as teacher, torch.no_grad():
            logits = _logits(self._run(teacher, inputs))
            features = dict(self._features_of(name))
        return logits, features

    def _feature_loss(self, name: str, student: dict[str, Any], teacher: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        total = 0.0
        for student_path, teacher_path in self.features.items():
            s, t = student[student_path], teacher[teacher_path]
            self._check_shape(name, f"feature {teacher_path!r} (student {student_path!r})", s, t)
            total = total + F.mse_loss(s.float(), t.float())
        return total

    def _check_shape(self, teacher: str, what: str, student: Any, output: Any) -> None:
        if tuple(student.shape) != tuple(output.shape):
            raise ValueError(
                f"distill: teacher {teacher!r} gives {what} of shape {tuple(output.shape)}, but the student "
                f"{self.student_name!r} gives {tuple(student.shape)}; teachers must match the student's output shape"
            )

    @staticmethod
    def _hard_loss(logits: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def metrics(self, batch: Any) -> dict[str, float]:
        terms = self.losses(batch)
        out = {"val_loss": float(terms["loss"]), "val_kl": float(terms["kl"])}
        if "hard" in terms:
            out["val_hard"] = float(terms["hard"])
        for key, value in terms.items():
            if key == "accuracy" or key.startswith("agreement/"):
                out[f"val_{key}"] = float(value)
        return out


def _has(batch: Any, key: str | int) -> bool:
    """Whether a dict batch has ``key`` / a tuple batch has position ``key`` (labels are optional)."""
    if isinstance(batch, dict):
        return key in batch
    return isinstance(key, int) and isinstance(batch, (tuple, list)) and -len(batch) <= key < len(batch)


def _accuracy(logits: Any, targets: Any) -> Any:
    """The fraction of labelled positions (target != -100) where the argmax is the target, as
    a 0-d tensor (no host sync); ``None`` without labels or when they do not fit the logits."""
    import torch

    if targets is None or targets.is_floating_point() or targets.numel() * logits.shape[-1] != logits.numel():
        return None
    with torch.no_grad():
        predicted = logits.detach().reshape(-1, logits.shape[-1]).argmax(dim=-1)
        targets = targets.reshape(-1)
        labelled = targets != -100
        correct = (predicted == targets) & labelled
        return correct.sum().float() / labelled.sum().clamp(min=1)


def _agreement(student_logits: Any, teacher_logits: Any) -> Any:
    """The fraction of positions where student and teacher have the same argmax (0-d tensor)."""
    import torch

    with torch.no_grad():
        return (student_logits.detach().argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean()


def _capture(store: dict[str, Any], path: str) -> Callable[..., None]:
    def hook(module: Any, args: Any, output: Any) -> None:
        store[path] = _logits(output) if not hasattr(output, "shape") else output

    return hook


def _on_device(outputs: tuple[Any, dict[str, Any]], device: Any) -> tuple[Any, dict[str, Any]]:
    logits, features = outputs
    return logits.to(device), {path: value.to(device) for path, value in features.items()}


def _ray_teachers(teachers: list[str], features: list[str], options: dict[str, Any]) -> Any:
    """The :class:`~hookengine.scale.ray_teachers.RayTeachers` of ``distill.ray`` (not started yet)."""
    import inspect

    from ..scale.ray_teachers import RayTeachers

    if not isinstance(options, dict):
        raise ValueError(f"distill.ray must be a mapping of options, got {type(options).__name__}")
    known = [p for p in inspect.signature(RayTeachers).parameters if p not in ("teachers", "features")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"distill.ray: unknown key(s) {unknown}; known: {known}")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("distill.teachers_on: ray needs Ray: pip install 'hookengine[scale]'") from None
    return RayTeachers(teachers, features=features, **{"models": {}, **options})
