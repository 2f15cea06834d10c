"""The declared hook points: one table for the core and every prepared plugin.

Like pluggy's hookspecs or Ignite's ``Events``, a point must be declared before anything
listens to it or implements it, so a typo (``"step_ned"``) fails at attach time with the
closest names instead of never firing. The table is also the documentation:
``hookengine hooks`` and ``docs/HOOKS.md`` are generated from it.

A plugin declares its own points with ``engine.declare(...)`` or a class attribute
``hook_points = [Point(...), ...]`` (declared by ``engine.use`` before its setup runs).

The training loop, in the order its events fire (slots in brackets)::

    setup                                  # plugins build models and data
    [prepare]                              # build the optimizer, place/wrap the models
    resume                                 # the checkpoint plugin loads here
    for phase in state.plan.phases:
        phase_start(phase)
        for epoch:
            epoch_start
            for batch in [epoch_batches](loader, epoch, start):
                batch_start(batch)         # state.control.skip_step() skips it
                [train_step](batch):
                    loss = [compute_loss](batch)
                    [backward](loss); after_backward(loss)
                    at an accumulation boundary:
                        before_optimizer_step; [optimizer_step]; clock.step += 1
                batch_end(loss)
                step_end(loss)             # after an optimizer step
                    ([evaluate] -> evaluate_end(metrics), [save_checkpoint] -> checkpoint_saved(path))
            epoch_end
        phase_end(phase)
    run_end
    teardown                               # always; exception(error) first on failure
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Point", "POINTS", "BANDS", "BASE_PRIORITY", "band_priority"]

# Priority of built-in base implementations of slots: innermost in every chain, so a
# plugin's implementation wraps them whenever it is attached.
BASE_PRIORITY = -1000


@dataclass(frozen=True)
class Point:
    """A declared hook point.

    Args:
        name: the point's name, as given to ``on``/``fire`` or ``attach``/``call``.
        kind: ``"event"`` (every listener runs) or ``"slot"`` (a wrapping chain).
        payload: for an event, the keyword arguments ``fire`` passes (listeners may ask for
            any of them by name, or for ``state``); for a slot, its arguments (docs only).
        doc: one line on when it fires or what it does.
        owner: who fires or calls it (``core``, ``trainer``, a plugin's name).
        unit: what the ``every``/``start``/``stop`` filters count: ``"step"`` (optimizer
            steps) or ``"epoch"``.
    """

    name: str
    kind: Literal["event", "slot"]
    payload: tuple[str, ...] = ()
    doc: str = ""
    owner: str = "core"
    unit: Literal["step", "epoch"] = "step"


def _event(name: str, payload: tuple[str, ...], doc: str, owner: str = "trainer", unit: str = "step") -> Point:
    return Point(name, "event", payload, doc, owner, unit)  # type: ignore[arg-type]


def _slot(name: str, args: tuple[str, ...], doc: str, owner: str = "trainer") -> Point:
    return Point(name, "slot", args, doc, owner)


_CACHE_MOVE = ("name", "source", "target", "nbytes", "seconds")

POINTS: dict[str, Point] = {
    p.name: p
    for p in (
        # ---- the loop's events (any loop fires these; see the module docstring)
        _event("setup", (), "Before training: plugins build models, data and optimizers."),
        _event("resume", (), "After setup and [prepare]: the checkpoint plugin loads the newest checkpoint."),
        _event("phase_start", ("phase",), "A phase of state.plan begins (also after a resume inside it)."),
        _event("epoch_start", (), "An epoch of the current phase's data begins.", unit="epoch"),
        _event("batch_start", ("batch",), "A batch is about to be trained on; control.skip_step() skips it."),
        _event("after_backward", ("loss",), "Gradients of this batch are accumulated (loss: its unscaled value)."),
        _event("before_optimizer_step", (), "An optimizer step is next: write lr and other hyper-parameters here."),
        _event("batch_end", ("loss",), "A batch was trained on (with or without an optimizer step)."),
        _event("step_end", ("loss",), "An optimizer step was taken; state.clock.step counts it."),
        _event("evaluate_end", ("metrics",), "The evaluate slot returned metrics (already in state.metrics)."),
        _event("epoch_end", (), "An epoch finished.", unit="epoch"),
        _event("phase_end", ("phase",), "A phase reached its length."),
        _event("run_end", (), "Training finished normally (not after an error)."),
        _event("teardown", (), "Always last, after run_end or exception: close files and bars."),
        _event("exception", ("error",), "Training raised; listeners see the error before it propagates."),
        _event("nonfinite_loss", ("loss", "batch", "where"), "A NaN/inf loss was skipped (trainer.nonfinite=skip)."),
        # ---- the loop's slots
        _slot("run", (), "The whole run; the trainer implements it, a user's loop may replace it."),
        _slot("prepare", (), "After setup: check the plan, build the optimizer, place and wrap models.", "train_sched"),
        _slot("train_step", ("batch",), "Forward, backward and (at a boundary) the optimizer step of one batch."),
        _slot("compute_loss", ("batch",), "The loss of one batch (routines implement it)."),
        _slot("backward", ("loss",), "Backpropagate a (scaled) loss."),
        _slot("optimizer_step", (), "Step every optimizer, then zero the gradients."),
        _slot("build_optimizer", ("models",), "Build the optimizer for the trainable parameters.", "train_sched"),
        _slot("epoch_batches", ("loader", "epoch", "start_batch"), "The batches of one epoch from start_batch on.", "train_sched"),
        _slot("rewrap_models", (), "Re-place models (DDP) after a structural change (freezing, adapters).", "train_sched"),
        _slot("evaluate", (), "Run evaluation; returns a dict of metrics."),
        _slot("eval_step", ("batch",), "Metrics of one validation batch."),
        # ---- checkpoints
        _slot("save_checkpoint", (), "Write a checkpoint of the engine's state.", "checkpoint"),
        _slot("load_checkpoint", ("path",), "Load a checkpoint into the engine's state.", "checkpoint"),
        _event("checkpoint_saved", ("path",), "A checkpoint is complete on disk.", "checkpoint"),
        _event("checkpoint_loaded", ("path",), "A checkpoint was loaded.", "checkpoint"),
        # ---- routines
        _event("samples_written", ("path",), "A routine wrote samples (images, text) into the run folder.", "routines"),
        _slot("sample", ("**options",), "Draw samples from the active routine's model (routines that sample).", "routines"),
        # ---- model_loader
        _event("model_load_start", ("spec",), "A model is about to load; listeners may change the spec.", "model_loader"),
        _event("model_component", ("name", "component", "spec", "components"), "A pipeline component loaded.", "model_loader"),
        _event("model_loaded", ("name", "model", "spec"), "A model finished loading; listeners may patch it.", "model_loader"),
        _slot("load_model", ("spec",), "Load one model from a spec.", "model_loader"),
        _slot("load_component", ("name", "spec"), "Load one component of a pipeline.", "model_loader"),
        # ---- model_cache
        _slot("acquire_model", ("name", "device"), "A cached model, on the device, held while in use.", "model_cache"),
        _slot("prefetch_model", ("name", "device"), "Start moving a cached model to a device in the background.", "model_cache"),
        _slot("cached_model", ("name",), "The module a cache holds under name, wherever it is (not moved).", "model_cache"),
        _event("model_cache_loaded", ("name", "device", "nbytes", "seconds"), "A cached model moved up to a device.", "model_cache"),
        _event("model_cache_offloaded", _CACHE_MOVE, "A cached model moved down a tier.", "model_cache"),
        _event("model_cache_evicted", _CACHE_MOVE, "A cached model moved down to make room.", "model_cache"),
        _event("model_cache_partial", ("name", "device", "nbytes", "device_map"), "A model was loaded partially.", "model_cache"),
        # ---- dataset and bucketing
        _slot("load_dataset", ("spec",), "Load one split with datasets.load_dataset.", "dataset"),
        _slot("decode_sample", ("sample",), "Decode a raw sample (images opened, checked).", "dataset"),
        _slot("transform_sample", ("sample",), "Transform one decoded sample (resize, crop, tokenize).", "dataset"),
        _slot("collate", ("samples",), "Turn a list of samples into a batch.", "dataset"),
        _slot("transform_batch", ("batch",), "Transform a collated batch.", "dataset"),
        _slot("batch_sampler", ("dataset", "split"), "The batch sampler of a split (bucketing replaces it).", "dataset"),
        _slot("reshuffle", ("epoch",), "Reshuffle for a new epoch.", "dataset"),
        _slot("stream_bucket", ("sample", "split"), "The bucket of a streamed sample.", "dataset"),
        _slot("make_dataloader", ("dataset", "split"), "Build the data loader of a split.", "dataset"),
        _slot("rebucket", ("epoch",), "Assign images to buckets for an epoch.", "bucketing"),
        # ---- scale
        _slot("fan_out", ("function", "items"), "Run independent work on many workers (Ray).", "fan_out"),
        _event("fan_out_done", ("function", "count"), "A fan-out finished.", "fan_out"),
    )
}

# Named priority bands, highest first. ``priority=`` accepts these names; within a band,
# registration order decides, and built-ins that depend on each other say so with
# ``before=``/``after=`` (by entry-point name). docs/HOOKS.md shows the resulting order
# of every point.
BANDS: dict[str, tuple[int, str]] = {
    "first": (100, "before everything: load models, write per-batch values, update EMA"),
    "early": (50, "register data that others size themselves by; phase settings"),
    "default": (0, "routines build their models; most listeners"),
    "late": (-50, "work on what the default band built: adapters, trainable sets, lr writes"),
    "last": (-100, "after every built-in: layer freezing, Keras callbacks, the progress bar"),
    "base": (BASE_PRIORITY, "slots only: the built-in base implementation, innermost in the chain"),
}


def band_priority(priority: int | str) -> int:
    """A numeric priority from a number or a band name (``"first"``, ``"adapters"``...)."""
    if isinstance(priority, str):
        try:
            return BANDS[priority][0]
        except KeyError:
            from .plugins import closest

            raise ValueError(f"unknown priority band {priority!r}{closest(priority, BANDS)}; bands: {list(BANDS)}") from None
    return priority
