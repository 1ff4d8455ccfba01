"""ldm img2img: edit images with text prompts.

  ldm img2img "a green circle on a blue background" --init-image in.png --strength 0.6 --seed 0
  ldm img2img "oil painting" --init-image 'photos/*.jpg' --resize-mode pad --width 512 --height 512
  ldm img2img --replay outputs/img2img/00000-42.png

--init-image takes a file, a folder or a glob; each image is edited --num-images times. Every txt2img option
applies. Without --width/--height, an image keeps its size rounded to the VAE factor by --resize-mode.
"""

from __future__ import annotations

import sys

from ldm_pipeline.cli.common import run_main
from ldm_pipeline.cli.txt2img import build_parser, run


def main(argv: list[str] | None = None, prog: str = "ldm img2img") -> int:
    return run_main(lambda a: run(a, img2img=True), build_parser(prog, img2img=True), argv)


if __name__ == "__main__":
    sys.exit(main())
