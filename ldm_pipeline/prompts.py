"""Prompts: AUTOMATIC1111-style attention weighting and long-prompt chunking, encoded to ``prompt_embeds``.

diffusers' ``encode_prompt`` truncates at the text encoder's window (77 tokens) and has no weighting, and compel's
syntax and chunking differ from A1111's, which is what users' prompts are written for. So we parse
``(word:1.3)``, ``(word)`` (×1.1), ``[word]`` (÷1.1) and ``\\(`` escapes ourselves, split the tokens into
75-token chunks each wrapped in BOS/EOS, encode every chunk, scale the embeddings by the token weights (then
restore the original mean, as A1111 does) and concatenate. A short, unweighted prompt gives exactly the tensor
diffusers' own ``encode_prompt`` gives, so results stay pixel-identical to plain diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_UP = 1.1  # A1111: (word) multiplies attention by 1.1
SQUARE_DOWN = 1 / 1.1  # [word] divides by 1.1

_TOKEN_RE = re.compile(r"\\[\\()\[\]]|\\|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs using A1111's attention syntax; unbalanced brackets are closed
    at the end (as A1111 does) rather than rejected."""
    out: list[tuple[str, float]] = []
    round_stack: list[int] = []
    square_stack: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(out)):
            out[i] = (out[i][0], out[i][1] * factor)

    for m in _TOKEN_RE.finditer(text):
        tok = m.group(0)
        weight = m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append((tok[1], 1.0))
        elif tok == "(":
            round_stack.append(len(out))
        elif tok == "[":
            square_stack.append(len(out))
        elif weight is not None and round_stack:
            scale(round_stack.pop(), float(weight))
        elif tok == ")" and round_stack:
            scale(round_stack.pop(), ROUND_UP)
        elif tok == "]" and square_stack:
            scale(square_stack.pop(), SQUARE_DOWN)
        else:
            out.append((tok, 1.0))
    for start in round_stack:
        scale(start, ROUND_UP)
    for start in square_stack:
        scale(start, SQUARE_DOWN)
    # merge neighbours with equal weight so tokenization sees whole words
    merged: list[tuple[str, float]] = []
    for frag, w in out:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + frag, w)
        else:
            merged.append((frag, w))
    return [(f, w) for f, w in merged if f] or [("", 1.0)]


@dataclass
class TokenizedPrompt:
    """Token ids (without BOS/EOS) and one weight per token."""

    ids: list[int]
    weights: list[float]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def tokenize_weighted(tokenizer, text: str) -> TokenizedPrompt:
    ids: list[int] = []
    weights: list[float] = []
    for frag, w in parse_weights(text):
        frag_ids = tokenizer(frag, add_special_tokens=False, truncation=False).input_ids
        ids += frag_ids
        weights += [w] * len(frag_ids)
    return TokenizedPrompt(ids, weights)


def chunk_window(tokenizer) -> int:
    """Tokens per chunk: the encoder's window less BOS and EOS (75 for CLIP's 77)."""
    return tokenizer.model_max_length - 2


def make_chunks(tokenizer, tp: TokenizedPrompt, num_chunks: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Cut into chunks of BOS + ≤75 tokens + EOS + padding (the layout ``tokenizer(padding="max_length")`` gives)."""
    n = chunk_window(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pieces = [(tp.ids[i : i + n], tp.weights[i : i + n]) for i in range(0, len(tp.ids), n)] or [([], [])]
    while num_chunks is not None and len(pieces) < num_chunks:
        pieces.append(([], []))
    ids, weights = [], []
    for chunk_ids, chunk_w in pieces:
        padding = n - len(chunk_ids)
        ids.append([bos] + chunk_ids + [eos] + [pad] * padding)
        weights.append([1.0] + chunk_w + [1.0] + [1.0] * padding)
    return ids, weights


def count_chunks(tokenizer, text: str) -> int:
    tp = tokenize_weighted(tokenizer, text)
    return max(1, -(-len(tp.ids) // chunk_window(tokenizer)))


def encode_chunks(text_encoder, chunk_ids: list[list[int]], clip_skip: int = 1, device=None):
    """Encode chunks like diffusers' ``encode_prompt`` (same attention mask and clip-skip rule) → [1, 77·k, D]."""
    import torch

    device = device or text_encoder.device
    embeds = []
    for ids in chunk_ids:  # one chunk per forward: identical numerics to diffusers' batch-of-one encoding
        input_ids = torch.tensor([ids], device=device)
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = torch.ones_like(input_ids)
        if clip_skip <= 1:
            out = text_encoder(input_ids, attention_mask=attention_mask)[0]
        else:
            hidden = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
            out = hidden.hidden_states[-clip_skip]
            # transformers 5 flattened CLIPTextModel (no .text_model), which breaks diffusers' own clip_skip path
            out = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out)
        embeds.append(out)
    return torch.cat(embeds, dim=1).to(dtype=text_encoder.dtype)


