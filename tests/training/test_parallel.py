"""Mixed-precision resolution and the FSDP/DeepSpeed support matrix (pure functions: no GPU, no deepspeed)."""

from __future__ import annotations

import pytest

from ldm_pipeline.errors import UserError
from ldm_pipeline.training.config import load_train_config, resolve
from ldm_pipeline.training.parallel import check_backend, fill_deepspeed_config, resolve_mixed_precision


def _config(tmp_path, **layer):
    return resolve(load_train_config("tiny_test", {"model": "tiny", "data": {"source": "d"},
                                                   "output_dir": str(tmp_path), **layer}))


def test_auto_mixed_precision_honours_accelerate_launch():
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert resolve_mixed_precision("auto", env, cuda=False) == "bf16"
    assert resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, cuda=True) == "fp16"
    assert resolve_mixed_precision("auto", {}, cuda=True) == "fp16"
    assert resolve_mixed_precision("auto", {}, cuda=False) == "no"
    assert resolve_mixed_precision("no", env, cuda=True) == "no"  # an explicit setting wins
    with pytest.raises(UserError, match="ACCELERATE_MIXED_PRECISION=fp16.*CUDA"):
        resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, cuda=False)
    with pytest.raises(UserError, match="fp8"):
        resolve_mixed_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp8"}, cuda=True)


def test_deepspeed_refuses_text_encoder_training_and_zero3(tmp_path):
    ds2 = {"zero_optimization": {"stage": 2}}
    check_backend(_config(tmp_path, train_text_encoder=False), "DistributedType.DEEPSPEED", ds2)
    with pytest.raises(UserError, match="train_text_encoder=false"):
        check_backend(_config(tmp_path, train_text_encoder=True), "DistributedType.DEEPSPEED", ds2)
    with pytest.raises(UserError, match="lora.text_encoder=false"):
        check_backend(_config(tmp_path, train_text_encoder=False, lora={"rank": 4, "text_encoder": True}),
                      "DEEPSPEED", ds2)
    with pytest.raises(UserError, match="stage 3"):
        check_backend(_config(tmp_path, train_text_encoder=False), "DEEPSPEED", {"zero_optimization": {"stage": 3}})
    check_backend(_config(tmp_path, train_text_encoder=True), "DistributedType.MULTI_GPU")  # DDP: anything goes


def test_deepspeed_micro_batch_is_filled_before_prepare():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}
    assert fill_deepspeed_config(cfg, 3) == ["train_micro_batch_size_per_gpu"]
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    missing: dict = {}
    fill_deepspeed_config(missing, 2)
    assert missing["train_micro_batch_size_per_gpu"] == 2
    assert fill_deepspeed_config({"train_micro_batch_size_per_gpu": 5}, 5) == []
    with pytest.raises(UserError, match="differs from batch_size"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, 2)


def test_fsdp_refuses_whole_parameter_features(tmp_path):
    with pytest.raises(UserError) as e:
        check_backend(_config(tmp_path), "DistributedType.FSDP")  # tiny_test: EMA, text encoder, pipelines
    msg = str(e.value)
    assert "ema.enabled=false" in msg and "checkpoint_pipeline=false" in msg and "train_text_encoder=false" in msg
    with pytest.raises(UserError, match="lora.rank=0"):
        check_backend(_config(tmp_path, train_text_encoder=False, ema={"enabled": False}, checkpoint_pipeline=False,
                              lora={"rank": 4}), "FSDP")
    check_backend(_config(tmp_path, train_text_encoder=False, ema={"enabled": False}, checkpoint_pipeline=False,
                          validate_every=0), "FSDP")
