"""ldm export: write a model as one .safetensors file in the original Stable Diffusion (CompVis/LDM, SDXL: SGM) key
layout.

  ldm export my-model --single-file my-model.safetensors
  ldm export runs/pokemon/checkpoint-1000 --single-file pokemon-ema-fp16.safetensors --ema --dtype fp16
  ldm export sd15-folder --single-file sd15.safetensors --overwrite
  ldm export my-sdxl-model --single-file my-sdxl.safetensors --dtype fp16

MODEL is anything --model accepts: a diffusers folder, an `ldm train` checkpoint folder, a single file. The keys
are the original checkpoints' (model.diffusion_model.*, first_stage_model.*, and cond_stage_model.* for SD 1.x/2.x
or conditioner.embedders.0/1.* for SDXL), as A1111 and ComfyUI read them; SD 1.x (CLIP), SD 2.x (OpenCLIP,
1024-wide) and SDXL (CLIP-L + OpenCLIP bigG) text encoders are supported. Before the file appears, diffusers' own
single-file converters must read every weight back bit for bit. Metadata records the source, dtype and the
components' configs, so `ldm txt2img --model FILE` loads the file by itself, whatever its size; plain diffusers
needs from_single_file(FILE, config=MODEL_FOLDER) for architectures it does not know.
"""

from __future__ import annotations

import argparse
import sys

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm export") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", metavar="MODEL", help="diffusers folder, `ldm train` checkpoint folder or single file")
    p.add_argument("--single-file", required=True, metavar="OUT.safetensors", help="file to write")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of the written weights (fp32: lossless; fp16/bf16: half the size)")
    p.add_argument("--ema", action="store_true",
                   help="export a training checkpoint's EMA weights (its pipeline_ema/ folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--text-encoder-layout", choices=["auto", "clip", "openclip"], default="auto",
                   help="SD 1.x/2.x text encoder key layout (auto: openclip for a 1024-wide encoder, else clip); "
                        "SDXL's is fixed, so only auto is accepted for it")
    p.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.bin/.pt MODEL (torch.load weights_only)")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.convert import export_single_file

    result = export_single_file(args.model, args.single_file, dtype=args.dtype, overwrite=args.overwrite,
                                ema=args.ema, allow_pickle=args.allow_pickle,
                                text_encoder_layout=args.text_encoder_layout)
    layout = result.text_encoder_layout
    encoders = "SDXL text encoders (CLIP-L + OpenCLIP bigG)" if layout == "sdxl" else f"{layout} text encoder"
    print(f"{result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MiB {result.dtype}, {encoders}",
          file=sys.stderr)
    print(result.path)  # stdout: just the path, for scripts
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm export") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
