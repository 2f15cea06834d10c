"""The causal LM routine: next-token loss for transformers models, and greedy samples.

The loss is the one transformers computes for ``model(..., labels=labels)``: logits in
float32, labels shifted left by padding them on the right with -100, mean cross entropy
over the tokens that are not -100. Without ``labels`` in the batch, the labels are the
``input_ids`` with padding (``attention_mask == 0``) set to -100.

Text is tokenized, masked and packed by the ``text`` plugin (:mod:`hookengine.data.text`)
when the data set loads; this routine loads its model early in ``setup`` so that plugin
finds the model's tokenizer folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .base import Routine, samples_path

__all__ = ["CausalLM", "causal_lm_loss", "labels_from_inputs", "pack_sequences", "pad_sequences", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_TEXT_HINT = (
    "add the text plugin (use: text, with text.text_column, "
    "text.prompt_column/response_column or text.messages_column) to tokenize the data set's text"
)


def labels_from_inputs(input_ids: Any, attention_mask: Any = None) -> Any:
    """Labels for next-token training: the inputs, with padding positions set to -100."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels


def causal_lm_loss(logits: Any, labels: Any) -> Any:
    """Mean cross entropy of ``logits[:, i]`` against ``labels[:, i + 1]`` (transformers' way)."""
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    # Padding on the right then dropping the first label is the shift; -100 is never scored.
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(logits.float().view(-1, vocab), shifted.view(-1).to(logits.device), ignore_index=IGNORE_INDEX)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None) -> dict[str, Any]:
    """A right-padded batch: ``input_ids`` and ``attention_mask`` (long tensors)."""
    import torch

    length = max_length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        tokens = list(tokens)[:length]
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pack_sequences(sequences: Sequence[Sequence[int]], block_size: int, separator: int | None = None) -> dict[str, Any]:
    """Concatenate token sequences (each followed by ``separator``) and cut blocks of ``block_size``.

    As transformers' ``run_clm.py`` ``group_texts``: the remainder shorter than a block is
    dropped; every token is attended (no padding), so ``labels`` equal ``input_ids``.
    """
    import torch

    stream: list[int] = []
    for tokens in sequences:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    blocks = len(stream) // block_size
    if blocks == 0:
        raise ValueError(f"pack_sequences: {len(stream)} tokens do not fill one block of {block_size}")
    input_ids = torch.tensor(stream[: blocks * block_size], dtype=torch.long).view(blocks, block_size)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class CausalLM(Routine):
    """Train a causal LM on batches of ``input_ids``, ``attention_mask`` and maybe ``labels``.

    Args:
        model: a folder to load with ``AutoModelForCausalLM.from_pretrained`` (safetensors
            only), when no model named ``model_name`` is in ``state.models``.
        model_name: the model's name in ``state.models``.
        tokenizer: a tokenizer folder (default: the model folder, when it has one); used
            for samples.
        model_options: more keyword arguments for ``from_pretrained``.
        sample_prompts: prompts completed greedily for the samples.
        sample_every: write samples every N optimizer steps (0: never).
        sample_at_phase_end: also write them when a phase of this routine ends.
        max_new_tokens: length of each completion.
    """

    name = "causal_lm"

    def __init__(
        self,
        model: str | None = None,
        model_name: str = "model",
        tokenizer: str | None = None,
        model_options: dict[str, Any] | None = None,
        sample_prompts: list[str] | None = None,
        sample_every: int = 0,
        sample_at_phase_end: bool = True,
        max_new_tokens: int = 20,
    ) -> None:
        self.model_path = model
        self.model_name = model_name
        self.tokenizer_path = tokenizer
        self.model_options = dict(model_options or {})
        self.sample_prompts = list(sample_prompts or [])
        self.sample_every = sample_every
        self.sample_at_phase_end = sample_at_phase_end
        self.max_new_tokens = max_new_tokens
        self.tokenizer: Any = None
        self._keys_declared = False
        self._last_sampled: int | None = None

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        # Before the data loads (default band): the text plugin reads the model's folder.
        engine.on("setup", self.build, priority="early")
        if self.sample_prompts and self.sample_every > 0:
            engine.on("step_end", self._sample_listener, every=self.sample_every)
        if self.sample_prompts and self.sample_at_phase_end:
            engine.on("phase_end", self._sample_listener)

    # ------------------------------------------------------------------- build
    def build(self, state: Any) -> None:
        """Load the model (once) and its tokenizer; called early in ``setup``."""
        self.device = self.engine.runtime.device
        if not self._keys_declared and self.engine.has("required_keys"):
            # With the dataset plugin: data without input_ids fails at setup, naming the fix.
            self._keys_declared = True
            self.engine.attach("required_keys", self._required_keys)
        if self.model_name not in state.models:
            if self.model_path is None:
                raise ValueError(
                    f"causal_lm: no model {self.model_name!r} in state.models; give model= (a folder) or load one with model_loader"
                )
            from transformers import AutoModelForCausalLM

            state.models[self.model_name] = AutoModelForCausalLM.from_pretrained(
                self.model_path, use_safetensors=True, **self.model_options
            )
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        if self.sample_prompts and self.tokenizer is None:
            raise ValueError("causal_lm.sample_prompts needs a tokenizer: give tokenizer= (a folder)")

    def _load_tokenizer(self) -> Any:
        path = self.tokenizer_path or self.model_path
        if path is None or not (Path(path) / "tokenizer_config.json").is_file():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def _required_keys(self, next_impl: Any, split: str) -> dict[str, str]:
        keys = dict(next_impl(split) or {})
        keys.setdefault("input_ids", f"{getattr(self, 'plugin_name', self.name)}; {_TEXT_HINT}")
        return keys

    # -------------------------------------------------------------------- loss
    def _inputs(self, batch: Any) -> tuple[Any, Any, Any]:
        if not hasattr(batch, "get") or batch.get("input_ids") is None:
            keys = ", ".join(map(str, batch.keys())) if hasattr(batch, "keys") else type(batch).__name__
            raise KeyError(
                f"causal_lm: the batch has no 'input_ids' (keys: {keys}); {_TEXT_HINT}"
            )
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch.get("attention_mask")
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        labels = batch.get("labels")
        labels = labels.to(self.device) if labels is not None else labels_from_inputs(input_ids, attention_mask)
        return input_ids, attention_mask, labels

    def loss(self, batch: Any) -> Any:
        input_ids, attention_mask, labels = self._inputs(batch)
        model = self.engine.state.models[self.model_name]
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return causal_lm_loss(logits, labels)

    # ----------------------------------------------------------------- samples
    def generate(self, prompts: list[str] | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Greedy completions of ``prompts`` (one at a time: no padding to get wrong)."""
        import torch

        model = self.engine.runtime.unwrap(self.engine.state.models[self.model_name])
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        completions = []
        try:
            with torch.no_grad():
                for prompt in prompts or self.sample_prompts:
                    encoded = tokenizer(prompt, return_tensors="pt").to(self.device)
                    output = model.generate(
                        **encoded, do_sample=False, max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=pad_id
                    )
                    completions.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
        finally:
            model.train(was_training)
        return completions

    def write_samples(self, state: Any) -> Path:
        """Write prompts and completions to ``RUN_DIR/samples/step-XXXX.txt``; returns the path."""
        path = samples_path(state, "txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        completions = self.generate()
        text = "".join(f">>> {p}\n{c}\n\n" for p, c in zip(self.sample_prompts, completions))
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
        self.engine.fire("samples_written", path=path)
        return path
