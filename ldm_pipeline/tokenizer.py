"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt that transformers' CLIPTokenizer loads).

This world has no model hub, so models made here (``ldm init-model``, the shipped shapes model) need a tokenizer
built locally: the `tokenizers` library trains the merges, and the byte alphabet is always complete, so any text
tokenizes (rare words fall back to single characters instead of <unk>).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """CLIP's bytes_to_unicode table: the 256 printable stand-ins for raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_clip_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 77):
    """Train a BPE vocabulary on `texts` and save it as a CLIPTokenizer folder; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    # CLIP lower-cases and splits on words / digits / punctuation; ByteLevel maps bytes to the same stand-ins.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 2 * len(alphabet) + 2),
        special_tokens=[],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator((t.lower() for t in texts), trainer=trainer)
    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    # CLIP's vocab: every byte char alone and as a word end, then merges in order, then the two special tokens.
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    vocab += [BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
