"""Cold-start time of one 64x64 image: `ldm txt2img` (a fresh process) vs a plain-diffusers script that loads the
same tiny model and makes the same image (20 DDIM steps, CFG 7.5, seed 0); both interleaved, medians over several
runs. Every run is written to benchmarks/results/startup-<date>.json (see results.py; report.py makes the tables).

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py)

PROMPT = "a red circle on a blue background"
PLAIN = """
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({model!r}, safety_checker=None, requires_safety_checker=False)
image = pipe({prompt!r}, num_inference_steps=20, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save({out!r})
"""
NAMES = {"ours": "ldm txt2img", "plain": "plain diffusers script"}


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    results.add_arguments(p)
    args = p.parse_args(argv)
    begun = results.start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LDM_MODEL", None)
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "tiny")
        # the init-model command takes an architecture name (txt2img would want config:tiny for random weights)
        subprocess.run([sys.executable, "-m", "ldm_pipeline", "init-model", "--config", "tiny", "--output", model],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        script = os.path.join(tmp, "plain.py")
        with open(script, "w") as f:
            f.write(PLAIN.format(model=model, prompt=PROMPT, out=os.path.join(tmp, "plain.png")))
        # the tiny model's own defaults: 64x64, 20 steps, CFG 7.5, DDIM (the scheduler its folder names, which the
        # plain script's from_pretrained loads too)
        cmds = {
            "ours": [sys.executable, "-m", "ldm_pipeline", "txt2img", PROMPT, "--model", model, "--steps", "20",
                     "--seed", "0", "--outdir", os.path.join(tmp, "out"), "-q"],
            "plain": [sys.executable, script],
        }
        warm = {k: [timed(cmd, env)] for k, cmd in cmds.items()}  # warm the OS file cache for both
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        first: list[str] = []
        for r in range(args.repeats):
            order = ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]
            first.append(order[0])
            for k in order:
                times[k].append(timed(cmds[k], env))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| command (new process, tiny model, 64x64, 20 steps) | median s | min s | ratio |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        print(f"| {NAMES[k]} | {med[k]:.2f} | {min(ts):.2f} | {med[k] / med['plain']:.2f} |")
    settings = {"model": "tiny (ldm init-model --config tiny --seed 0)", "height": 64, "width": 64, "steps": 20,
                "guidance_scale": 7.5, "scheduler": "ddim", "repeats": args.repeats, "device": "cpu",
                "commands": {NAMES[k]: " ".join(c).replace(tmp, "$TMP") for k, c in cmds.items()},
                "plain_script": PLAIN.format(model="$TMP/tiny", prompt=PROMPT, out="$TMP/plain.png")}
    raw = {"unit": "seconds per process (start to exit)", **times, "first_in_pair": first, "warmup": warm}
    derived = {"median_ours_s": med["ours"], "median_plain_s": med["plain"], "ratio": med["ours"] / med["plain"],
               "min_ours_s": min(times["ours"]), "min_plain_s": min(times["plain"])}
    results.save("startup", begun, args, device="cpu", settings=settings, raw=raw, derived=derived)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
