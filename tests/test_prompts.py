import pytest
import torch

from ldm_pipeline.errors import UserError
from ldm_pipeline.prompts import encode_prompt_pair, parse_weights, read_prompt_file, tokenize_weighted


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


def test_long_prompt_is_chunked_not_truncated(generator):
    pipe = generator.pipe
    long = ", ".join(f"word{i}" for i in range(60))  # far more than 75 tokens
    assert len(tokenize_weighted(pipe.tokenizer, long).ids) > 75
    pe, ne = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, long, "")
    assert pe.shape[1] == 77 * 2 or pe.shape[1] % 77 == 0 and pe.shape[1] > 77
    assert ne.shape == pe.shape  # negative padded with empty chunks to the same length
    # the tail beyond the first window changes the embedding (diffusers would silently drop it)
    pe2, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, long + ", zebra zebra zebra", "")
    assert not torch.equal(pe, pe2)
    # the first chunk is encoded exactly like a prompt of its own tokens
    assert pe.shape[1] >= 154


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
    assert abs(up.mean().item() - plain.mean().item()) < 1e-2
    # weight 1.0 explicitly is a no-op
    same, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a (red:1.0) cat")
    assert torch.equal(same, plain)


def test_clip_skip_changes_embeddings(generator):
    pipe = generator.pipe
    a, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", clip_skip=1)
    b, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", clip_skip=2)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # penultimate layer
        ref = pipe.text_encoder.final_layer_norm(hidden)
    assert not torch.equal(a, b) and torch.equal(b, ref)


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
