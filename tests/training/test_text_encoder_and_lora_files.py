"""What `ldm train` saves loads back in plain diffusers and computes what the trained model computed: text-encoder
LoRA, full text-encoder fine-tuning, and LoRA files carrying their alpha (alpha != rank loads at alpha / rank)."""

from __future__ import annotations

import pytest
import torch

from ldm_pipeline.training import lora as lora_mod
from tests.training.conftest import load_weights

PROMPT = "sample 1, tag1, color1"
# two optimizer steps at a rate that moves every weight (AdamW steps ~ the rate), no warm-up (its first step runs at
# 0) and no EMA, so final/ holds the weights the run ended with
FAST = ["--max-steps", "2", "--learning-rate", "5e-2", "--checkpoint-every", "0", "--report-to", "none",
        "gradient_accumulation_steps=1", "lr_scheduler=constant", "ema.enabled=false", "checkpoint_pipeline=false"]


def _ldm_train(model, data, out, *args: str) -> None:
    """`ldm train --config tiny_test ...` in-process."""
    from ldm_pipeline.cli.train import main

    assert main(["--config", "tiny_test", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 *FAST, *args]) == 0


def _plain_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)


@torch.no_grad()
def _outputs(text_encoder, unet, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(text encoder output of PROMPT, UNet noise prediction conditioned on it) for a fixed latent and timestep."""
    text_encoder.eval()
    unet.eval()
    ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    emb = text_encoder(ids)[0]
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    return emb, unet(latents, torch.tensor([500]), emb).sample


def _capture_saved_modules(monkeypatch) -> list:
    """The live (trained, peft-wrapped) modules each LoRA save is given, in the order saved."""
    saved = []
    real = lora_mod.save_lora

    def spy(out_dir, unet, text_encoder=None):
        saved.append((unet, text_encoder))
        return real(out_dir, unet, text_encoder)

    monkeypatch.setattr(lora_mod, "save_lora", spy)
    return saved


def test_full_text_encoder_fine_tuning_trains_and_loads_in_diffusers(tiny_model, laion_data, tmp_path):
    out = tmp_path / "te_full"
    _ldm_train(tiny_model, laion_data, out, "--train-text-encoder")
    final, init = load_weights(out / "final"), load_weights(tiny_model)
    changed = {k.split("/")[0] for k in final if not torch.equal(final[k], init[k])}
    assert changed == {"unet", "text_encoder"}

    base, tuned = _plain_pipeline(tiny_model), _plain_pipeline(out / "final")
    emb_base, _ = _outputs(base.text_encoder, base.unet, base.tokenizer)
    emb, _ = _outputs(tuned.text_encoder, tuned.unet, tuned.tokenizer)
    assert (emb - emb_base).abs().max() > 1e-3


@pytest.fixture(scope="module")
def alpha_run(tiny_model, laion_data, tmp_path_factory):
    """A LoRA with alpha 1 at rank 4 on the UNet and the text encoder (scale 0.25), and the outputs of the trained
    modules themselves, taken from the run's final save."""
    out = tmp_path_factory.mktemp("alpha") / "run"
    mp = pytest.MonkeyPatch()
    try:
        saved = _capture_saved_modules(mp)
        # --train-text-encoder with LoRA: adapters on the text encoder too
        _ldm_train(tiny_model, laion_data, out, "--lora-rank", "4", "--train-text-encoder", "lora.alpha=1")
    finally:
        mp.undo()
    unet, text_encoder = saved[-1]  # final/
    assert unet.peft_config["default"].lora_alpha == 1.0 and unet.peft_config["default"].r == 4
    return out / "final", _outputs(text_encoder, unet, _plain_pipeline(tiny_model).tokenizer)


def test_text_encoder_lora_trains_and_loads_in_diffusers(tiny_model, alpha_run):
    from safetensors.torch import load_file

    final, (emb_live, pred_live) = alpha_run
    weights = load_file(final / lora_mod.WEIGHT_NAME)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    assert all(bool(v.abs().max() > 0) for k, v in weights.items() if "lora.up" in k or "lora_B" in k)  # trained
    base = _plain_pipeline(tiny_model)
    emb_base, pred_base = _outputs(base.text_encoder, base.unet, base.tokenizer)
    base.load_lora_weights(str(final))
    emb, pred = _outputs(base.text_encoder, base.unet, base.tokenizer)
    assert (emb - emb_base).abs().max() > 1e-3 and (pred - pred_base).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(emb, emb_live, rtol=1e-4, atol=1e-5)  # as they did in training
    torch.testing.assert_close(pred, pred_live, rtol=1e-4, atol=1e-5)


def test_lora_file_carries_rank_and_alpha(alpha_run):
    import json

    from safetensors import safe_open

    with safe_open(str(alpha_run[0] / lora_mod.WEIGHT_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    for part in ("unet", "text_encoder"):
        assert (meta[f"{part}.r"], meta[f"{part}.lora_alpha"]) == (4, 1.0)


def test_lora_with_alpha_loads_as_trained_in_ldm_txt2img(tiny_model, alpha_run):
    from ldm_pipeline.generator import load_lora

    final, (emb_live, pred_live) = alpha_run
    pipe = _plain_pipeline(tiny_model)
    load_lora(pipe, str(final))  # what `ldm txt2img --lora` does
    emb, pred = _outputs(pipe.text_encoder, pipe.unet, pipe.tokenizer)
    torch.testing.assert_close(emb, emb_live, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, pred_live, rtol=1e-4, atol=1e-5)


def test_the_same_weights_without_alpha_load_at_scale_1(tiny_model, alpha_run, tmp_path):
    """The check above can fail: a file without the metadata (what was written before) loads 4x too strong."""
    from safetensors.torch import load_file, save_file

    final, (emb_live, pred_live) = alpha_run
    save_file(load_file(final / lora_mod.WEIGHT_NAME), str(tmp_path / lora_mod.WEIGHT_NAME), metadata={"format": "pt"})
    pipe = _plain_pipeline(tiny_model)
    pipe.load_lora_weights(str(tmp_path))
    emb, pred = _outputs(pipe.text_encoder, pipe.unet, pipe.tokenizer)
    assert (emb - emb_live).abs().max() > 1e-3 and (pred - pred_live).abs().max() > 1e-3


def test_kohya_copy_loads_as_trained(tiny_model, alpha_run):
    """final/'s kohya-format copy (for A1111/ComfyUI: SD 1.x's lora_unet_/lora_te_ keys, the adapter's alpha) loads
    in diffusers to what the trained modules computed."""
    from safetensors import safe_open

    final, (emb_live, pred_live) = alpha_run
    with safe_open(str(final / lora_mod.KOHYA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {1.0}
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    assert {k.split("_")[1] for k in keys} == {"unet", "te"}
    pipe = _plain_pipeline(tiny_model)
    pipe.load_lora_weights(str(final), weight_name=lora_mod.KOHYA_WEIGHT_NAME)
    emb, pred = _outputs(pipe.text_encoder, pipe.unet, pipe.tokenizer)
    torch.testing.assert_close(emb, emb_live, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, pred_live, rtol=1e-4, atol=1e-5)
