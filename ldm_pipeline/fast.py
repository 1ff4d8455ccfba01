"""``--fast``: the speed-ups that measured best on the device at hand, each one torch's or diffusers' own.

What each device gets, and the measurements behind it (``benchmarks/bench_fast.py --ablate`` writes them to
``benchmarks/results/fast-*.json``; docs/benchmarks.md shows them):

- CPU, SD-size UNets: bf16 where the CPU computes in it natively (AVX512-BF16 or AMX: half the time of an SD 1.5
  UNet step; a CPU without it would emulate bf16 and lose) and channels-last for the convolutions. Compiling gains
  ~1 % there, for a minute of compilation: not used.
- CPU, small UNets (the shipped model): ``torch.compile`` of the UNet and the VAE decoder with inductor freezing
  (weights folded in as constants, oneDNN prepacked): per-op overhead dominates them, and compiling removes it. bf16
  and channels-last lose there. Fused QKV projections measured within noise on CPU: not used.
- CUDA: fp16, fused QKV projections, channels-last, and ``torch.compile`` in ``max-autotune`` mode (CUDA graphs
  for the static shapes of a denoising loop) with the inductor settings diffusers' speed guide recommends.

The first image pays the compilation (reported apart by the benchmark); inductor caches what it compiled on disk
(``TORCHINDUCTOR_CACHE_DIR``, by default under the ldm_pipeline cache), so later processes start faster.
A tiny VAE decoder is not part of ``--fast``: it changes the pictures, so it stays something a user asks for.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FastPlan:
    """The speed-ups ``--fast`` turns on; each can be switched off alone (the benchmark's ablation does)."""

    dtype: str  # precision: the fastest one the device computes natively
    channels_last: bool
    fuse_qkv: bool
    compile: bool  # the UNet and the VAE decoder (a tenth of a small model's time)
    compile_mode: str | None  # torch.compile mode (None: its default)

    def describe(self) -> str:
        parts = [self.dtype]
        parts += [name for name, on in (("channels-last", self.channels_last), ("fused QKV", self.fuse_qkv)) if on]
        if self.compile:
            parts.append(f"torch.compile({self.compile_mode or 'default'})")
        return ", ".join(parts)

    def as_record(self) -> dict:
        return asdict(self)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls/convolutions in hardware (AVX512-BF16, AMX), not emulated."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # torch's own probe (oneDNN's ISA check)


# What pays on a CPU depends on the UNet's size (benchmarks/results/fast-*.json, bench_fast.py --ablate):
# - SD-size (SD 1.5's UNet, 860M parameters, 512 px): compute-bound. bf16 halves a step, channels-last adds ~10 %,
#   torch.compile ~1 % for 20-60 s of compilation: bf16 + channels-last, no compile.
# - small (the shipped model, 5M parameters, 64 px): per-op overhead dominates. Compiling gains ~25 %; bf16 gains
#   nothing at batch 1, loses at batch 8 and falls to ~30 dB PSNR; channels-last loses ~10 % at batch 8: compile only.
CPU_BIG_UNET_PARAMS = 100_000_000


def plan_for(device: str, dtype: str | None = None, unet_params: int | None = None) -> FastPlan:
    """The speed-ups for `device` (``cpu``, ``cuda[:N]``, ``mps``) and a UNet of `unet_params` parameters (unknown:
    SD-size); `dtype` overrides the precision it would pick."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return FastPlan(dtype=dtype or "fp16", channels_last=True, fuse_qkv=True, compile=True,
                        compile_mode="max-autotune")
    if kind == "cpu":
        big = unet_params is None or unet_params >= CPU_BIG_UNET_PARAMS
        return FastPlan(dtype=dtype or ("bf16" if big and cpu_has_native_bf16() else "fp32"), channels_last=big,
                        fuse_qkv=False, compile=not big, compile_mode=None)
    # MPS: torch.compile does not target it yet; half precision is what pays there
    return FastPlan(dtype=dtype or "fp16", channels_last=False, fuse_qkv=False, compile=False, compile_mode=None)


def set_compile_cache() -> None:
    """Keep inductor's compiled kernels in the ldm_pipeline cache (unless the user chose a folder) so that they
    outlive /tmp cleaning and are found by the next process."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from ldm_pipeline.files import CACHE_DIR

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR / "inductor")


def compile_kwargs(plan: FastPlan, device: str) -> dict:
    """``torch.compile`` arguments for `plan` on `device` (and, on CUDA, the inductor settings they rely on)."""
    if plan.compile_mode:
        if not device.startswith("cpu"):
            import torch._inductor.config as inductor

            # diffusers' "accelerate inference" guide: 1x1 convolutions as matmuls, tuned reductions
            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            inductor.coordinate_descent_check_all_directions = True
        return {"mode": plan.compile_mode}
    # CPU inference: weights become constants, convolutions get prepacked oneDNN weights
    return {"options": {"freezing": device.startswith("cpu")}}


def prepare_unet(unet, plan: FastPlan, device: str):
    """`unet` with the plan's fused QKV, memory format and compilation; returns what to call (compiled or not)."""
    import torch

    if plan.fuse_qkv:
        unet.fuse_qkv_projections()  # diffusers: one matmul for Q, K and V (self-attention) instead of three
    if plan.channels_last:
        unet.to(memory_format=torch.channels_last)
    if not plan.compile:
        return unet
    set_compile_cache()
    compiled = torch.compile(unet, **compile_kwargs(plan, device))
    if not device.startswith("cpu"):
        # CUDA graphs reuse their output memory at the next replay; a scheduler that keeps the raw model output
        # across steps (PNDM, SD 1.5's default, on an unguided step) would read an overwritten tensor. The hook runs
        # outside the compiled region and hands the pipeline a copy.
        compiled.register_forward_hook(_copy_outputs)
    return compiled


def _copy_outputs(module, args, output):
    if isinstance(output, tuple):
        return tuple(t.clone() if hasattr(t, "clone") else t for t in output)
    if hasattr(output, "sample"):
        return type(output)(sample=output.sample.clone())
    return output


def apply_plan(pipe, plan: FastPlan, device: str) -> None:
    """Switch `pipe` (already on `device`, in `plan.dtype`) to the plan's speed-ups, in place."""
    import torch

    pipe.unet = prepare_unet(pipe.unet, plan, device)
    if plan.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if plan.compile:
        pipe.vae.decode = torch.compile(pipe.vae.decode, **compile_kwargs(plan, device))
