"""`ldm export` of SDXL-architecture models: the original SGM key layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``conditioner.embedders.{0,1}.*``), read back bit for bit by our loader and by plain
diffusers, and the real SDXL base architecture's key names checked on the meta device."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_pipeline import single_file
from ldm_pipeline.cli.export import main as export_main
from ldm_pipeline.convert import check_round_trip, export_single_file, pipeline_to_ldm
from ldm_pipeline.errors import UserError
from ldm_pipeline.models import init_model, load_model_spec, load_pipeline, pipeline_class
from ldm_pipeline.single_file import SDXL_KEY, config_folder_from_metadata, detect_single_file_arch
from tests.conftest import run_cli

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_model("tiny_sdxl", tmp_path_factory.mktemp("sdxl") / "m", seed=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl_exported") / "tiny_sdxl.safetensors"
    export_single_file(str(model), out)
    return out


@pytest.fixture(scope="module")
def source(model):
    """The tiny_sdxl folder in plain diffusers: the weights every read-back is compared with."""
    return load_folder(model)


@pytest.fixture(scope="module")
def ours(exported):
    """The exported file through `load_pipeline`, with no other argument."""
    return load_pipeline(str(exported))


@pytest.fixture(scope="module")
def plain(exported):
    """The exported file through plain diffusers' ``from_single_file``."""
    return plain_from_single_file(exported)


def load_folder(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True, add_watermarker=False)


