"""Malformed recipes give a clear RecipeError naming a key, never a traceback."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hookengine import Engine
from hookengine.recipe import RecipeError, apply_recipe, load_recipe

KEYS = ["name", "seed", "run_dir", "defaults", "runtime", "trainer", "checkpoint", "logging",
        "progress", "plugins", "phases", "trainr", "plugin", "phase"]
TRAINER_KEYS = ["epochs", "max_steps", "lr", "optimizer", "phases", "gradient_accumulation_steps",
                "nonfinite", "grad_clip", "eval_every", "epocs", "lr_rate"]
PLUGIN_REFS = ["digits", "supervised", "hookengine.demo.digits:DigitsData", "nope", "hookengine.training.trainer:Nope",
               "no.such.module:X", "", 3, None]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(string.printable, max_size=8)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
plugin_spec = st.fixed_dictionaries(
    {"use": st.sampled_from(PLUGIN_REFS)},
    optional={"batch_size": values, "model": values, "seed": values, "bogus": values},
) | values
recipes = st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(
        values,
        st.dictionaries(st.sampled_from(TRAINER_KEYS), values, max_size=4),
        st.dictionaries(st.sampled_from(["a", "digits", "classifier"]), plugin_spec, max_size=3),
        st.lists(st.dictionaries(st.sampled_from(["name", "steps", "epochs", "routine", "stepz"]), values), max_size=3),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_malformed_recipes_give_clear_errors(data: dict) -> None:
    try:
        apply_recipe(Engine(), load_recipe(data))
    except RecipeError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        assert len(message.splitlines()) <= 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(string.printable, max_size=20), max_size=3))
def test_malformed_overrides_give_clear_errors(overrides: list[str]) -> None:
    try:
        apply_recipe(Engine(), load_recipe(None, overrides))
    except RecipeError as exc:
        assert str(exc)
