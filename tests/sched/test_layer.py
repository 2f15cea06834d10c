"""layer_sched: layer detection on torch / diffusers / transformers / Keras models, freezing
over time, layer-wise lr decay, and bitwise resume across freeze boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hookengine.core.plugins import model_factory
from hookengine.sched import groups as G

from .helpers import Stack, make_engine, weights


def unit_names(model):
    return [u.name for u in G.layer_units(model)]


def test_units_of_a_block_stack():
    assert unit_names(Stack()) == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_units_of_transformers_and_diffusers_models():
    from hookengine.testing.tiny_models import build_tiny_causal_lm, build_tiny_sd_pipeline

    gpt2 = build_tiny_causal_lm(architecture="gpt2")[0]
    assert unit_names(gpt2) == ["embeddings", "transformer.h.0", "transformer.h.1", "head"]
    llama = build_tiny_causal_lm(architecture="llama")[0]
    assert unit_names(llama) == ["embeddings", "model.layers.0", "model.layers.1", "head"]
    pipe = build_tiny_sd_pipeline()
    assert unit_names(pipe.text_encoder) == ["embeddings", "encoder.layers.0", "encoder.layers.1", "head"]
    assert unit_names(pipe.unet) == ["stem", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "head"]
    units = G.layer_units(pipe.unet)
    covered = [p for u in units for p in u.params]
    assert sorted(covered) == sorted(n for n, _ in pipe.unet.named_parameters())


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return BertForSequenceClassification(config)


def test_layer_decay_beit_and_electra_formulas():
    """BEiT: decay ** (L + 1 - depth); ELECTRA: decay ** (L + 2 - depth), pooler at L + 1."""
    bert = tiny_bert()
    units = G.layer_units(bert)
    assert [u.kind for u in units] == ["stem", "block", "block", "pooler", "head"]
    d = 0.5
    beit = G.layer_decay_scales(units, d, "beit")
    assert beit["bert.embeddings.word_embeddings.weight"] == d**3
    assert beit["bert.encoder.layer.0.attention.self.query.weight"] == d**2
    assert beit["bert.encoder.layer.1.output.dense.weight"] == d**1
    assert beit["bert.pooler.dense.weight"] == 1.0 and beit["classifier.weight"] == 1.0
    electra = G.layer_decay_scales(units, d, "electra")
    assert electra["bert.embeddings.word_embeddings.weight"] == d**4
    assert electra["bert.encoder.layer.0.attention.self.query.weight"] == d**3
    assert electra["bert.pooler.dense.weight"] == d and electra["classifier.weight"] == 1.0


@model_factory
def keras_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="d1"), keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(8, name="d2"), keras.layers.Dense(3, name="head")],
        name="seq",
    )


def test_keras_parameters_are_named_by_their_paths():
    model = keras_model()
    names = [n for n, _ in G.named_parameters(model)]
    assert names == ["seq/d1/kernel", "seq/d1/bias", "seq/ln/gamma", "seq/ln/beta", "seq/d2/kernel", "seq/d2/bias", "seq/head/kernel", "seq/head/bias"]
    assert unit_names(model) == ["d1", "ln", "d2", "head"]
    assert G.norm_parameter_names(model) == {"seq/ln/gamma", "seq/ln/beta"}


def changed_per_step(engine, model_name="model"):
    """For each optimizer step, which parameter names changed."""
    rows = []
    before = {}

    def snap(state):
        before.clear()
        before.update({n: p.detach().clone() for n, p in G.named_parameters(state.models[model_name])})

    def diff(state):
        now = dict(G.named_parameters(state.models[model_name]))
        rows.append({n for n, p in now.items() if not torch.equal(p.detach(), before[n])})

    engine.on("before_optimizer_step", snap, priority=1000)
    engine.on("step_end", diff, priority=1000)
    return rows


def test_gradual_unfreezing_from_the_top(run_dir: Path) -> None:
    engine = make_engine(run_dir, trainer={"max_steps": 14, "lr": 0.05}, plugins=[("layer_sched", {"unfreeze_every": 3})])
    rows = changed_per_step(engine)
    engine.run()
    units = ["head", "blocks.2", "blocks.1", "blocks.0", "embed"]
    for step, changed in enumerate(rows):
        trainable = units[: 1 + step // 3]
        touched = {n.split(".weight")[0].split(".bias")[0] for n in changed}
        assert all(any(t.startswith(u) for u in trainable) for t in touched), (step, touched)
        assert any(n.startswith(trainable[-1]) for n in changed), (step, changed)
    assert engine.state.metrics["frozen_fraction"] == 0.0


def composer_frozen_units(elapsed: float, start: float, level: float, units: int) -> int:
    """Composer's LayerFreezing, from its documented algorithm: no freezing up to ``start``;
    after it the frozen fraction grows linearly, ``level × (elapsed - start) / (1 - start)``,
    and it is applied to all flattened layers but the last (the output layer never freezes):
    ``int(fraction × (units - 1))`` layers from the input side."""
    if elapsed <= start:
        return 0
    fraction = level * ((elapsed - start) / (1.0 - start))
    return int(fraction * len(range(units)[:-1]))


def test_frozen_units_count_as_composer() -> None:
    from hookengine import Engine
    from hookengine.sched.layer import LayerScheduler

    engine = Engine()
    plugin = engine.use(LayerScheduler, freeze_start=0.5, freeze_level=0.8, total_steps=10)
    engine.state.clock.step = 9  # elapsed 0.9
    assert plugin.frozen_units(11) == composer_frozen_units(0.9, 0.5, 0.8, 11) == 6
    # (0.1, 0.1, 50) at step 23 with 26 units: the fraction is 0.04 in Composer's order of
    # operations, 0.039999999999999994 in level × (elapsed - start) / (1 - start) -> 1 vs 0.
    for start, level, total in [(0.5, 0.8, 10), (0.0, 1.0, 20), (0.25, 0.5, 16), (0.5, 1.0, 7), (0.1, 0.1, 50)]:
        engine = Engine()
        plugin = engine.use(LayerScheduler, freeze_start=start, freeze_level=level, total_steps=total)
        for step in range(total + 1):
            engine.state.clock.step = step
            for units in (1, 2, 5, 11, 26):
                expected = composer_frozen_units(step / total, start, level, units)
                assert plugin.frozen_units(units) == expected, (start, level, total, step, units)


def test_growing_frozen_fraction_as_composer(run_dir: Path) -> None:
    engine = make_engine(run_dir, trainer={"max_steps": 20, "lr": 0.05}, plugins=[("layer_sched", {"freeze_start": 0.5, "freeze_level": 1.0})])
    plugin = engine.plugins["layer_sched"]
    frozen_units = []
    engine.on("before_optimizer_step", lambda state: frozen_units.append(plugin.frozen_units(5)))
    rows = changed_per_step(engine)
    engine.run()
    expected = [composer_frozen_units(s / 20, 0.5, 1.0, 5) for s in range(20)]
    assert frozen_units == expected
    assert not any(n.startswith("embed") for n in rows[-1])  # frozen at the end
    assert any(n.startswith("embed") for n in rows[0])


def test_patterns_per_phase_and_from_a_step(run_dir: Path) -> None:
    phases = [{"name": "a", "steps": 4}, {"name": "b", "steps": 4}]
    engine = make_engine(
        run_dir,
        trainer={"phases": phases, "lr": 0.05},
        plugins=[("layer_sched", {"freeze": ["embed"], "phases": {"a": ["blocks.*"]}, "steps": [[6, ["head.*"]]]})],
    )
    rows = changed_per_step(engine)
    engine.run()
    assert all(not any(n.startswith("embed") for n in r) for r in rows)
    assert all(not any(n.startswith("blocks") for n in r) for r in rows[:4])
    assert all(any(n.startswith("blocks") for n in r) for r in rows[4:])
    assert all(any(n.startswith("head") for n in r) for r in rows[:6])
    assert all(not any(n.startswith("head") for n in r) for r in rows[6:])


def test_layer_decay_in_the_loop_with_lr_sched(run_dir: Path) -> None:
    engine = make_engine(
        run_dir,
        trainer={"max_steps": 4, "lr": 0.1},
        plugins=[("layer_sched", {"layer_decay": 0.5}), ("lr_sched", {"schedule": "linear", "total_steps": 4})],
    )
    engine.run()
    optimizer = engine.state.optimizers["main"]
    model = engine.state.models["model"]
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert scale_of[id(model.embed.weight)] == 0.5**4 and scale_of[id(model.blocks[0][0].weight)] == 0.5**3
    assert scale_of[id(model.head.weight)] == 1.0
    assert lr_of[id(model.blocks[2][1].weight)] == pytest.approx(0.1 * 0.25 * 0.5)  # last step: factor 1/4


@pytest.mark.parametrize("resume_at", [4, 8])
def test_resume_across_freeze_boundaries_is_bitwise(tmp_path: Path, resume_at) -> None:
    plugins = [("layer_sched", {"unfreeze_every": 3, "layer_decay": 0.7}), ("lr_sched", {"schedule": "cosine", "warmup": 2})]
    trainer = {"max_steps": 14, "lr": 0.05}
    full = make_engine(tmp_path / "a", trainer=trainer, plugins=plugins, checkpoint={"every": 2, "keep_last": 0})
    full.run()
    path = tmp_path / "a" / "checkpoints" / f"step-{resume_at:08d}"
    resumed = make_engine(tmp_path / "b", trainer=trainer, plugins=plugins, checkpoint={"resume": str(path)})
    resumed.run()
    a, b = weights(full.state.models["model"]), weights(resumed.state.models["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.state.clock.step == 14


def test_keras_model_trains_with_layer_sched(run_dir: Path) -> None:
    engine = make_engine(
        run_dir,
        trainer={"max_steps": 6, "lr": 0.05},
        model="tests.sched.test_layer:keras_model",
        plugins=[("layer_sched", {"freeze": ["seq/d1"], "steps": [[3, ["seq/head/*"]]], "layer_decay": 0.5})],
    )
    rows = changed_per_step(engine)
    engine.run()
    assert all(not any(n.startswith("seq/d1") for n in r) for r in rows)
    assert all(any(n.startswith("seq/head") for n in r) for r in rows[:3])
    assert all(not any(n.startswith("seq/head") for n in r) for r in rows[3:])
    model = engine.state.models["model"]
    variables = {v.path: v for v in model.weights}
    assert variables["seq/head/kernel"].trainable is False and variables["seq/d2/kernel"].trainable is True
    scales = {g["lr_scale"] for g in engine.state.optimizers["main"].param_groups}
    assert scales == {0.5**3, 0.5**2, 0.5, 1.0}


def test_unfreezing_changes_requires_grad_on_diffusers_and_transformers_models():
    from hookengine import Engine
    from hookengine.sched.layer import LayerScheduler
    from hookengine.testing.tiny_models import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline()
    engine = Engine()
    engine.state.models.update({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    plugin = engine.use(LayerScheduler, unfreeze_every=10, unfreeze_start=2)
    engine.fire("setup")
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("up_blocks.1", "conv_norm_out", "conv_out")) for n in trainable)
    te_trainable = {n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad}
    assert all(n.startswith(("encoder.layers.1", "final_layer_norm")) for n in te_trainable)
    engine.state.clock.step = 20
    engine.fire("step_end")
    assert any(p.requires_grad for n, p in pipe.unet.named_parameters() if n.startswith("mid_block"))
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if n.startswith("down_blocks.1"))
    assert plugin.frozen_units(7) == 3
