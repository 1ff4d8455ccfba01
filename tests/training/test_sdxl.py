"""`ldm train` on SDXL-architecture models (tiny_sdxl): size/crop and pooled conditioning, both text encoders, the
latent cache, LoRA files for diffusers and A1111/ComfyUI, exact resume, and the shipped SDXL recipes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm_pipeline.training import load_train_config, train, xl
from ldm_pipeline.training import lora as lora_mod
from ldm_pipeline.training.step import TrainHooks
from tests.training.conftest import load_weights

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# sample i is SIZES[i % 4] in shard i % 2: each shard has squares and 101x64 images, which a 64x64 crop cuts off
# centre by an odd margin (left 18, mirrored 19) and bucketing puts in a wide bucket
SIZES = ((64, 64), (64, 64), (101, 64), (101, 64))


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory) -> Path:
    from ldm_pipeline.models import init_model

    return init_model("tiny_sdxl", tmp_path_factory.mktemp("models") / "tiny_sdxl", seed=0)


@pytest.fixture(scope="module")
def xl_data(tmp_path_factory) -> Path:
    from tests.fixtures import write_laion_fixture

    out = tmp_path_factory.mktemp("xl_data")
    write_laion_fixture(out, n=8, shards=2, sizes=SIZES)
    return out


def xl_config(model, data, out, **overrides):
    """tiny_test on tiny_sdxl at 64 px, 2 samples per optimizer step, no EMA and no pipeline in checkpoints (each
    save costs); dotted keys as ``data__x``."""
    layer: dict = {"model": str(model), "output_dir": str(out), "data": {"source": str(data), "resolution": 64},
                   "batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "checkpoint_every": 0,
                   "report_to": "none", "lr_scheduler": "constant", "train_text_encoder": False,
                   "ema": {"enabled": False}, "checkpoint_pipeline": False}
    for k, v in overrides.items():
        node = layer
        *parents, last = k.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return load_train_config("tiny_test", layer)


def changed_components(a: dict, b: dict) -> set[str]:
    return {k.split("/")[0] for k in a if not torch.equal(a[k], b[k])}


def test_add_time_ids_are_each_samples_size_crop_and_the_batch_size():
    ids = xl.add_time_ids(torch.tensor([[48, 64], [3000, 2000]]), torch.tensor([[0, 8], [5, 0]]), (64, 96))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[48, 64, 0, 8, 64, 96], [3000, 2000, 5, 0, 64, 96]]
    # the target is the batch's pixel size (its bucket), read off the latents: 8 pixels per latent for SDXL's VAE
    run = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512])),
                          accelerator=SimpleNamespace(device=torch.device("cpu")), weight_dtype=torch.float32)
    batch = {"prompt_embeds": torch.zeros(2, 77, 64), "pooled_prompt_embeds": torch.ones(2, 32),
             "original_sizes": torch.tensor([[48, 64], [64, 64]]), "crop_top_lefts": torch.tensor([[0, 8], [0, 0]])}
    hidden, added = xl.unet_conditioning(run, batch, torch.zeros(2, 4, 12, 16))
    assert hidden.shape == (2, 77, 64) and torch.equal(added["text_embeds"], torch.ones(2, 32))
    assert added["time_ids"].tolist() == [[48, 64, 0, 8, 96, 128], [64, 64, 0, 0, 96, 128]]


def test_vae_encodes_in_fp32_only_for_sdxl_under_fp16():
    vae = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    assert xl.vae_encode_dtype(vae, torch.float16, xl=True) == torch.float32  # SDXL's VAE overflows in fp16
    assert xl.vae_encode_dtype(vae, torch.bfloat16, xl=True) == torch.bfloat16
    assert xl.vae_encode_dtype(vae, torch.float16, xl=False) == torch.float16  # SD 1.x/2.x as before
    fixed = SimpleNamespace(config=SimpleNamespace(force_upcast=False))  # e.g. madebyollin's fp16-fix VAE
    assert xl.vae_encode_dtype(fixed, torch.float16, xl=True) == torch.float16


def test_fp16_run_keeps_sdxls_vae_in_fp32_and_fp32_copies_of_frozen_encoders(xl_model):
    """The module placement of an fp16 run (faked on the CPU: the dtype only): the VAE stays fp32 and encodes fp32
    pixels, the frozen text encoders run in fp16 with fp32 copies kept for saving, the trained UNet is fp32."""
    from ldm_pipeline.models import load_pipeline
    from ldm_pipeline.training import setup, step

    pipe, info = load_pipeline(str(xl_model))
    config = xl_config(xl_model, "unused", "unused")
    run = setup.Run(config, SimpleNamespace(device=torch.device("cpu")), Path("unused"), info, pipe, pipe.unet,
                    pipe.vae, pipe.text_encoder, pipe.tokenizer, None, torch.float16, None, 0.0,
                    text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    setup._place_modules(run)
    assert run.vae_dtype == torch.float32 and run.vae.dtype == torch.float32 and "vae" not in run.fp32_copies
    assert run.text_encoder_2.dtype == torch.float16 and run.fp32_copies["text_encoder_2"].dtype == torch.float32
    assert run.unet.dtype == torch.float32
    latents = step.encode_latents(run, {"pixel_values": torch.zeros(1, 3, 64, 64)}, torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 16, 16) and latents.dtype == torch.float32


def test_stream_gives_both_tokenizers_ids_and_drops_captions_for_both(xl_model, xl_data):
    from transformers import CLIPTokenizer

    from ldm_pipeline.data import DataConfig, build_dataset

    tok, tok2 = (CLIPTokenizer.from_pretrained(str(xl_model / name)) for name in ("tokenizer", "tokenizer_2"))
    cfg = DataConfig(source=str(xl_data), resolution=64, num_workers=0, shuffle=False)
    batch = next(iter(build_dataset(cfg, 8, tokenizer=tok, tokenizer_2=tok2)))
    assert batch["input_ids"].shape == batch["input_ids_2"].shape == (8, 77)
    n = int((batch["input_ids_2"][0] != 0).sum())  # BOS, the caption's tokens, EOS; then "!" (id 0) padding
    assert torch.equal(batch["input_ids"][0, :n], batch["input_ids_2"][0, :n])  # same tokens, other padding
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all() and (batch["input_ids_2"][0, n:] == 0).all()
    wide = batch["original_sizes"][:, 1] == 101  # (h, w) before resizing; crop (top, left) of the resized image
    assert batch["crop_top_lefts"][wide].tolist() == [[0, 18]] * int(wide.sum())
    dropped = next(iter(build_dataset(DataConfig(source=str(xl_data), resolution=64, num_workers=0,
                                                 caption_dropout=1.0), 2, tokenizer=tok, tokenizer_2=tok2)))
    empty = [t([""], padding="max_length", max_length=77, return_tensors="pt").input_ids for t in (tok, tok2)]
    assert torch.equal(dropped["input_ids"], empty[0].expand(2, 77))
    assert torch.equal(dropped["input_ids_2"], empty[1].expand(2, 77))


def test_full_fine_tune_of_unet_and_both_text_encoders_with_buckets(xl_model, xl_data, tmp_path, monkeypatch):
    """UNet and both text encoders train (EMA over all three, gradient checkpointing on), each batch's time ids end in
    its bucket's size, and final/ and the checkpoint's pipeline/ are SDXL pipelines."""
    from diffusers import StableDiffusionXLPipeline

    from ldm_pipeline.models import is_xl, load_pipeline

    seen = []
    real = xl.unet_conditioning

    def spy(run, batch, latents):
        hidden, added = real(run, batch, latents)
        seen.append((tuple(batch["pixel_values"].shape[-2:]), added["time_ids"]))
        return hidden, added

    monkeypatch.setattr(xl, "unet_conditioning", spy)
    ema_covers = []

    def on_end(run, state):
        trained = {id(p) for p in run.trained_params}
        ema_covers.append(len(run.ema.shadow_params) == len(run.trained_params)
                          and all(id(p) in trained for p in run.text_encoder_2.parameters() if p.requires_grad))
        ema_covers.append(all(getattr(te, "gradient_checkpointing", False) or
                              any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
                              for te in run.text_encoders().values()))

    out = tmp_path / "ft"
    train(xl_config(xl_model, xl_data, out, train_text_encoder=True, learning_rate=1e-2, gradient_checkpointing=True,
                    checkpoint_every=2, checkpoint_pipeline=True, ema__enabled=True, data__bucketing=True,
                    data__bucket_step=16,
                    data__shuffle=False, data__random_flip=True), hooks=TrainHooks(on_end=on_end))
    assert ema_covers == [True, True]
    assert {shape for shape, _ in seen} == {(64, 64), (48, 80)}  # square and wide buckets
    for (h, w), time_ids in seen:
        assert (time_ids[:, 4:] == torch.tensor([float(h), float(w)])).all()
    assert changed_components(load_weights(out / "final_raw"), load_weights(xl_model)) == set(COMPONENTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "final"), local_files_only=True)
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2.pad_token == "!"
    ckpt, _ = load_pipeline(str(out / "checkpoint-2" / "pipeline"))
    assert is_xl(ckpt)
    assert "UNet and both text encoders" in (out / "final" / "README.md").read_text()


def test_cached_run_optimises_the_same_objective(xl_model, xl_data, tmp_path):
    """Same seed, same batches: the cached run's losses are the uncached run's, and the cache holds both encoders'
    hidden states, the pooled embedding, the empty prompt's and each sample's size and (mirrored) crop."""
    from safetensors import safe_open

    from ldm_pipeline.training import caching

    common = dict(data__shuffle=False)
    live = train(xl_config(xl_model, xl_data, tmp_path / "live", **common))
    cached = train(xl_config(xl_model, xl_data, tmp_path / "cached", cache_latents=True, **common))
    np.testing.assert_allclose([v for _, v in cached.losses], [v for _, v in live.losses], rtol=1e-5)

    flip = train(xl_config(xl_model, xl_data, tmp_path / "flip", cache_latents=True, data__random_flip=True,
                           data__caption_dropout=0.5))
    assert flip.global_step == 2
    rank_dir = tmp_path / "flip" / "cache" / "rank0of1"
    manifest = json.loads((rank_dir / "manifest.json").read_text())
    with safe_open(str(rank_dir / manifest["shards"][0]), framework="pt") as f:
        assert {"input_ids_2", "pooled_prompt_embeds", "original_sizes", "crop_top_lefts_flip"} <= set(f.keys())
        assert f.get_tensor("prompt_embeds").shape[1:] == (77, 80)  # 32 + 48 features
        sizes, crops, mirrored = (f.get_tensor(k) for k in ("original_sizes", "crop_top_lefts", "crop_top_lefts_flip"))
    wide = sizes[:, 1] == 101
    assert crops[wide, 1].unique().tolist() == [18] and mirrored[wide, 1].unique().tolist() == [19]
    with safe_open(str(rank_dir / "empty.safetensors"), framework="pt") as f:
        assert {"input_ids", "input_ids_2", "prompt_embeds", "pooled_prompt_embeds"} == set(f.keys())

    pipe = _fresh(xl_model)
    base = caching.encoders_hash(pipe.vae, pipe.text_encoder, pipe.tokenizer, True, pipe.text_encoder_2,
                                 pipe.tokenizer_2)
    assert base != caching.encoders_hash(pipe.vae, pipe.text_encoder, pipe.tokenizer, True)
    with torch.no_grad():
        pipe.text_encoder_2.text_model.final_layer_norm.weight.add_(1.0)
    assert base != caching.encoders_hash(pipe.vae, pipe.text_encoder, pipe.tokenizer, True, pipe.text_encoder_2,
                                         pipe.tokenizer_2)


def _fresh(model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(model), local_files_only=True, add_watermarker=False)


def _generate(pipe) -> np.ndarray:
    return pipe("sample 1, tag1, color1", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_lora_files_for_diffusers_and_kohya_load_alike(xl_model, xl_data, tmp_path):
    """final/ has diffusers' file and a kohya copy (lora_unet_/lora_te1_/lora_te2_ keys with the trained alpha):
    either, loaded into a fresh StableDiffusionXLPipeline, draws the same image, unlike the base model."""
    from safetensors import safe_open

    from ldm_pipeline.cli.train import main

    out = tmp_path / "lora"
    assert main(["--config", "tiny_test", "--model", str(xl_model), "--data", str(xl_data), "--output-dir", str(out),
                 "--resolution", "64", "--max-steps", "2", "--learning-rate", "5e-2", "--lora-rank", "4",
                 "--train-text-encoder", "--report-to", "none", "--checkpoint-every", "0", "lora.alpha=2",
                 "gradient_accumulation_steps=1", "lr_scheduler=constant", "ema.enabled=false",
                 "gradient_checkpointing=true"]) == 0
    final = out / "final"
    from safetensors.torch import load_file

    trained = {k.split(".")[0] for k, v in load_file(final / lora_mod.WEIGHT_NAME).items()
               if ".up." in k and bool(v.abs().max() > 0)}  # up (B) starts at 0: non-zero once trained
    assert trained == {"unet", "text_encoder", "text_encoder_2"}  # through gradient checkpointing too
    with safe_open(str(final / lora_mod.KOHYA_WEIGHT_NAME), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"} and alphas == {2.0}
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for k in keys)
    assert all(k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for k in keys)
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_network_dim"] == "4"

    base = _generate(_fresh(xl_model))
    loaded = {}
    for name in (lora_mod.WEIGHT_NAME, lora_mod.KOHYA_WEIGHT_NAME):
        pipe = _fresh(xl_model)
        pipe.load_lora_weights(str(final), weight_name=name)
        loaded[name] = (_generate(pipe), {c: {k: v for k, v in getattr(pipe, c).state_dict().items() if "lora" in k}
                                          for c in ("text_encoder", "text_encoder_2")})
    (img, te), (img_k, te_k) = loaded.values()
    assert np.abs(img - base).max() > 1e-3
    np.testing.assert_allclose(img_k, img, atol=1e-5)
    for c in te:
        assert te[c] and te[c].keys() == te_k[c].keys()
        assert all(torch.equal(te[c][k], te_k[c][k]) for k in te[c])

    # ldm txt2img --lora, with the folder (diffusers' file) or the kohya file: the LoRA's image, recorded for replay
    from PIL import Image

    from ldm_pipeline.cli.txt2img import main as txt2img

    common = ["sample 1, tag1, color1", "--model", str(xl_model), "--steps", "2", "--seed", "0", "--scheduler",
              "euler", "-q"]
    for i, lora in enumerate((final, final / lora_mod.KOHYA_WEIGHT_NAME)):
        assert txt2img([*common, "--lora", str(lora), "-o", str(tmp_path / f"cli{i}")]) == 0
    assert txt2img([*common, "-o", str(tmp_path / "cli-base")]) == 0
    pixels = lambda d: np.asarray(Image.open(next((tmp_path / d).glob("*.png"))), dtype=float)  # noqa: E731
    assert np.abs(pixels("cli0") - pixels("cli1")).max() <= 2  # the same adapters (fused: float rounding apart)
    assert np.abs(pixels("cli0") - pixels("cli-base")).max() > 2
    assert "<lora:" in Image.open(next((tmp_path / "cli1").glob("*.png"))).info["parameters"]


class Interrupted(Exception):
    """Plays a crash after a checkpoint."""


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(xl_model, xl_data, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    kw = dict(max_steps=4, checkpoint_every=2, train_text_encoder=True, ema__enabled=True, data__random_flip=True,
              data__caption_dropout=0.3, snr_gamma=5.0, noise_offset=0.05, learning_rate=1e-2)
    ref = tmp_path / "ref"
    train(xl_config(xl_model, xl_data, ref, **kw))

    def crash(state):
        if state.global_step == 3:  # past checkpoint-2, before checkpoint-4
            raise Interrupted

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(xl_config(xl_model, xl_data, out, **kw), hooks=TrainHooks(after_step=crash))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert not (out / "final").exists() and (out / "checkpoint-2").is_dir()
    res = train(xl_config(xl_model, xl_data, out, resume="latest", **kw))
    assert res.global_step == 4
    for folder in ("final", "final_raw"):
        a, b = load_weights(ref / folder), load_weights(out / folder)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, folder


@pytest.mark.parametrize("name", ["sdxl_finetune", "sdxl_lora"])
def test_sdxl_recipes_load_and_run_small(name, xl_model, xl_data, tmp_path):
    from ldm_pipeline.training.config import resolve

    base = {"model": str(xl_model), "output_dir": str(tmp_path / name), "data": {"source": str(xl_data)}}
    recipe = resolve(load_train_config(name, base))
    assert (recipe.data.resolution, recipe.data.bucketing, recipe.gradient_checkpointing) == (1024, True, True)
    assert recipe.mixed_precision in ("fp16", "bf16")
    assert recipe.lora.rank == (32 if name == "sdxl_lora" else 0)
    small = {"max_steps": 2, "batch_size": 1, "gradient_accumulation_steps": 1, "optimizer": "adamw",
             "lr_warmup_steps": 0, "validate_every": 0, "checkpoint_every": 0, "report_to": "none",
             "progress_bar": False, "data": {"resolution": 64, "bucketing": False, "num_workers": 0}}
    res = train(load_train_config(name, base, small))
    assert res.global_step == 2 and all(np.isfinite(v) for _, v in res.losses)
    final = tmp_path / name / "final"
    expected = [lora_mod.WEIGHT_NAME, lora_mod.KOHYA_WEIGHT_NAME] if name == "sdxl_lora" else ["model_index.json"]
    assert all((final / f).is_file() for f in expected)
