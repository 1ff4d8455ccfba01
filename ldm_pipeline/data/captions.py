"""Caption handling for training: tag shuffle, caption dropout, tokenization.

Tokenization truncates: a caption longer than the tokenizer's window (``model_max_length``, 77 for CLIP) keeps its
first tokens and is counted as ``caption_truncated`` in DataStats (a note, not a skip). That is what diffusers'
training scripts and kohya's default do; chunked long-prompt encoding (`ldm_pipeline.prompts`) is for inference.
``max_chunks > 1`` is the opt-in kohya ``max_token_length`` behaviour: up to that many windows, each wrapped in
BOS/EOS, for a text-encoder step that encodes chunks separately and concatenates them.
"""

from __future__ import annotations

import random

import torch

from ldm_pipeline.data.stats import DataStats


def shuffle_caption_tags(caption: str, rng: random.Random, keep_tags: int = 0) -> str:
    """Shuffle comma-separated tags, the first `keep_tags` staying in front (e.g. a trigger word)."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tags], tags[keep_tags:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def process_caption(caption: str, rng: random.Random, dropout: float = 0.0, shuffle_tags: bool = False,
                    keep_tags: int = 0) -> str:
    """Tag shuffle, then caption dropout: "" with probability `dropout` trains the unconditional branch
    that classifier-free guidance needs."""
    if shuffle_tags:
        caption = shuffle_caption_tags(caption, rng, keep_tags)
    if dropout > 0 and rng.random() < dropout:
        return ""
    return caption


def tokenize_captions(tokenizer, captions: list[str], max_chunks: int = 1,
                      stats: DataStats | None = None) -> torch.Tensor:
    """Captions → input_ids LongTensor [B, max_chunks * model_max_length], padded; overlong captions truncated."""
    window = int(tokenizer.model_max_length)
    if max_chunks <= 1:
        if stats is not None:
            lengths = tokenizer(captions, truncation=False, verbose=False)["input_ids"]
            stats.note("caption_truncated", sum(len(ids) > window for ids in lengths))
        return tokenizer(captions, padding="max_length", truncation=True, max_length=window,
                         return_tensors="pt").input_ids.long()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    per = window - 2
    rows, truncated = [], 0
    for ids in tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]:
        if len(ids) > per * max_chunks:
            truncated += 1
            ids = ids[: per * max_chunks]
        row: list[int] = []
        for c in range(max_chunks):
            chunk = ids[c * per : (c + 1) * per]
            row += [bos, *chunk, eos] + [pad] * (per - len(chunk))
        rows.append(row)
    if stats is not None:
        stats.note("caption_truncated", truncated)
    return torch.tensor(rows, dtype=torch.long)
