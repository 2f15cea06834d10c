"""Text for causal LMs: the ``text`` plugin tokenizes, masks and packs a loaded data set.

It wraps the ``dataset`` plugin's ``load_dataset`` slot: what the data set loads is
mapped (``datasets.Dataset.map``, deterministic, cached by ``datasets``) through its own
slot ``tokenize_text(dataset) -> dataset``, and it wraps ``collate`` to pad batches. Three
formats, as the peers have them:

- ``text`` (a ``text`` column; transformers' ``run_clm.py``): tokenized, labels are the
  input ids; with ``block_size``, packed into blocks as ``run_clm``'s ``group_texts``
  (concatenate, cut, drop the remainder of each map batch);
- ``prompt_response`` (``prompt``/``response`` columns; TRL's prompt-completion data):
  the prompt's tokens get label -100, so only the response is learnt;
- ``chat`` (a ``messages`` column; TRL's conversational data): the tokenizer's chat
  template (``apply_chat_template``); only the assistant turns are learnt (from the
  template's ``{% generation %}`` marks when it has them, else by rendering each
  conversation prefix), or, when the template does not render prefixes as prefixes,
  everything after the last assistant header.

Packing (``block_size``) works for every format: labels are packed with the input ids,
so masked prompt tokens stay masked.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Literal, Sequence

from ..core.points import BASE_PRIORITY, Point

__all__ = ["TextData", "group_texts", "tokenize_text", "tokenize_prompt_response", "tokenize_chat", "IGNORE_INDEX"]

IGNORE_INDEX = -100


# ---------------------------------------------------------------- pure functions
def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """``run_clm.py``'s ``group_texts``: concatenate each column, cut blocks of
    ``block_size``, drop the remainder (labels are packed like the input ids)."""
    concatenated = {key: list(chain(*values)) for key, values in examples.items()}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    return {key: [values[i:i + block_size] for i in range(0, total, block_size)] for key, values in concatenated.items()}


def tokenize_text(tokenizer: Any, texts: Sequence[str], add_eos: bool = False) -> dict[str, list[list[int]]]:
    """Plain text: ``tokenizer(texts)``; labels are the input ids (maybe with EOS appended)."""
    ids = [list(row) for row in tokenizer(list(texts))["input_ids"]]
    if add_eos:
        ids = [row + [tokenizer.eos_token_id] for row in ids]
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": [list(row) for row in ids]}


def tokenize_prompt_response(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], add_eos: bool = True,
                             mask_prompt: bool = True) -> dict[str, list[list[int]]]:
    """Prompt then response; the prompt's tokens (with the tokenizer's special tokens, such
    as a BOS) are labelled -100 when ``mask_prompt``."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids):
        response = list(response) + ([tokenizer.eos_token_id] if add_eos else [])
        ids = list(prompt) + response
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(([IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)) + response)
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


