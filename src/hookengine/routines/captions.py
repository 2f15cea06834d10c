"""Captions to text conditioning: kohya's caption tricks and diffusers' prompt encoding.

Two jobs, kept apart from the diffusion loss:

- :func:`prepare_captions`: caption dropout (the caption becomes the empty prompt) and
  kohya's ``shuffle_caption`` with ``keep_tokens``, each sample drawn from
  ``(seed, step, rank, position)`` so a resumed run sees the same captions;
- :class:`TextEncoders`: the pipeline's tokenizer(s) and text encoder(s), as diffusers'
  examples call them: ``tokenizer(..., padding="max_length",
  max_length=tokenizer.model_max_length, truncation=True)`` then ``text_encoder(ids)[0]``
  (SD 1.x / 2.x), or, with two of each (SDXL), the penultimate hidden states of both
  concatenated and the pooled output of the last (``train_text_to_image_sdxl.py``'s
  ``encode_prompt``). With frozen encoders the empty prompt is encoded once, and every
  caption is remembered when asked: in memory (``cache=True``) or in safetensors files
  (``store=``, keyed by the caption and ``encoder_key``, the encoders' content digest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["TextEncoders", "TextEmbeddings", "prepare_captions", "shuffle_tags", "caption_rng", "tokenizer_identity"]


def caption_rng(seed: int, step: int, rank: int, position: int) -> Any:
    """A numpy generator for one sample's caption draws (dropout, then the shuffle)."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(rank), int(position)])


def shuffle_tags(caption: str, keep_tokens: int, separator: str, rng: Any) -> str:
    """kohya's ``shuffle_caption``: split on ``separator``, keep the first ``keep_tokens``
    tags in place, shuffle the rest, join with ``", "`` (as sd-scripts does)."""
    tags = [t.strip() for t in caption.strip().split(separator)]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(flex)) if flex else []
    return ", ".join(fixed + [flex[i] for i in order])


def prepare_captions(
    captions: Sequence[Any],
    *,
    seed: int,
    step: int,
    rank: int = 0,
    dropout: float = 0.0,
    shuffle: bool = False,
    keep_tokens: int = 0,
    separator: str = ",",
) -> list[str]:
    """The captions a training batch is conditioned on (``None`` counts as empty).

    Deterministic in ``(seed, step, rank, position)``: no global random state is read or
    advanced, so the noise and timestep draws are the same with or without these options.
    """
    out = []
    for position, caption in enumerate(captions):
        text = "" if caption is None else str(caption)
        if not dropout and not shuffle:
            out.append(text)
            continue
        rng = caption_rng(seed, step, rank, position)
        if dropout and rng.random() < dropout:
            out.append("")
        elif shuffle and text:
            out.append(shuffle_tags(text, keep_tokens, separator, rng))
        else:
            out.append(text)
    return out


def tokenizer_identity(tokenizer: Any) -> str:
    """What a tokenizer does, as text: its class, maximum length and, for a fast tokenizer,
    its whole definition (vocabulary, merges, normalizer), else its sorted vocabulary."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'model_max_length', None)}:{body}"


@dataclass
class TextEmbeddings:
    """What the denoiser is conditioned on: ``hidden`` (``B, L, D``) and, for SDXL-style
    pipelines, ``pooled`` (``B, D2``)."""

    hidden: Any
    pooled: Any = None


class TextEncoders:
    """One or two (tokenizer, text encoder) pairs that turn captions into embeddings.

    Args:
        tokenizers: the tokenizers, in the pipeline's order (``tokenizer``, ``tokenizer_2``).
        encoders: the text encoders, same order.
        device: where the token ids go.
        frozen: the encoders are not trained: encode under ``no_grad`` and allow reuse.
        cache: remember the embedding of every caption in memory (needs ``frozen``).
        store: a :class:`~hookengine.data.latent_cache.LatentCache`: embeddings are read
            from and written to it instead (needs ``frozen``; not kept in memory).
        encoder_key: what identifies the encoders and tokenizers in ``store``'s keys
            (their content digest).
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], device: Any, frozen: bool = True,
                 cache: bool = False, store: Any = None, encoder_key: str = "") -> None:
        if len(tokenizers) != len(encoders) or not tokenizers:
            raise ValueError(f"text encoding needs one tokenizer per text encoder, got {len(tokenizers)} and {len(encoders)}")
        if store is not None and not encoder_key:
            raise ValueError("text embeddings stored on disk need an encoder_key (the encoders' content digest)")
        self.tokenizers, self.encoders = list(tokenizers), list(encoders)
        self.device, self.frozen = device, frozen
        self.store = store if frozen else None
        self.cache = cache and frozen and self.store is None
        self.encoder_key = encoder_key
        self.memo: dict[str, tuple[Any, Any]] = {}

    @property
    def dual(self) -> bool:
        """Two encoders: SDXL-style (penultimate hidden states, pooled output)."""
        return len(self.encoders) > 1

    def tokenize(self, captions: Sequence[str]) -> list[Any]:
        """Token ids of each tokenizer, as diffusers' examples tokenize (``B, model_max_length``)."""
        return [
            tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for tokenizer in self.tokenizers
        ]

    def _run(self, captions: Sequence[str]) -> TextEmbeddings:
        import contextlib

        import torch

        ids = self.tokenize(captions)
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            if not self.dual:
                return TextEmbeddings(self.encoders[0](ids[0].to(self.device), return_dict=False)[0])
            hidden, pooled = [], None
            for encoder, token_ids in zip(self.encoders, ids):
                out = encoder(token_ids.to(self.device), output_hidden_states=True, return_dict=False)
                pooled = out[0]  # only the last encoder's pooled output counts
                hidden.append(out[-1][-2])
            return TextEmbeddings(torch.cat(hidden, dim=-1), pooled.view(pooled.shape[0], -1))

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embeddings of ``captions``; the empty prompt (and, with ``cache``, every caption)
        is encoded once while the encoders are frozen."""
        import torch

        if not self.frozen:
            return self._run(captions)
        fresh = [c for c in dict.fromkeys(captions) if c not in self.memo]
        found: dict[str, tuple[Any, Any]] = {}
        if self.store is not None:
            fresh = [c for c in fresh if not self._stored(c, found)]
        if fresh:
            out = self._run(fresh)
            for row, caption in enumerate(fresh):
                pooled = out.pooled[row] if out.pooled is not None else None
                found[caption] = (out.hidden[row], pooled)
                if self.cache or caption == "":
                    self.memo[caption] = found[caption]
                if self.store is not None:
                    self.store.put(self._key(caption), {"hidden": found[caption][0]}
                                   | ({"pooled": pooled} if pooled is not None else {}))
        rows = [self.memo.get(c) or found[c] for c in captions]
        hidden = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return TextEmbeddings(hidden, pooled)

    def _key(self, caption: str) -> str:
        from ..data.latent_cache import text_key

        return text_key(caption, self.encoder_key, dual=self.dual)

    def _stored(self, caption: str, found: dict[str, tuple[Any, Any]]) -> bool:
        """Read ``caption``'s embedding from the store into ``found``; whether it was there."""
        entry = self.store.get(self._key(caption))
        if entry is None or "hidden" not in entry or self.dual != ("pooled" in entry):
            return False
        pooled = entry.get("pooled")
        found[caption] = (entry["hidden"].to(self.device), None if pooled is None else pooled.to(self.device))
        if caption == "":  # the empty prompt stays in memory, as without the store
            self.memo[caption] = found[caption]
        return True
