"""Prompts: AUTOMATIC1111-style attention weighting and long-prompt chunking, encoded to ``prompt_embeds``.

diffusers' ``encode_prompt`` truncates at the text encoder's window (77 tokens) and has no weighting, and compel's
syntax and chunking differ from A1111's, which is what users' prompts are written for. So we follow A1111's
``prompt_parser.parse_prompt_attention`` and ``sd_hijack_clip.tokenize_line``: parse ``(word:1.3)``, ``(word)``
(×1.1), ``[word]`` (÷1.1), ``\\(`` escapes and ``BREAK`` (starts a new chunk); split the tokens into 75-token
chunks, moving the words after the last comma into the next chunk when that comma is within the last 20 tokens
(A1111's ``comma_padding_backtrack``); wrap each chunk in BOS/EOS, encode it, scale its embeddings by the token
weights and restore the chunk's original mean (A1111's "Original" emphasis), and concatenate the chunks. A short,
unweighted prompt gives exactly the tensor diffusers' own ``encode_prompt`` gives, so results stay pixel-identical
to plain diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ldm_pipeline.settings import check_eta, check_img2img_steps, check_setting

ROUND_UP = 1.1  # A1111: (word) multiplies attention by 1.1
SQUARE_DOWN = 1 / 1.1  # [word] divides by 1.1
BREAK = ("BREAK", -1.0)  # parse_weights' marker for the BREAK keyword (A1111's ["BREAK", -1])
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_TOKEN_RE = re.compile(r"\\[\\()\[\]]|\\|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111's re_break: the word BREAK, in capitals


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs using A1111's attention syntax, with `BREAK` entries where
    the prompt says BREAK; unbalanced brackets are closed at the end (as A1111 does) rather than rejected. Unlike
    A1111, a BREAK inside brackets still breaks (A1111 would scale its marker and encode the word "BREAK")."""
    out: list[tuple[str, float]] = []
    round_stack: list[int] = []
    square_stack: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(out)):
            if out[i] is not BREAK:
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
            for k, part in enumerate(_BREAK_RE.split(tok)):
                if k:
                    out.append(BREAK)
                out.append((part, 1.0))
    for start in round_stack:
        scale(start, ROUND_UP)
    for start in square_stack:
        scale(start, SQUARE_DOWN)
    # merge neighbours with equal weight so tokenization sees whole words
    merged: list[tuple[str, float]] = []
    for item in out:
        if merged and item is not BREAK and merged[-1] is not BREAK and merged[-1][1] == item[1]:
            merged[-1] = (merged[-1][0] + item[0], item[1])
        else:
            merged.append(item)
    return [item for item in merged if item[0]] or [("", 1.0)]


@dataclass
class TokenizedPrompt:
    """Token ids (without BOS/EOS), one weight per token, and the token positions where a BREAK starts a new
    chunk (one entry per BREAK, so repeated BREAKs give empty chunks, as in A1111)."""

    ids: list[int]
    weights: list[float]
    breaks: list[int] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def tokenize_weighted(tokenizer, text: str) -> TokenizedPrompt:
    """Each weighted fragment tokenized on its own (as A1111 does), concatenated."""
    tp = TokenizedPrompt([], [])
    for frag, w in parse_weights(text):
        if (frag, w) == BREAK:
            tp.breaks.append(len(tp.ids))
            continue
        frag_ids = tokenizer(frag, add_special_tokens=False, truncation=False).input_ids
        tp.ids += frag_ids
        tp.weights += [w] * len(frag_ids)
    return tp


def chunk_window(tokenizer) -> int:
    """Tokens per chunk: the encoder's window less BOS and EOS (75 for CLIP's 77)."""
    return tokenizer.model_max_length - 2


def _comma_id(tokenizer) -> int | None:
    cid = tokenizer.convert_tokens_to_ids(",</w>")
    return None if cid is None or cid == tokenizer.unk_token_id else cid