def chat_labels(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant turns only.

    With ``{% generation %}`` marks in the template, the tokenizer's own assistant mask;
    else each assistant turn is the tokens between the rendered prefix before it (with the
    generation prompt) and the rendered prefix through it. When a template does not render
    prefixes as prefixes, everything before the last assistant turn is masked.
    """
    ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    template = tokenizer.chat_template or ""
    if "generation" in template and "{%" in template:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        mask = encoded["assistant_masks"]
        if any(mask):
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else []
        through = _render(tokenizer, messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(through)] != through:
            spans = []
            break
        spans.append((len(before), len(through)))
    if not spans:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError("text: a conversation has no assistant turn to learn")
        before = _render(tokenizer, messages[:last], generation_prompt=True) if last else []
        if ids[:len(before)] != before:
            raise ValueError("text: the chat template does not render the conversation before the last assistant turn "
                             "as its prefix; the prompt cannot be masked (set text.mask_prompt=false)")
        spans = [(len(before), len(ids))]
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_chat(tokenizer: Any, conversations: Sequence[list[dict[str, Any]]],
                  mask_prompt: bool = True) -> dict[str, list[list[int]]]:
    """Conversations through the tokenizer's chat template; labels as :func:`chat_labels`."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for messages in conversations:
        if mask_prompt:
            ids, labels = chat_labels(tokenizer, list(messages))
        else:
            ids = _render(tokenizer, list(messages))
            labels = list(ids)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _tokenize_batch(examples: dict[str, list[Any]], *, tokenizer: Any, format: str, columns: dict[str, str],
                    add_eos: bool, mask_prompt: bool, max_length: int | None) -> dict[str, list[list[int]]]:
    """The ``datasets.map`` function (module level: ``datasets`` hashes it for its cache)."""
    if format == "tokens":  # already token ids: complete the mask and the labels
        ids = [list(row) for row in examples["input_ids"]]
        out = {"input_ids": ids,
               "attention_mask": [list(r) for r in examples.get("attention_mask") or [[1] * len(r) for r in ids]],
               "labels": [list(r) for r in examples.get("labels") or ids]}
    elif format == "text":
        out = tokenize_text(tokenizer, examples[columns["text"]], add_eos)
    elif format == "prompt_response":
        out = tokenize_prompt_response(tokenizer, examples[columns["prompt"]], examples[columns["response"]],
                                       add_eos, mask_prompt)
    else:
        out = tokenize_chat(tokenizer, examples[columns["messages"]], mask_prompt)
    if max_length is not None:
        out = {key: [row[:max_length] for row in rows] for key, rows in out.items()}
    return out


def _group_batch(examples: dict[str, list[list[int]]], *, block_size: int) -> dict[str, list[list[int]]]:
    return group_texts(examples, block_size)


def pad_samples(samples: list[dict[str, Any]], pad_id: int) -> list[dict[str, Any]]:
    """Right-pad ``input_ids`` (``pad_id``), ``attention_mask`` (0) and ``labels`` (-100)
    of each sample to the longest in the list."""
    length = max(len(s["input_ids"]) for s in samples)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = []
    for sample in samples:
        sample = dict(sample)
        for key, value in fill.items():
            if key in sample:
                row = list(sample[key])
                sample[key] = row + [value] * (length - len(row))
        out.append(sample)
    return out


# ------------------------------------------------------------------------ plugin
class TextData:
    """Tokenize, mask and pack the ``dataset`` plugin's text for a causal LM.

    Use it next to ``dataset`` (which loads the jsonl, csv, parquet, text or hub data set)
    and ``causal_lm``; batches then hold ``input_ids``, ``attention_mask`` and ``labels``.

    Args:
        tokenizer: a tokenizer folder (``AutoTokenizer.from_pretrained``); default: the
            folder the model ``state.models[model]`` was loaded from.
        model: the model's name in ``state.models`` (for the default tokenizer).
        format: ``text``, ``prompt_response``, ``chat``, ``tokens`` (already tokenized:
            ``input_ids``, maybe ``labels``/``attention_mask``; only packed and padded), or
            ``auto``: ``chat`` when the data set has ``messages_column``, else
            ``prompt_response`` when it has both ``prompt_column`` and ``response_column``,
            else ``text`` when it has ``text_column``, else ``tokens`` when it has ``input_ids``.
        text_column, prompt_column, response_column, messages_column: the columns read.
        block_size: pack the tokens into blocks of this many (``run_clm``'s
            ``group_texts``; the remainder of each map batch is dropped); ``None``:
            one sample per row, padded per batch.
        pack_batch_size: rows packed together (``datasets.map``'s ``batch_size``; 1000 as
            ``run_clm``).
        max_length: truncate each row to this many tokens before packing (``None``: no
            truncation).
        add_eos: append the EOS token to each text and response (``None``: for
            ``prompt_response``, and for ``text`` when packing, so packed documents stay apart).
        mask_prompt: label prompt tokens (prompts, or the non-assistant turns of
            conversations) -100.
        num_proc: processes for ``datasets.map``.
    """

    name = "text"
    hook_points = [Point("tokenize_text", "slot", ("dataset",),
                         "Tokenize, mask and pack a loaded text data set (or DatasetDict).", "text")]

    def __init__(
        self,
        tokenizer: str | None = None,
        model: str = "model",
        format: Literal["auto", "text", "prompt_response", "chat", "tokens"] = "auto",
        text_column: str = "text",
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        block_size: int | None = None,
        pack_batch_size: int = 1000,
        max_length: int | None = None,
        add_eos: bool | None = None,
        mask_prompt: bool = True,
        num_proc: int | None = None,
    ) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError(f"text.block_size must be >= 1, got {block_size}")
        self.tokenizer_path, self.model_name, self.format = tokenizer, model, format
        self.columns = {"text": text_column, "prompt": prompt_column, "response": response_column,
                        "messages": messages_column}
        self.block_size, self.pack_batch_size, self.max_length = block_size, pack_batch_size, max_length
        self.add_eos, self.mask_prompt, self.num_proc = add_eos, mask_prompt, num_proc
        self.tokenizer: Any = None
        self.engine: Any = None

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("tokenize_text", self._tokenize_text, priority=BASE_PRIORITY)
        engine.attach("load_dataset", self._load_dataset)
        engine.attach("collate", self._collate)

    # ------------------------------------------------------------- tokenizer
    def load_tokenizer(self) -> Any:
        """The tokenizer: the option's folder, else the folder the model came from."""
        if self.tokenizer is not None:
            return self.tokenizer
        path = self.tokenizer_path
        if path is None:
            model = self.engine.state.models.get(self.model_name)
            path = getattr(self.engine.runtime.unwrap(model), "name_or_path", None) if model is not None else None
        if not path:
            raise ValueError(
                f"text: no tokenizer: set text.tokenizer (a folder), or load the model {self.model_name!r} "
                "(causal_lm.model or model_loader) so its folder is used"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        return self.tokenizer

    # ---------------------------------------------------------------- slots
    def _load_dataset(self, next_impl: Any, spec: dict[str, Any]) -> Any:
        return self.engine.call("tokenize_text", next_impl(spec))

    def _tokenize_text(self, next_impl: Any, dataset: Any) -> Any:
        import datasets

        if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            return type(dataset)({split: self.tokenize(data, split) for split, data in dataset.items()})
        return self.tokenize(dataset)

    def resolve_format(self, columns: Sequence[str]) -> str:
        """The format from the option and the data set's columns (``auto``)."""
        c = self.columns
        needs = {"text": [c["text"]], "prompt_response": [c["prompt"], c["response"]], "chat": [c["messages"]],
                 "tokens": ["input_ids"]}
        fmt = self.format
        if fmt == "auto":
            formats = ("chat", "prompt_response", "text", "tokens")
            fmt = next((f for f in formats if all(n in columns for n in needs[f])), "")
        if not fmt or any(n not in columns for n in needs[fmt]):
            raise KeyError(
                f"text: the data set has columns {sorted(columns)}; format {self.format!r} reads "
                + (f"{needs[fmt]}" if fmt else f"text.text_column={c['text']!r}, text.prompt_column={c['prompt']!r} "
                   f"with text.response_column={c['response']!r}, text.messages_column={c['messages']!r} "
                   "or token ids ('input_ids')")
            )
        return fmt

    def tokenize(self, data: Any, split: str | None = None) -> Any:
        """Tokenize (and pack) one split; only ``input_ids``, ``attention_mask``, ``labels`` stay."""
        import datasets

        columns = list(data.column_names or [])
        if not columns:  # a stream without known features: look at the first record
            columns = list(next(iter(data)).keys())
        fmt = self.resolve_format(columns)
        tokenizer = self.load_tokenizer() if fmt != "tokens" else None
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("text: format 'chat' needs a tokenizer with a chat template (tokenizer.chat_template)")
        add_eos = self.add_eos if self.add_eos is not None else (fmt == "prompt_response" or self.block_size is not None)
        streaming = isinstance(data, datasets.IterableDataset)
        options: dict[str, Any] = {} if streaming else {"num_proc": self.num_proc, "desc": "tokenize"}
        data = data.map(
            _tokenize_batch, batched=True, remove_columns=columns,
            fn_kwargs={"tokenizer": tokenizer, "format": fmt, "columns": self.columns, "add_eos": add_eos,
                       "mask_prompt": self.mask_prompt, "max_length": self.max_length},
            **options,
        )
        if self.block_size is None:
            return data
        if not streaming:
            options["desc"] = f"pack into blocks of {self.block_size}"
        packed = data.map(_group_batch, batched=True, batch_size=self.pack_batch_size,
                          fn_kwargs={"block_size": self.block_size}, **options)
        if not streaming and len(packed) == 0:
            total = sum(len(row) for row in data["input_ids"])
            where = f" (split {split!r})" if split else ""
            raise ValueError(f"text: {total} tokens{where} do not fill one block of text.block_size={self.block_size}")
        return packed

    def _collate(self, next_impl: Any, samples: list[dict[str, Any]]) -> Any:
        if samples and isinstance(samples[0], dict) and "input_ids" in samples[0]:
            tokenizer = self.load_tokenizer()
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            samples = pad_samples(samples, 0 if pad_id is None else pad_id)
        return next_impl(samples)