def apply_weights(embeds, weights: list[list[float]]):
    """Scale each token's embedding by its weight, then restore the original mean (A1111's rule)."""
    import torch

    if all(w == 1.0 for chunk in weights for w in chunk):
        return embeds
    flat = torch.tensor([w for chunk in weights for w in chunk], dtype=embeds.dtype, device=embeds.device)
    original_mean = embeds.float().mean()
    scaled = embeds * flat.reshape(1, -1, 1)
    new_mean = scaled.float().mean()
    # A1111 divides by the new mean; for encoders whose output mean is ~0 that ratio explodes, so skip it there
    if new_mean.abs() < 1e-3 * scaled.float().abs().mean() or not torch.isfinite(original_mean / new_mean):
        return scaled
    return scaled * (original_mean / new_mean).to(embeds.dtype)



def encode_prompt_pair(
    tokenizer,
    text_encoder,
    prompt: str,
    negative_prompt: str = "",
    clip_skip: int = 1,
    device=None,
    num_chunks: int | None = None,
):
    """(prompt_embeds, negative_prompt_embeds) for one prompt, padded to the same number of chunks (at least
    `num_chunks`), as A1111 pads the shorter of prompt and negative prompt with empty chunks."""
    import torch

    pos = tokenize_weighted(tokenizer, prompt)
    neg = tokenize_weighted(tokenizer, negative_prompt or "")
    n = chunk_window(tokenizer)
    chunks = max(1, num_chunks or 1, -(-len(pos.ids) // n), -(-len(neg.ids) // n))
    with torch.no_grad():
        pos_ids, pos_w = make_chunks(tokenizer, pos, chunks)
        neg_ids, neg_w = make_chunks(tokenizer, neg, chunks)
        pe = apply_weights(encode_chunks(text_encoder, pos_ids, clip_skip, device), pos_w)
        ne = apply_weights(encode_chunks(text_encoder, neg_ids, clip_skip, device), neg_w)
    return pe, ne


# --- prompt files -----------------------------------------------------------------------------------------------

# per-row fields a .jsonl/.csv prompt file may set, with the type each must have ("steps" is an alias)
ROW_FIELDS: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "num_inference_steps": int,
    "steps": int,
    "guidance_scale": float,
    "guidance_rescale": float,
    "scheduler": str,
    "eta": float,
    "height": int,
    "width": int,
    "clip_skip": int,
    "strength": float,
    "init_image": str,
    "num_images": int,
}


def read_prompt_file(path: str) -> list[dict]:
    """Rows of a prompt file: .txt gives one ``{"prompt": line}`` per non-empty line; .jsonl/.csv rows may also set
    any of `ROW_FIELDS`. Malformed rows raise a UserError naming the file and line."""
    import csv
    import json
    from pathlib import Path

    from ldm_pipeline.errors import UserError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e}") from None
    rows: list[tuple[int, dict]] = []
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {n}: not valid JSON; each line must be an object like "
                                '{"prompt": "..."}') from None
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n}: expected a JSON object with a \"prompt\" key")
            rows.append((n, row))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise UserError(f"{path}: the CSV header must have a 'prompt' column")
        for n, row in enumerate(reader, 2):
            if None in row:
                raise UserError(f"{path} line {n}: more values than header columns (quote prompts that contain commas)")
            rows.append((n, {k: v for k, v in row.items() if v not in (None, "")}))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((n, {"prompt": line.strip()}))
    out = []
    for n, row in rows:
        unknown = sorted(set(row) - set(ROW_FIELDS))
        if unknown:
            raise UserError(f"{path} line {n}: unknown field '{unknown[0]}' (known: {', '.join(ROW_FIELDS)})")
        clean = {}
        for k, v in row.items():
            want = ROW_FIELDS[k]
            try:
                if want is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError
                clean[k] = want(v) if not isinstance(v, bool) else _bad()
            except (ValueError, TypeError):
                raise UserError(f"{path} line {n}: field '{k}' must be {want.__name__}, got {v!r}") from None
        if "steps" in clean:
            clean["num_inference_steps"] = clean.pop("steps")
        if not clean.get("prompt", "").strip():
            raise UserError(f"{path} line {n}: missing or empty 'prompt'")
        out.append(clean)
    if not out:
        raise UserError(f"prompt file {path} has no prompts")
    return out


def _bad():
    raise ValueError
