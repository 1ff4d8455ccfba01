"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt that transformers' CLIPTokenizer loads).

This world has no model hub, so models made here (``ldm init-model``, the shipped shapes model) need a tokenizer
built locally: the `tokenizers` library trains the merges, and the byte alphabet is always complete, so any text
tokenizes (rare words fall back to single characters instead of <unk>).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ldm_pipeline.errors import UserError
from ldm_pipeline.files import CACHE_DIR, make_temp_dir

ASSETS = Path(__file__).resolve().parent / "assets"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's table of 256 printable stand-ins for raw bytes (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 77):
    """Train a BPE vocabulary on `texts` and save it as a CLIPTokenizer folder; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
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


def clip_tokenizer_dir(name: str = "clip-vit-large-patch14") -> Path:
    """A CLIPTokenizer folder for OpenAI CLIP's vocabulary, built offline from the BPE merges that ship with us.

    CLIP's vocab.json is a pure function of its merges file (the construction in openai/CLIP's
    simple_tokenizer.py); we ship that file (from open_clip, MIT) because no hub is reachable here.
    ``...-pad0`` is SD 2.x's variant, which pads with "!" (id 0) instead of <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    out = CACHE_DIR / "tokenizers" / name
    if (out / "tokenizer_config.json").is_file():
        return out
    merges = gzip.open(ASSETS / "clip" / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [v + "</w>" for v in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = make_temp_dir(out.parent, prefix=".tok-")
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    pad = "!" if name.endswith("-pad0") else "<|endoftext|>"
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad, model_max_length=77)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(name_or_path: str):
    """A CLIPTokenizer from a folder, or one of the built-in CLIP vocabularies by name."""
    from transformers import CLIPTokenizer

    path = Path(name_or_path)
    if not path.is_dir():
        if not name_or_path.startswith("clip-vit-large-patch14"):
            raise UserError(f"tokenizer '{name_or_path}' not found: pass a folder or clip-vit-large-patch14")
        path = clip_tokenizer_dir(name_or_path)
    return CLIPTokenizer.from_pretrained(path)
