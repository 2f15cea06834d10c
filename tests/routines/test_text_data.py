"""The text plugin: run_clm's packing, prompt masking, chat templates, and a causal LM
trained from a jsonl file with no user Python."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import pytest
import torch

from hookengine.data.text import IGNORE_INDEX, TextData, chat_labels

from .conftest import quiet_engine, record_losses

CAUSAL_LM = "hookengine.routines.causal_lm:CausalLM"
TEXT = "text"  # the entry point (hookengine.data.text:TextData)
TEXTS = ["the cat sat on the mat", "a dog", "hello world, hello hooks", "one two three four five", "abc", "xyz uvw"]
PAIRS = [{"prompt": "Q: 2+2? A:", "response": " 4"}, {"prompt": "Q: hi? A:", "response": " hello there"},
         {"prompt": "Say abc:", "response": " abc"}]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
GENERATION_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}"
                       "{{ m['content'] }}\n{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
CHATS = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"},
          {"role": "assistant", "content": "4"}]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenizer_of(tiny_lm: Path, template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def plugin(tokenizer, **options) -> TextData:
    text = TextData(**options)
    text.tokenizer = tokenizer
    return text


def run_clm(tokenizer, texts: list[str], block_size: int, batch_size: int, eos: bool) -> list[list[int]]:
    """transformers' examples/pytorch/language-modeling/run_clm.py: tokenize_function and group_texts."""
    from datasets import Dataset

    def tokenize_function(examples):
        output = tokenizer(examples["text"])
        if eos:  # TRL's packing appends EOS to each document
            output["input_ids"] = [ids + [tokenizer.eos_token_id] for ids in output["input_ids"]]
            output["attention_mask"] = [mask + [1] for mask in output["attention_mask"]]
        return output

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated_examples.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    data = Dataset.from_dict({"text": texts}).map(tokenize_function, batched=True, remove_columns=["text"])
    return data.map(group_texts, batched=True, batch_size=batch_size)["input_ids"]


@pytest.mark.parametrize("eos", [False, True])
def test_packing_equals_run_clm_group_texts(tiny_lm: Path, eos: bool) -> None:
    from datasets import Dataset

    tokenizer = tokenizer_of(tiny_lm)
    texts = TEXTS * 3
    packed = plugin(tokenizer, block_size=8, pack_batch_size=4, add_eos=eos).tokenize(Dataset.from_dict({"text": texts}))
    expected = run_clm(tokenizer, texts, block_size=8, batch_size=4, eos=eos)
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    assert packed["input_ids"] == expected and packed["labels"] == expected
    assert all(row == [1] * 8 for row in packed["attention_mask"])
    # The remainder of each map batch is dropped, as run_clm does: fewer blocks than one stream gives.
    assert len(expected) < sum(len(tokenizer(t)["input_ids"]) + eos for t in texts) // 8


