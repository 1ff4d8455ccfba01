"""`ldm export`: diffusers folder → original (CompVis/LDM) single-file layout, read back by diffusers' own loader."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm_pipeline.cli.export import main as export_main
from ldm_pipeline.convert import check_round_trip, export_single_file, pipeline_to_ldm, unet_to_ldm
from ldm_pipeline.errors import UserError
from ldm_pipeline.models import init_model, load_model_spec
from ldm_pipeline.single_file import detect_single_file_arch

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("export") / "m", seed=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "tiny.safetensors"
    export_single_file(str(model), out)
    return out


def load_folder(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)


def load_single_file(path, config_folder):
    """What a user of plain diffusers does; `config` because the tiny architecture is not one diffusers knows."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def assert_same_weights(expected_pipe, got_pipe, dtype=None):
    for part in PARTS:
        want, got = getattr(expected_pipe, part).state_dict(), getattr(got_pipe, part).state_dict()
        assert want.keys() == got.keys(), part
        for k, w in want.items():
            w = w.to(dtype) if dtype is not None else w
            g = got[k]
            assert g.device.type == "cpu", f"{part} {k} was not loaded ({g.device})"
            assert g.dtype == w.dtype and g.shape == w.shape, (part, k, g.dtype, w.dtype)
            assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), (part, k)  # bits


def test_round_trip_through_diffusers_from_single_file_is_bit_identical(model, exported):
    assert_same_weights(load_folder(model), load_single_file(exported, model))


def test_key_layout_is_the_original_one(model, exported):
    with safe_open(str(exported), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata()
    pipe = load_folder(model)
    assert len(shapes) == sum(len(getattr(pipe, p).state_dict()) for p in PARTS)  # one tensor per parameter
    assert {k.split(".")[0] for k in shapes} == {"model", "first_stage_model", "cond_stage_model"}
    # names diffusers' forward converters look up (single_file_utils.convert_ldm_*_checkpoint)
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),  # conv_in
        "model.diffusion_model.time_embed.0.weight": (128, 32),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),  # resnet conv1
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),  # 1x1 conv, as SD 1.x
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        "model.diffusion_model.input_blocks.2.0.op.weight": (32, 32, 3, 3),  # downsampler
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "model.diffusion_model.middle_block.0.emb_layers.1.weight": (64, 128),
        "model.diffusion_model.middle_block.1.proj_out.weight": (64, 64, 1, 1),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "model.diffusion_model.output_blocks.1.1.conv.weight": (64, 64, 3, 3),  # upsampler after a plain resnet
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight": (256, 32),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.encoder.down.0.block.0.conv1.weight": (16, 16, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (32, 16, 1, 1),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (16, 16, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (32, 32, 1, 1),  # linear → 1x1 conv
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (32, 32, 1, 1),
        "first_stage_model.decoder.mid.attn_1.norm.weight": (32,),
        "first_stage_model.decoder.mid.block_2.norm1.weight": (32,),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (16, 32, 1, 1),  # up.0 = full resolution
        "first_stage_model.decoder.up.2.upsample.conv.weight": (32, 32, 3, 3),
        "first_stage_model.encoder.norm_out.weight": (32,),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 32),
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": (32, 32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k))
    assert not [k for k in shapes if any(s in k for s in ("down_blocks", "resnets", "mid_block", "group_norm"))]
    assert not any(k.startswith("first_stage_model.decoder.up.0.upsample") for k in shapes)
    # the file describes itself
    assert meta["format"] == "pt" and meta["ldm_pipeline.format"] == "ldm-single-file"
    assert meta["ldm_pipeline.source"] == str(model) and meta["ldm_pipeline.dtype"] == "fp32"
    assert meta["ldm_pipeline.text_encoder_layout"] == "clip" and meta["ldm_pipeline.ema"] == "false"
    config = json.loads(meta["ldm_pipeline.config"])
    assert config["unet"]["block_out_channels"] == [32, 64] and config["text_encoder"]["hidden_size"] == 32
    assert json.loads(meta["ldm_pipeline.defaults"])["height"] == 64


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_halves_the_file_and_loads_back(model, exported, tmp_path, dtype, torch_dtype):
    out = tmp_path / f"tiny-{dtype}.safetensors"
    r = export_single_file(str(model), out, dtype=dtype)
    assert r.dtype == dtype
    ratio = out.stat().st_size / exported.stat().st_size
    assert 0.48 < ratio < 0.52, ratio
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ldm_pipeline.dtype"] == dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "fp16" else "BF16"}
    back = load_single_file(out, model)
    for part in PARTS:
        getattr(back, part).to(torch_dtype)
    assert_same_weights(load_folder(model), back, dtype=torch_dtype)


def test_sd2_style_linear_projection_and_openclip_text_encoder(tmp_path):
    spec = load_model_spec("tiny")
    spec = dataclasses.replace(spec, unet={**spec.unet, "use_linear_projection": True, "attention_head_dim": [2, 4]})
    folder = init_model(spec, tmp_path / "m2", seed=3)
    out = tmp_path / "sd2style.safetensors"
    assert export_single_file(str(folder), out, text_encoder_layout="openclip").text_encoder_layout == "openclip"
    with safe_open(str(out), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (32, 32)  # linear, as SD 2.x
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)  # fused q/k/v
    assert shapes["cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight"] == (32, 64)
    assert shapes["cond_stage_model.model.positional_embedding"] == (77, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in shapes)
    assert_same_weights(load_folder(folder), load_single_file(out, folder))


def _meta_pipeline(arch):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = load_model_spec(arch)
    with torch.device("meta"):  # real architecture, no memory
        return SimpleNamespace(unet=UNet2DConditionModel(**spec.unet), vae=AutoencoderKL(**spec.vae),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**spec.text_encoder)))


