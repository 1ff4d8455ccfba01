"""Model configs, loading from every supported source, and the refusal of pickle checkpoints."""

import json

import pytest
import torch

from ldm_pipeline.config import config_dir
from ldm_pipeline.errors import UserError
from ldm_pipeline.models import load_model_spec, load_pipeline
from ldm_pipeline.tokenizer import load_tokenizer


@pytest.mark.parametrize("path", sorted((config_dir() / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_model_config_loads(path):
    spec = load_model_spec(path)
    assert spec.unet and spec.vae and spec.text_encoder and spec.scheduler["_class_name"]
    f = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    assert spec.defaults.height % f == 0 and spec.defaults.width % f == 0


def test_sd15_config_is_exactly_stable_diffusion_15():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = load_model_spec("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        te = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964  # SD 1.5's UNet
    assert count(vae) == 83_653_863
    assert count(te) == 123_060_480  # CLIP ViT-L/14 text tower
    assert 2 ** (len(spec.vae["block_out_channels"]) - 1) == 8
    assert spec.text_encoder["max_position_embeddings"] == 77
    s = spec.scheduler
    assert (s["beta_schedule"], s["beta_start"], s["beta_end"]) == ("scaled_linear", 0.00085, 0.012)


def test_clip_tokenizer_matches_openai_ids():
    tok = load_tokenizer("clip-vit-large-patch14")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert load_tokenizer("clip-vit-large-patch14-pad0").pad_token_id == 0  # SD 2.x pads with "!"


def test_config_yaml_model_builds_random_weights():
    pipe, info = load_pipeline("config:tiny", seed=3)
    assert info.source == "config" and pipe.unet.config.sample_size == 16
    pipe2, _ = load_pipeline(str(config_dir() / "models" / "tiny.yaml"), seed=3)  # a .yaml path is explicit too
    assert torch.equal(next(pipe.unet.parameters()), next(pipe2.unet.parameters()))


def test_a_bare_architecture_name_never_stands_in_for_trained_weights():
    # `--model tiny` used to build random weights without a word; a user who meant a model gets noise
    with pytest.raises(UserError, match="no trained weights: pass --model config:tiny"):
        load_pipeline("tiny")
    with pytest.raises(UserError, match="no architecture config 'nope'"):
        load_pipeline("config:nope")


def test_the_shipped_model_has_a_name_and_a_local_path_wins(tmp_path, monkeypatch, tiny_model):
    from ldm_pipeline.models import SHIPPED_MODEL, resolve_model

    assert resolve_model("shapes") == str(SHIPPED_MODEL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").symlink_to(tiny_model)  # a folder the user has called shapes is what they mean
    assert resolve_model("shapes") == "shapes"


def test_run_folders_get_names_that_say_which_run(tmp_path):
    from ldm_pipeline.models import SHIPPED_MODEL, display_name

    assert display_name(SHIPPED_MODEL) == "shapes"
    assert display_name(tmp_path / "cats" / "final") == "cats-final"
    assert display_name(tmp_path / "cats" / "checkpoint-300" / "pipeline") == "cats-checkpoint-300"
    assert display_name(tmp_path / "my-model") == "my-model"


def test_written_models_and_exports_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from ldm_pipeline.convert import export_single_file
    from ldm_pipeline.models import init_model

    old = os.umask(0o022)
    try:
        folder = init_model("tiny", tmp_path / "m", seed=0)
        export_single_file(str(folder), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o755}, modes  # mkdtemp gave 0700
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644  # mkstemp gave 0600


def test_folder_loads_in_plain_diffusers_and_carries_defaults(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    assert pipe.unet.config.cross_attention_dim == 32
    defaults = json.loads((tiny_model / "ldm_defaults.json").read_text())
    assert defaults["num_inference_steps"] == 20 and defaults["height"] == 64
    _, info = load_pipeline(str(tiny_model))
    assert info.defaults.num_inference_steps == 20 and len(info.hash) == 10
    _, info2 = load_pipeline(str(tiny_model))
    assert info.hash == info2.hash  # content hash is stable


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_refused_without_flag(tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    torch.save({"x": torch.zeros(1)}, f)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_pipeline(str(f))
    # with the flag it is read with weights_only=True and then checked for the SD layout
    with pytest.raises(UserError, match="not a Stable Diffusion"):
        load_pipeline(str(f), allow_pickle=True)


def test_folder_with_pickle_weights_needs_allow_pickle(tiny_model, tmp_path):
    """diffusers falls back to a folder's .bin (pickle) weights when it has no safetensors: we refuse that unless
    allowed, and record the folder's absolute path."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model, folder)
    for f in folder.rglob("*.safetensors"):  # the layout save_pretrained(safe_serialization=False) writes
        name = "pytorch_model.bin" if f.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(str(f)), f.with_name(name))
        f.unlink()
    with pytest.raises(UserError, match=r"has pickle weights \(text_encoder/pytorch_model\.bin\).*--allow-pickle"):
        load_pipeline(str(folder))
    pipe, info = load_pipeline(str(folder), allow_pickle=True)
    ref, _ = load_pipeline(str(tiny_model))
    assert torch.equal(pipe.unet.conv_in.weight, ref.unet.conv_in.weight)
    assert info.path == str(folder.resolve())


def test_pickle_lora_refused_without_flag(generator, tmp_path):
    from ldm_pipeline.generator import load_lora

    f = tmp_path / "pytorch_lora_weights.bin"
    torch.save({}, f)
    for path in (f, tmp_path):  # the file, or a folder holding only it (diffusers would fall back to it)
        with pytest.raises(UserError, match="has only pickle weights.*--allow-pickle"):
            load_lora(generator.pipe, str(path))


def test_pickle_with_code_is_not_executed(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    f = tmp_path / "evil.ckpt"
    f.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(UserError):
        load_pipeline(str(f), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_hub_id_offline_is_one_line():
    with pytest.raises(UserError, match="not available locally"):
        load_pipeline("runwayml/stable-diffusion-v1-5")


def test_non_sd_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(f))
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x/XL checkpoint"):
        load_pipeline(str(f))


def test_single_file_from_ldm_export_and_pickle_with_flag(tiny_model, tmp_path):
    """A .safetensors written by `ldm export` loads alone (its metadata records the architecture); the same weights
    as a pickle .ckpt load only with allow_pickle, given the architecture."""
    import numpy as np

    from ldm_pipeline.convert import export_single_file
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import Job, RuntimeOptions

    f = tmp_path / "tiny.safetensors"
    export_single_file(str(tiny_model), str(f))
    pipe, info = load_pipeline(str(f))
    ref, _ = load_pipeline(str(tiny_model))
    assert info.source == "single_file" and info.defaults.num_inference_steps == 20
    for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()):
        assert torch.equal(a, b)

    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(f))}, ckpt)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_pipeline(str(ckpt), model_config=str(tiny_model))
    pipe2, _ = load_pipeline(str(ckpt), allow_pickle=True, model_config=str(tiny_model))
    assert torch.equal(next(pipe2.unet.parameters()), next(ref.unet.parameters()))

    job = Job("a red circle", seed=1, num_inference_steps=3)
    a = next(Generator.load(str(f), RuntimeOptions(device="cpu")).generate([job])).image
    b = next(Generator.load(str(tiny_model), RuntimeOptions(device="cpu")).generate([job])).image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_hub_model_hash_is_its_local_snapshot_content(tmp_path, monkeypatch, tiny_model):
    import shutil

    from ldm_pipeline.hashes import folder_hash, hub_snapshot_hash

    # a hub cache laid out as huggingface_hub writes it: models--org--name/{refs/main, snapshots/REV/...}
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_snapshot_hash("someone/tiny-sd") == folder_hash(tiny_model)[:10]  # was the repo name's last 10 characters
    assert hub_snapshot_hash("someone/not-here") is None