def test_prompt_tokens_are_masked_exactly(tiny_lm: Path) -> None:
    from datasets import Dataset

    tokenizer = tokenizer_of(tiny_lm)
    data = plugin(tokenizer).tokenize(Dataset.from_list(PAIRS))
    for row, pair in zip(data, PAIRS):
        prompt = tokenizer(pair["prompt"])["input_ids"]
        response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + response
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response
    # Packed, the masks travel with the tokens.
    packed = plugin(tokenizer, block_size=5).tokenize(Dataset.from_list(PAIRS))
    flat_ids = list(chain(*data["input_ids"]))
    flat_labels = list(chain(*data["labels"]))
    assert list(chain(*packed["input_ids"])) == flat_ids[: len(flat_ids) // 5 * 5]
    assert list(chain(*packed["labels"])) == flat_labels[: len(flat_labels) // 5 * 5]


@pytest.mark.parametrize("template", [TEMPLATE, GENERATION_TEMPLATE])
def test_chat_learns_only_the_assistant_turns(tiny_lm: Path, template: str) -> None:
    from datasets import Dataset

    tokenizer = tokenizer_of(tiny_lm, template)
    data = plugin(tokenizer).tokenize(Dataset.from_dict({"messages": CHATS}))
    for row, chat in zip(data, CHATS):
        assert row["input_ids"] == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
        learnt = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert [label for label in row["labels"] if label != IGNORE_INDEX] == learnt
        assert tokenizer.decode(learnt) == "".join(m["content"] + "\n" for m in chat if m["role"] == "assistant")


def test_chat_template_without_prefixes_masks_up_to_the_last_answer(tiny_lm: Path) -> None:
    # Earlier answers render differently once the conversation goes on (as templates that
    # drop earlier reasoning do): only the last answer can be told apart, so it alone is learnt.
    template = ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and not loop.last %}(earlier)"
                "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer = tokenizer_of(tiny_lm, template)
    ids, labels = chat_labels(tokenizer, CHATS[0])
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "ciao"  # trim_blocks: no newline
    # Turns numbered from the end: not even the prompt renders as a prefix.
    numbered = ("{% for m in messages %}[{{ messages|length - loop.index }}]<{{ m['role'] }}>{{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}[0]<assistant>{% endif %}")
    with pytest.raises(ValueError, match="does not render the conversation before the last assistant turn"):
        chat_labels(tokenizer_of(tiny_lm, numbered), CHATS[0][:2])


def test_unknown_columns_name_the_options(tiny_lm: Path) -> None:
    from datasets import Dataset

    with pytest.raises(KeyError, match="columns \\['body'\\].*text.text_column='text'.*text.messages_column"):
        plugin(tokenizer_of(tiny_lm)).tokenize(Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(ValueError, match="do not fill one block of text.block_size=512"):
        plugin(tokenizer_of(tiny_lm), block_size=512).tokenize(Dataset.from_dict({"text": ["short"]}))


def test_causal_lm_trains_from_a_jsonl_file_with_masked_prompts(tiny_lm: Path, run_dir: Path, tmp_path: Path) -> None:
    """dataset (json) + text + causal_lm, options only: the tokenizer is the model's own."""
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS * 4)
    engine = quiet_engine(run_dir, max_steps=6, lr=3e-3, eval_at_phase_end=False)
    engine.use("dataset", path="json", data_files=str(data), batch_size=3, shuffle=False)
    engine.use(TEXT, name="text")
    engine.use(CAUSAL_LM, name="causal_lm", model=str(tiny_lm))
    batches: list[dict] = []
    engine.on("batch_start", lambda batch: batches.append(batch))
    losses = record_losses(engine)
    engine.run()
    assert len(losses) == 6 and losses[-1] < losses[0]
    tokenizer = tokenizer_of(tiny_lm)
    first = batches[0]
    lengths = [len(tokenizer(p["prompt"] + p["response"])["input_ids"]) + 1 for p in PAIRS]
    assert first["input_ids"].shape == (3, max(lengths))  # padded to the longest in the batch
    for row, (pair, length) in enumerate(zip(PAIRS, lengths)):
        prompt = len(tokenizer(pair["prompt"])["input_ids"])
        labels = first["labels"][row]
        assert (labels[:prompt] == IGNORE_INDEX).all() and (labels[prompt:length] != IGNORE_INDEX).all()
        assert (labels[length:] == IGNORE_INDEX).all() and (first["attention_mask"][row, length:] == 0).all()


def test_a_batch_of_raw_text_names_the_missing_key_and_the_plugin(tiny_lm: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(CAUSAL_LM, name="causal_lm", model=str(tiny_lm))
    engine.fire("setup")
    with pytest.raises(KeyError, match=r"causal_lm: the batch has no 'input_ids' \(keys: text\); add the text plugin"):
        engine.call("compute_loss", {"text": ["hello"]})
    assert torch.is_tensor(engine.call("compute_loss", {"input_ids": torch.tensor([[1, 2, 3]])}))


def test_data_without_token_ids_fails_at_setup_naming_the_text_plugin(tiny_lm: Path, run_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    engine = quiet_engine(run_dir, max_steps=1)
    engine.use(CAUSAL_LM, name="causal_lm", model=str(tiny_lm))
    engine.use("dataset", path="json", data_files=str(data), batch_size=2)
    with pytest.raises(ValueError, match=r"no 'input_ids' \(needed by causal_lm; add the text plugin"):
        engine.run()


def test_a_recipe_trains_on_packed_chats_with_no_user_python(tiny_lm: Path, run_dir: Path, tmp_path: Path) -> None:
    from hookengine import Engine

    model = tmp_path / "chat-lm"
    tokenizer = tokenizer_of(tiny_lm, TEMPLATE)
    tokenizer.save_pretrained(model)  # the chat template travels with the tokenizer
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_lm / name).exists():
            (model / name).write_bytes((tiny_lm / name).read_bytes())
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in CHATS * 4])
    recipe = {
        "name": "chat", "seed": 0, "run_dir": str(run_dir),
        "plugins": {
            "dataset": {"use": "dataset", "path": "json", "data_files": str(data), "batch_size": 2},
            "text": {"use": "text", "block_size": 16},
            "causal_lm": {"use": "causal_lm", "model": str(model)},
        },
        "trainer": {"max_steps": 2}, "progress": {"enabled": False}, "logging": {"every": 1},
    }
    engine = Engine()
    batches: list[dict] = []
    engine.on("batch_start", lambda batch: batches.append(batch))
    engine.run(recipe)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (2, 16)
    labels = batches[0]["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()  # user turns masked, answers learnt


def test_token_ids_are_only_packed(tiny_lm: Path) -> None:
    from datasets import Dataset

    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    packed = TextData(block_size=4).tokenize(Dataset.from_dict({"input_ids": rows}))  # no tokenizer needed
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]] == packed["labels"]
    masked = TextData().tokenize(Dataset.from_dict({"input_ids": rows, "labels": [[-100, 2, 3], [4, 5], [6] * 5]}))
    assert masked["labels"][0] == [-100, 2, 3] and masked["attention_mask"][1] == [1, 1]


def test_a_stream_is_packed_as_the_loaded_data_set(tiny_lm: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS * 2])
    text = plugin(tokenizer_of(tiny_lm), block_size=8, pack_batch_size=5)
    loaded = text.tokenize(load_dataset("json", data_files=str(data), split="train"))
    streamed = text.tokenize(load_dataset("json", data_files=str(data), split="train", streaming=True))
    assert [row["input_ids"] for row in streamed] == loaded["input_ids"]