@pytest.mark.parametrize("arch, te_prefix, te_keys", [
    ("sd15", "cond_stage_model.transformer.", 196),  # the original file has 197: + position_ids (a buffer)
    ("sd21", "cond_stage_model.model.", 280),  # 23 resblocks (the original's unused 24th is not invented)
])
def test_real_architectures_have_the_original_key_names(arch, te_prefix, te_keys, tmp_path):
    pipe = _meta_pipeline(arch)
    ldm = pipeline_to_ldm(pipe)
    check_round_trip(ldm, pipe, compare_values=False)  # diffusers' converters find every parameter
    count = lambda prefix: sum(k.startswith(prefix) for k in ldm)  # noqa: E731
    assert count("model.diffusion_model.") == 686  # as in v1-5-pruned-emaonly / v2-1_768-ema-pruned
    assert count("first_stage_model.") == 248
    assert count(te_prefix) == te_keys == len(ldm) - 686 - 248
    shape = lambda k: tuple(ldm[k].shape)  # noqa: E731
    assert shape("model.diffusion_model.output_blocks.2.1.conv.weight") == (1280, 1280, 3, 3)
    assert shape("model.diffusion_model.output_blocks.5.2.conv.weight") == (1280, 1280, 3, 3)  # after attention
    assert shape("model.diffusion_model.output_blocks.8.2.conv.weight") == (640, 640, 3, 3)
    assert shape("model.diffusion_model.input_blocks.9.0.op.weight") == (1280, 1280, 3, 3)
    assert shape("model.diffusion_model.input_blocks.11.0.out_layers.3.weight") == (1280, 1280, 3, 3)
    assert shape("first_stage_model.decoder.up.3.upsample.conv.weight") == (512, 512, 3, 3)
    assert shape("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight") == (128, 256, 1, 1)
    proj_in = shape("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    assert proj_in == ((320, 320, 1, 1) if arch == "sd15" else (320, 320))
    # the key models.detect_single_file_arch reads picks the right config for `ldm txt2img --model FILE`
    from safetensors.torch import save_file

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    probe = tmp_path / "probe.safetensors"
    save_file({key: torch.zeros(ldm[key].shape, dtype=torch.float16)}, str(probe))
    assert detect_single_file_arch(probe, allow_pickle=False) == arch


def test_parameters_without_an_ldm_name_are_refused():
    with pytest.raises(UserError, match="no place for it"):
        unet_to_ldm({"add_embedding.linear_1.weight": torch.zeros(1)}, {"layers_per_block": 1})
    with pytest.raises(UserError, match="per-block layers_per_block"):
        unet_to_ldm({}, {"layers_per_block": [1, 2]})


def test_round_trip_check_catches_a_wrong_mapping(model):
    pipe = load_folder(model)
    ldm = pipeline_to_ldm(pipe)
    check_round_trip(ldm, pipe)
    key = "model.diffusion_model.output_blocks.1.1.conv.weight"
    broken = {**ldm, key.replace(".1.conv.", ".3.conv."): ldm[key]}
    del broken[key]
    with pytest.raises(UserError, match="cannot read this UNet back"):
        check_round_trip(broken, pipe)
    broken = {**ldm, "first_stage_model.encoder.conv_in.bias": torch.ones_like(ldm["first_stage_model.encoder.conv_in.bias"])}
    with pytest.raises(UserError, match="does not survive"):
        check_round_trip(broken, pipe)


def test_ema_exports_the_checkpoints_ema_weights(model, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "checkpoint-10"  # as `ldm train` writes it: pipeline/ (raw) and pipeline_ema/
    shutil.copytree(model, ckpt / "pipeline")
    init_model("tiny", ckpt / "pipeline_ema", seed=7)
    assert export_main([str(ckpt), "--single-file", str(tmp_path / "raw.safetensors")]) == 0
    assert export_main([str(ckpt), "--single-file", str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "raw.safetensors"), str(tmp_path / "ema.safetensors")]
    assert_same_weights(load_folder(ckpt / "pipeline"), load_single_file(tmp_path / "raw.safetensors", model))
    assert_same_weights(load_folder(ckpt / "pipeline_ema"), load_single_file(tmp_path / "ema.safetensors", model))
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        assert f.metadata()["ldm_pipeline.ema"] == "true"
    assert export_main([str(model), "--single-file", str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ldm_pipeline", "export", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_subprocess_writes_then_refuses_to_overwrite(model, tmp_path):
    out = tmp_path / "sub" / "model.safetensors"
    r = _cli(str(model), "--single-file", str(out), "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "Traceback" not in r.stderr
    before = out.read_bytes()
    r = _cli(str(model), "--single-file", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ldm export: error: output {out} already exists: choose another name "
                                             "or pass --overwrite"]
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no temporary files left


def test_overwrite_replaces(model, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    assert export_main([str(model), "--single-file", str(out), "--overwrite"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert "model.diffusion_model.out.2.weight" in f.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing", "--single-file", "{tmp}/o.safetensors"], "model not found"),
    (["{model}", "--single-file", "{tmp}/o.ckpt"], "must end in .safetensors"),
    (["{model}", "--single-file", "{tmp}"], "must end in .safetensors"),
    (["{tmp}", "--single-file", "{tmp}/o.safetensors"], "not a diffusers model folder"),
])
def test_user_errors_are_one_line_exit_2(model, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, model=model) for a in argv]
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("ldm export: error:"), err
    assert not list(tmp_path.glob("*.safetensors*"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="real SD 1.5 size (~4 GB of memory, minutes): RUN_SLOW=1")
def test_sd15_sized_export_loads_back_by_itself(tmp_path):
    from ldm_pipeline.models import load_pipeline

    folder = init_model("sd15", tmp_path / "sd15", seed=0)
    out = tmp_path / "sd15.safetensors"
    export_single_file(str(folder), out, dtype="fp16")
    assert 1.9e9 < out.stat().st_size < 2.2e9  # the familiar 2 GB fp16 SD 1.5 file
    pipe, info = load_pipeline(str(out))  # no config: detect_single_file_arch → sd15
    assert info.source == "single_file" and info.defaults.height == 512
    want = load_folder(folder)
    for part in PARTS:
        pipe_sd = getattr(pipe, part).state_dict()
        for k, w in getattr(want, part).state_dict().items():
            assert torch.equal(pipe_sd[k].to(torch.float16), w.to(torch.float16)), (part, k)
