import pytest
import torch

from ldm_pipeline.errors import UserError
from ldm_pipeline.prompts import (
    count_chunks,
    encode_prompt_pair,
    parse_weights,
    read_prompt_file,
    split_chunks,
    tokenize_weighted,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
        ("(big) dog", [("big", 1.1), (" dog", 1.0)]),
        ("[small] dog", [("small", 1 / 1.1), (" dog", 1.0)]),
        ("((x))", [("x", pytest.approx(1.21))]),
        (r"\(literal\) paren", [("(literal) paren", 1.0)]),
        ("(unclosed", [("unclosed", pytest.approx(1.1))]),
        ("a: b", [("a: b", 1.0)]),
        # BREAK (capitals, a whole word) as A1111's ["BREAK", -1] marker, the spaces around it dropped
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAKFAST break", [("BREAKFAST break", 1.0)]),
        ("(red BREAK blue:1.5)", [("red", 1.5), ("BREAK", -1.0), ("blue", 1.5)]),
    ],
)
def test_parse_weights(text, expected):
    got = parse_weights(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == [w for _, w in expected]


def test_short_prompt_matches_diffusers_encode_prompt(generator):
    pipe = generator.pipe
    pe, ne = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a red circle", "blurry")
    ref_pe, ref_ne = pipe.encode_prompt("a red circle", "cpu", 1, True, "blurry")
    assert torch.equal(pe, ref_pe) and torch.equal(ne, ref_ne)


def encode_alone(pipe, text):
    """diffusers' own encoding of a prompt that fits one window."""
    return pipe.encode_prompt(text, "cpu", 1, False)[0]


def test_long_prompt_is_chunked_not_truncated(generator):
    pipe = generator.pipe
    long = "cat " * 80  # 80 one-token words, no comma: chunks of 75 and 5
    assert len(tokenize_weighted(pipe.tokenizer, long).ids) == 80
    pe, ne = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, long, "")
    assert pe.shape[1] == 154
    assert ne.shape == pe.shape  # negative padded with empty chunks to the same length
    assert torch.equal(ne[:, 77:], encode_alone(pipe, ""))
    # each chunk is encoded exactly like a prompt of its own tokens
    assert torch.equal(pe[:, :77], encode_alone(pipe, "cat " * 75))
    assert torch.equal(pe[:, 77:], encode_alone(pipe, "cat " * 5))
    # so the tail beyond the first window changes the embedding (diffusers would silently drop it)
    pe2, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, long + "zebra", "")
    assert not torch.equal(pe[:, 77:], pe2[:, 77:])


def test_chunks_end_at_a_comma_within_the_last_20_tokens(generator):
    pipe = generator.pipe
    tok = pipe.tokenizer
    # comma at token 69: a full chunk would end 6 tokens after it, so the chunk ends at the comma (A1111)
    near = "cat " * 69 + ", " + "dog " * 10
    assert [len(ids) for ids, _ in split_chunks(tok, tokenize_weighted(tok, near))] == [70, 10]
    pe, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, near)
    assert torch.equal(pe[:, :77], encode_alone(pipe, "cat " * 69 + ","))
    assert torch.equal(pe[:, 77:], encode_alone(pipe, "dog " * 10))
    # comma 25 tokens back: too far, a plain 75-token cut
    far = "cat " * 50 + ", " + "dog " * 30
    assert [len(ids) for ids, _ in split_chunks(tok, tokenize_weighted(tok, far))] == [75, 6]
    # exactly 75 tokens with a comma near the end: nothing follows, so no second chunk
    assert count_chunks(tok, "cat " * 70 + ", " + "dog " * 4) == 1


def test_break_starts_a_new_chunk(generator):
    pipe = generator.pipe
    tok = pipe.tokenizer
    pe, ne = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a red circle BREAK a blue background")
    assert pe.shape[1] == 154 and ne.shape == pe.shape
    assert torch.equal(pe[:, :77], encode_alone(pipe, "a red circle"))
    assert torch.equal(pe[:, 77:], encode_alone(pipe, "a blue background"))
    assert count_chunks(tok, "a BREAK BREAK b") == 3  # an empty chunk between two BREAKs, as in A1111
    assert count_chunks(tok, "a cat BREAK") == 1 and count_chunks(tok, "BREAKFAST") == 1
    # a BREAK in a full chunk: the next token opens the next chunk either way
    assert [len(ids) for ids, _ in split_chunks(tok, tokenize_weighted(tok, "cat " * 75 + "BREAK dog"))] == [75, 1]


def test_long_negative_prompt_pads_positive(generator):
    pipe = generator.pipe
    long = " ".join(["ugly"] * 100)
    pe, ne = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", long)
    assert pe.shape == ne.shape and pe.shape[1] == 154


