"""Cold-start time of one 64x64 image: `ldm txt2img` (a fresh process) vs a plain-diffusers script that loads the
same tiny model and makes the same image; both interleaved, medians over several runs.

  python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PLAIN = """
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({model!r}, safety_checker=None, requires_safety_checker=False)
image = pipe("a red circle on a blue background", num_inference_steps=20, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save({out!r})
"""


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "tiny")
        subprocess.run([sys.executable, "-m", "ldm_pipeline", "init-model", "--config", "tiny", "--output", model],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        script = os.path.join(tmp, "plain.py")
        with open(script, "w") as f:
            f.write(PLAIN.format(model=model, out=os.path.join(tmp, "plain.png")))
        ours = [sys.executable, "-m", "ldm_pipeline", "txt2img", "a red circle on a blue background", "--model", model,
                "--steps", "20", "--seed", "0", "--outdir", os.path.join(tmp, "out"), "-q"]
        plain = [sys.executable, script]
        times: dict[str, list[float]] = {"ldm txt2img": [], "plain diffusers script": []}
        timed(ours, env)  # warm the OS file cache for both
        timed(plain, env)
        for r in range(args.repeats):
            pairs = [("ldm txt2img", ours), ("plain diffusers script", plain)]
            for name, cmd in pairs if r % 2 == 0 else reversed(pairs):
                times[name].append(timed(cmd, env))
        base = statistics.median(times["plain diffusers script"])
        print("\n| command (new process, tiny model, 64x64, 20 steps) | median s | min s | ratio |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