def plain_from_single_file(path):
    """What a user of plain diffusers does, with the weightless config folder the file's metadata describes."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_folder_from_metadata(path)),
                                                      local_files_only=True, add_watermarker=False)


def assert_same_weights(expected_pipe, got_pipe, dtype=None):
    for part in PARTS:
        want, got = getattr(expected_pipe, part).state_dict(), getattr(got_pipe, part).state_dict()
        assert want.keys() == got.keys(), part
        for k, w in want.items():
            w = w.to(dtype) if dtype is not None else w
            g = got[k].to(dtype) if dtype is not None else got[k]
            assert got[k].device.type == "cpu", f"{part} {k} was not loaded ({got[k].device})"
            assert g.dtype == w.dtype and g.shape == w.shape, (part, k, g.dtype, w.dtype)
            assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), (part, k)  # bits


def shapes_and_metadata(path) -> tuple[dict[str, tuple], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def test_our_loader_reads_the_file_back_bit_identical(source, ours):
    from diffusers import StableDiffusionXLPipeline

    pipe, info = ours  # no config: the file's metadata describes it
    assert isinstance(pipe, StableDiffusionXLPipeline) and info.source == "single_file"
    assert info.defaults.height == 64 and info.defaults.scheduler == "euler"
    assert_same_weights(source, pipe)


def test_plain_diffusers_from_single_file_reads_it_back_bit_identical(source, plain):
    assert_same_weights(source, plain)


def test_images_are_identical_from_the_folder_and_from_the_file(source, ours, plain):
    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: threads only add overhead, and stall badly on a busy machine
    try:
        want = image(source)
        assert want.shape == (64, 64, 3) and want.std() > 0
        assert np.array_equal(want, image(ours[0])) and np.array_equal(want, image(plain))
    finally:
        torch.set_num_threads(threads)


def test_keys_are_the_released_sdxl_names(source, exported):
    shapes, meta = shapes_and_metadata(exported)
    fused = 3 * 4  # bigG's q/k/v weights and biases: 6 → in_proj_weight, in_proj_bias, in each of 3 layers
    assert len(shapes) == sum(len(getattr(source, p).state_dict()) for p in PARTS) - fused  # nothing else, no extras
    assert {k.split(".")[0] for k in shapes} == {"model", "first_stage_model", "conditioner"}
    expected = {  # names the released sd_xl_base_1.0.safetensors has (there with SDXL's sizes)
        "model.diffusion_model.label_emb.0.0.weight": (128, 80),  # add_embedding.linear_1
        "model.diffusion_model.label_emb.0.2.weight": (128, 128),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (64, 80),  # 2 layers; 80 = 32 + 48
        "model.diffusion_model.input_blocks.3.0.op.weight": (32, 32, 3, 3),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (64, 64, 3, 3),  # upsampler after attention
        "model.diffusion_model.output_blocks.5.0.skip_connection.weight": (32, 64, 1, 1),  # up block w/o attention
        "model.diffusion_model.middle_block.1.proj_in.weight": (64, 64),  # linear, as SDXL
        "first_stage_model.decoder.up.2.upsample.conv.weight": (32, 32, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.weight": (32, 64),
        "conditioner.embedders.1.model.positional_embedding": (77, 48),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 48),
        # diffusers' text_projection.weight is [32, 48]; the SGM file stores it transposed (used as x @ W)
        "conditioner.embedders.1.model.text_projection": (48, 32),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (144, 48),  # fused q/k/v
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight": (48, 96),
        "conditioner.embedders.1.model.ln_final.bias": (48,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k))
    assert not [k for k in shapes if k.startswith("cond_stage_model") or "add_embedding" in k]
    bigg = [k for k in shapes if k.startswith("conditioner.embedders.1.")]
    assert bigg and not [k for k in bigg if any(s in k for s in ("q_proj", "k_proj", "v_proj", "self_attn", "layers"))]
    assert meta["ldm_pipeline.text_encoder_layout"] == "sdxl" and meta["ldm_pipeline.dtype"] == "fp32"
    assert json.loads(meta["ldm_pipeline.config"])["text_encoder_2"]["hidden_size"] == 48


def test_round_trip_check_catches_an_untransposed_projection(source):
    pipe = source
    ldm = pipeline_to_ldm(pipe)
    check_round_trip(ldm, pipe)
    key = "conditioner.embedders.1.model.text_projection"
    with pytest.raises(UserError, match="text encoder 2"):
        check_round_trip({**ldm, key: ldm[key].T.contiguous()}, pipe)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_load_back(model, source, exported, tmp_path, dtype, torch_dtype):
    out = tmp_path / f"tiny_sdxl-{dtype}.safetensors"
    export_single_file(str(model), out, dtype=dtype)
    assert 0.48 < out.stat().st_size / exported.stat().st_size < 0.52
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "fp16" else "BF16"}
    assert_same_weights(source, load_pipeline(str(out))[0], dtype=torch_dtype)


def test_sdxl_is_detected_by_its_openclip_key(source, exported, tmp_path, monkeypatch):
    probe = tmp_path / "probe.safetensors"
    save_file({SDXL_KEY: torch.zeros(77, 1280, dtype=torch.float16)}, str(probe))
    assert detect_single_file_arch(probe) == "sdxl"
    assert pipeline_class(single_file.offline_config_folder("sdxl")).__name__ == "StableDiffusionXLPipeline"
    # the same weights without our metadata (as A1111 or another tool writes them): the arch comes from the keys
    bare = tmp_path / "bare.safetensors"
    with safe_open(str(exported), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(bare))
    assert config_folder_from_metadata(bare) is None
    asked = []
    tiny_config = config_folder_from_metadata(exported)  # the real sdxl config cannot hold tiny weights
    monkeypatch.setattr(single_file, "offline_config_folder", lambda arch: asked.append(arch) or tiny_config)
    pipe, _ = load_pipeline(str(bare))
    assert asked == ["sdxl"]
    assert_same_weights(source, pipe)


def test_text_encoder_layout_is_refused_for_sdxl(model, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert export_main([str(model), "--single-file", str(out), "--text-encoder-layout", "openclip"]) == 2
    err = capsys.readouterr().err
    assert "for SD 1.x/2.x" in err and len(err.strip().splitlines()) == 1 and err.startswith("ldm export: error:")
    assert not out.exists()
    with pytest.raises(UserError, match="fixed layouts"):
        export_single_file(str(model), out, text_encoder_layout="clip")


def test_cli_subprocess_exports_sdxl(model, tmp_path):
    out = tmp_path / "cli.safetensors"
    r = run_cli("export", str(model), "--single-file", str(out), "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "Traceback" not in r.stderr
    assert "SDXL text encoders" in r.stderr
    assert SDXL_KEY in shapes_and_metadata(out)[0]


def test_real_sdxl_architecture_maps_every_parameter():
    """SDXL base 1.0 at full size on the meta device (no memory): every parameter has an SGM name diffusers'
    converters read back under its own name and shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = load_model_spec("sdxl")
    with torch.device("meta"):
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(**spec.unet), vae=AutoencoderKL(**spec.vae),
            text_encoder=CLIPTextModel(CLIPTextConfig(**spec.text_encoder)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2)))
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == 694_659_840
    ldm = pipeline_to_ldm(pipe)
    check_round_trip(ldm, pipe, compare_values=False)
    count = lambda prefix: sum(k.startswith(prefix) for k in ldm)  # noqa: E731
    # the released file: the same, + CLIP-L's position_ids and bigG's logit_scale (unused; see convert.py)
    assert count("model.diffusion_model.") == 1680 and count("first_stage_model.") == 248
    assert count("conditioner.embedders.0.transformer.text_model.") == 196
    assert count("conditioner.embedders.1.model.") == 389 == 32 * 12 + 5
    assert len(ldm) == 1680 + 248 + 196 + 389
    shape = lambda k: tuple(ldm[k].shape)  # noqa: E731
    assert shape("model.diffusion_model.label_emb.0.0.weight") == (1280, 2816)
    assert shape("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight") == (1280, 2048)
    assert shape("model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight") == (1280, 5120)
    assert shape("model.diffusion_model.output_blocks.2.2.conv.weight") == (1280, 1280, 3, 3)
    assert shape("model.diffusion_model.output_blocks.5.2.conv.weight") == (640, 640, 3, 3)
    assert not any(k.startswith("model.diffusion_model.input_blocks.9.") for k in ldm)  # no downsampler at the end
    assert shape("conditioner.embedders.1.model.text_projection") == (1280, 1280)
    assert shape("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight") == (3840, 1280)