def test_weighting_changes_embeddings_where_it_should(generator):
    pipe = generator.pipe
    plain, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a red cat")
    up, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a (red:1.5) cat")
    down, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a [red] cat")
    assert not torch.equal(plain, up) and not torch.equal(plain, down)
    # weights scale the token embedding relative to the others: the weighted token's norm ratio grows
    red = 2  # BOS, a, red
    ratio = lambda e: (e[0, red].norm() / e[0, 1].norm()).item()  # noqa: E731
    assert ratio(up) > ratio(plain) > ratio(down)
    # mean is restored (A1111's rule)
    assert abs(up.mean().item() - plain.mean().item()) < 1e-5
    # weight 1.0 explicitly is a no-op
    same, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a (red:1.0) cat")
    assert torch.equal(same, plain)


def test_weights_rescale_each_chunk_to_its_own_mean(generator):
    from ldm_pipeline.prompts import apply_weights

    # A1111's formula on made-up embeddings with a clear mean (the tiny encoder's layer-normed output has mean ~0,
    # where the ratio is meaningless and is skipped): z * w, then * (mean before / mean after), per 77-token chunk
    z = torch.randn(1, 154, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    w = [[1.0] * 77, [1.0] * 77]
    w[1][2] = 1.5
    out = apply_weights(z, w)
    assert torch.equal(out[:, :77], z[:, :77])  # a chunk without weights is untouched
    second = z[:, 77:] * torch.tensor(w[1]).reshape(1, -1, 1)
    assert torch.allclose(out[:, 77:], second * (z[:, 77:].mean() / second.mean()), atol=1e-6)
    assert abs(out[:, 77:].mean().item() - z[:, 77:].mean().item()) < 1e-6
    # and through the encoder: weighting in the second chunk leaves the first chunk exactly as it was
    pipe = generator.pipe
    plain, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "cat " * 75 + "a red dog")
    weighted, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "cat " * 75 + "a (red:1.5) dog")
    assert torch.equal(weighted[:, :77], plain[:, :77]) and not torch.equal(weighted[:, 77:], plain[:, 77:])


def test_clip_skip_changes_embeddings(generator):
    pipe = generator.pipe
    a, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", clip_skip=1)
    b, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", clip_skip=2)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # penultimate layer
        ref = pipe.text_encoder.final_layer_norm(hidden)
    assert not torch.equal(a, b) and torch.equal(b, ref)


@pytest.mark.parametrize(
    "name, content",
    [("p.txt", "a cat\na dog\n"), ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"}\n'),
     ("p.csv", "prompt\na cat\na dog\n")],
)
def test_prompt_files_with_a_utf8_bom(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf" + content.encode())  # what Windows Notepad and Excel write
    assert read_prompt_file(str(f)) == [{"prompt": "a cat"}, {"prompt": "a dog"}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"num_images": 0}, "num_images must be at least 1"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"guidance_scale": -1}, "guidance_scale must be >= 0"),
        ({"guidance_rescale": 1.5}, r"guidance_rescale must be in \[0, 1\]"),
        ({"guidance_cutoff": 2}, r"guidance_cutoff must be in \[0, 1\]"),
        ({"eta": -0.1}, "eta must be in \\[0, 1\\]"),
        ({"clip_skip": 0}, "clip_skip must be at least 1"),
        ({"strength": 0}, r"strength must be in \(0, 1\]"),
        ({"width": -8}, "width must be positive"),
        ({"seed": -2}, r"seed must be -1 \(random\)"),
        ({"seed": 2**64}, r"seed must be -1 \(random\)"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'"),
        ({"scheduler": "euler", "eta": 0.5}, "--eta applies to the ddim scheduler only"),
        ({"steps": 10, "strength": 0.05}, r"strength 0.05 × 10 steps leaves no denoising step"),
    ],
)
def test_prompt_file_rows_follow_the_flag_rules(tmp_path, row, message):
    import json

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "a cat", **row}) + "\n")
    with pytest.raises(UserError, match=f"p.jsonl line 2: {message}"):
        read_prompt_file(str(f))


def test_prompt_file_row_seed_minus_one_is_allowed(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,seed\na cat,-1\n")
    assert read_prompt_file(str(f)) == [{"prompt": "a cat", "seed": -1}]


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n# comment\na dog\n")
    assert read_prompt_file(str(txt)) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "seed": 3, "steps": 4, "negative_prompt": "x"}\n"a dog"\n')
    rows = read_prompt_file(str(jl))
    assert rows[0] == {"prompt": "a cat", "seed": 3, "num_inference_steps": 4, "negative_prompt": "x"}
    assert rows[1] == {"prompt": "a dog"}
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,guidance_scale\n"a cat, red",5,3.5\na dog,,\n')
    assert read_prompt_file(str(csv)) == [{"prompt": "a cat, red", "seed": 5, "guidance_scale": 3.5}, {"prompt": "a dog"}]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n\n", "has no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{not json\n', "line 2: not valid JSON"),
        ("badtype.jsonl", '{"prompt": "ok", "seed": "abc"}\n', "field 'seed' must be int"),
        ("unknown.jsonl", '{"prompt": "ok", "colour": 1}\n', "unknown field 'colour'"),
        ("noprompt.jsonl", '{"seed": 1}\n', "missing or empty 'prompt'"),
        ("nohdr.csv", "text\nhello\n", "'prompt' column"),
        ("extra.csv", "prompt\na, b,c\n", "more values than header"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        read_prompt_file(str(f))