def split_chunks(tokenizer, tp: TokenizedPrompt, backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """(ids, weights) of each chunk of at most 75 tokens, split as A1111's ``tokenize_line`` does: a BREAK closes
    the chunk; a full chunk whose last comma is at most `backtrack` tokens from its end moves the tokens after
    that comma into the next chunk (only when more tokens follow)."""
    n = chunk_window(tokenizer)
    comma = _comma_id(tokenizer)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    breaks = list(tp.breaks)

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for pos, (tok, w) in enumerate(zip(tp.ids, tp.weights)):
        while breaks and breaks[0] == pos:
            breaks.pop(0)
            close()
        if tok == comma:
            last_comma = len(ids)
        elif backtrack and len(ids) == n and last_comma != -1 and len(ids) - last_comma <= backtrack:
            cut = last_comma + 1
            moved_ids, moved_weights = ids[cut:], weights[cut:]
            ids, weights = ids[:cut], weights[:cut]
            close()
            ids, weights = moved_ids, moved_weights
        if len(ids) == n:
            close()
        ids.append(tok)
        weights.append(w)
    for _ in breaks:  # BREAKs after the last token
        close()
    if ids or not chunks:
        close()
    return chunks


def make_chunks(tokenizer, tp: TokenizedPrompt, num_chunks: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Chunks (`split_chunks`) as BOS + ≤75 tokens + EOS + padding (the layout ``tokenizer(padding="max_length")``
    gives), with empty chunks added up to `num_chunks`."""
    n = chunk_window(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pieces = split_chunks(tokenizer, tp)
    while num_chunks is not None and len(pieces) < num_chunks:
        pieces.append(([], []))
    ids, weights = [], []
    for chunk_ids, chunk_w in pieces:
        padding = n - len(chunk_ids)
        ids.append([bos] + chunk_ids + [eos] + [pad] * padding)
        weights.append([1.0] + chunk_w + [1.0] + [1.0] * padding)
    return ids, weights


def count_chunks(tokenizer, text: str) -> int:
    """How many 77-token chunks `text` encodes to."""
    return len(split_chunks(tokenizer, tokenize_weighted(tokenizer, text)))


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


def encode_xl_tokens(text_encoders, input_ids, clip_skip: int = 1):
    """SDXL conditioning from token ids of each of its two tokenizers ([B, 77] each): both encoders' hidden states
    at the penultimate layer (``clip_skip`` N reads N-1 layers earlier: diffusers' ``clip_skip=N-1``, no final layer
    norm), concatenated along the features, and the second encoder's projected pooled embedding → ([B, 77, D1+D2],
    [B, P]). As diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes them, so shared by generation and
    training."""
    import torch

    hidden, pooled = [], None
    for te, ids in zip(text_encoders, input_ids):
        out = te(ids.to(te.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out[0]  # CLIPTextModelWithProjection's text_embeds (the last encoder's)
    return torch.cat(hidden, dim=-1), pooled


def apply_weights(embeds, weights: list[list[float]]):
    """Scale each token's embedding by its weight, then rescale each chunk so its mean is the chunk's original
    mean (A1111's "Original" emphasis, which runs per 77-token chunk); chunks without weights are untouched."""
    import torch

    out = []
    for c, chunk_w in enumerate(weights):
        z = embeds[:, c * len(chunk_w) : (c + 1) * len(chunk_w)]
        if all(w == 1.0 for w in chunk_w):
            out.append(z)
            continue
        original_mean = z.float().mean()
        scaled = z * torch.tensor(chunk_w, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
        new_mean = scaled.float().mean()
        # A1111 divides by the new mean unguarded; where it is ~0 the ratio explodes, so keep the scaled chunk there
        if new_mean.abs() < 1e-3 * scaled.float().abs().mean() or not torch.isfinite(original_mean / new_mean):
            out.append(scaled)
        else:
            out.append(scaled * (original_mean / new_mean).to(z.dtype))
    return torch.cat(out, dim=1)


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
    chunks = max(num_chunks or 1, len(split_chunks(tokenizer, pos)), len(split_chunks(tokenizer, neg)))
    with torch.no_grad():
        pos_ids, pos_w = make_chunks(tokenizer, pos, chunks)
        neg_ids, neg_w = make_chunks(tokenizer, neg, chunks)
        pe = apply_weights(encode_chunks(text_encoder, pos_ids, clip_skip, device), pos_w)
        ne = apply_weights(encode_chunks(text_encoder, neg_ids, clip_skip, device), neg_w)
    return pe, ne


def encode_prompt_pair_xl(
    tokenizers,
    text_encoders,
    prompt: str,
    negative_prompt: str = "",
    clip_skip: int = 1,
    device=None,
    num_chunks: int | None = None,
    zero_empty_negative: bool = True,
):
    """SDXL's (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) for one prompt, A1111's way: each
    encoder chunks and weights the prompt on its own (emphasis restores each encoder's chunk mean), their hidden
    states are concatenated per token, and the pooled embedding is the second encoder's for the first chunk. An
    empty negative prompt is zeros when the model says so (``force_zeros_for_empty_prompt``, as diffusers does
    for SDXL base). A short unweighted prompt gives exactly diffusers' ``encode_prompt`` tensors."""
    import torch

    texts = [prompt, negative_prompt or ""]
    parsed = [[tokenize_weighted(tok, t) for tok in tokenizers] for t in texts]
    chunks = max([num_chunks or 1] + [len(split_chunks(tok, tp)) for row in parsed
                                       for tok, tp in zip(tokenizers, row)])
    out = []
    with torch.no_grad():
        for row in parsed:
            hidden, pooled = [], None
            for tok, te, tp in zip(tokenizers, text_encoders, row):
                ids, weights = make_chunks(tok, tp, chunks)
                per_chunk = [encode_xl_tokens([te], [torch.tensor([c], device=device or te.device)], clip_skip)
                             for c in ids]
                hidden.append(apply_weights(torch.cat([h for h, _ in per_chunk], dim=1), weights))
                pooled = per_chunk[0][1]  # the last encoder's, first chunk
            dtype = text_encoders[-1].dtype
            out.append((torch.cat(hidden, dim=-1).to(dtype), pooled))
    (pe, pooled), (ne, neg_pooled) = out
    if zero_empty_negative and not (negative_prompt or ""):
        ne, neg_pooled = torch.zeros_like(ne), torch.zeros_like(neg_pooled)
    return pe, ne, pooled, neg_pooled


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
    "guidance_cutoff": float,
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
    """Rows of a prompt file (UTF-8, a byte-order mark is skipped): .txt gives one ``{"prompt": line}`` per
    non-empty line; .jsonl/.csv rows may also set any of `ROW_FIELDS`, each checked by the rule of its flag.
    Malformed rows and values out of range raise a UserError naming the file and line."""
    import csv
    import json
    from pathlib import Path

    from ldm_pipeline.errors import UserError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # Notepad and Excel start UTF-8 files with a BOM
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
        if problem := _check_row(clean):
            raise UserError(f"{path} line {n}: {problem}")
        out.append(clean)
    if not out:
        raise UserError(f"prompt file {path} has no prompts")
    return out


def _bad():
    raise ValueError


def _check_row(row: dict) -> str | None:
    """The first out-of-range value of a row, by the same rules as the command-line flags."""
    from ldm_pipeline.schedulers import SCHEDULERS

    for k, v in row.items():
        if problem := check_setting(k, v):
            return f"{'steps' if k == 'num_inference_steps' else k} {problem}"
    if "scheduler" in row and row["scheduler"] not in SCHEDULERS:
        return f"unknown scheduler '{row['scheduler']}': choose one of {', '.join(SCHEDULERS)}"
    if problem := check_eta(row.get("eta"), row.get("scheduler")):
        return problem
    if "num_inference_steps" in row and "strength" in row:
        return check_img2img_steps(row["num_inference_steps"], row["strength"])
    return None
