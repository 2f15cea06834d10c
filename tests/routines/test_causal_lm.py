"""Causal LM routine: the model's own loss, padding masked, training through the engine, samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hookengine.routines.causal_lm import causal_lm_loss, labels_from_inputs, pack_sequences, pad_sequences

from .conftest import quiet_engine, record_losses

CAUSAL_LM = "hookengine.routines.causal_lm:CausalLM"
TEXTS = ["the cat sat on the mat", "a dog", "hello world, hello hooks", "one two three four five", "abc"]


def text_batches(tiny_lm: Path, size: int = 3) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]
    return [pad_sequences(ids[i:i + size], pad_id=tokenizer.eos_token_id) for i in range(0, len(ids), size)]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_loss_equals_transformers_loss_with_labels_and_padding(tmp_path: Path, run_dir: Path, architecture: str) -> None:
    from transformers import AutoModelForCausalLM

    from hookengine import Engine
    from hookengine.testing import save_tiny_causal_lm

    folder = save_tiny_causal_lm(tmp_path / architecture, architecture=architecture)
    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(CAUSAL_LM, name="causal_lm", model=str(folder))
    engine.fire("setup")
    model = engine.state.models["model"]
    assert isinstance(model, torch.nn.Module) and type(model).__name__.lower().startswith(architecture)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    batch = text_batches(folder)[0]
    assert (batch["attention_mask"] == 0).any()  # there is padding to mask
    ours = engine.call("compute_loss", batch)
    labels = labels_from_inputs(batch["input_ids"], batch["attention_mask"])
    theirs = reference(**batch, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # Padding counts when it is not masked: the test can tell the two apart.
    unmasked = reference(**batch, labels=batch["input_ids"]).loss
    assert abs(unmasked.item() - theirs.item()) > 1e-4
    # Given labels are used as they are.
    given = {**batch, "labels": batch["input_ids"]}
    torch.testing.assert_close(engine.call("compute_loss", given), unmasked, rtol=1e-6, atol=1e-6)


def test_shift_is_next_token() -> None:
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 30.0  # position i predicts label i + 1
    labels = torch.tensor([[1, 2, 3]])
    assert float(causal_lm_loss(logits, labels)) < 1e-6
    assert float(causal_lm_loss(logits, torch.tensor([[1, 3, 2]]))) > 10


def test_training_reduces_loss_validates_and_writes_text_samples(tiny_lm: Path, run_dir: Path) -> None:
    batches = text_batches(tiny_lm)
    engine = quiet_engine(run_dir, max_steps=24, lr=3e-3, eval_every=8, eval_at_phase_end=False)
    engine.use(CAUSAL_LM, name="causal_lm", model=str(tiny_lm), sample_prompts=["the cat", "hello"],
               sample_every=12, max_new_tokens=6)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches, val=batches[:1]))
    losses = record_losses(engine)
    evaluated: list[int] = []
    engine.on("evaluate_end", lambda state, metrics: evaluated.append(state.clock.step))
    engine.run()
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert evaluated == [8, 16, 24] and "val_loss" in engine.state.metrics
    samples = sorted((run_dir / "samples").iterdir())
    assert [p.name for p in samples] == ["step-0012.txt", "step-0024.txt"]
    text = samples[-1].read_text()
    assert text.startswith(">>> the cat\n") and ">>> hello\n" in text


def test_greedy_samples_are_what_generate_gives(tiny_lm: Path, run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(CAUSAL_LM, name="causal_lm", model=str(tiny_lm), sample_prompts=["abc"], max_new_tokens=5)
    engine.fire("setup")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    encoded = tokenizer("abc", return_tensors="pt")
    expected = model.generate(**encoded, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.eos_token_id)
    assert routine.generate() == [tokenizer.decode(expected[0, 3:], skip_special_tokens=True)]


def test_pack_sequences_fills_blocks_and_drops_the_remainder() -> None:
    packed = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, separator=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert torch.equal(packed["labels"], packed["input_ids"]) and bool(packed["attention_mask"].all())
    with pytest.raises(ValueError, match="do not fill one block of 64"):
        pack_sequences([[1, 2]], block_size=64)


def test_missing_model_is_a_clear_error(run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(CAUSAL_LM, name="causal_lm")
    with pytest.raises(ValueError, match="no model 'model' in state.models"):
        engine.fire("setup")
