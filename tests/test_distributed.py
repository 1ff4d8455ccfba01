"""2-process generation with torchrun on CPU (gloo): every image exactly once, identical to one process."""

import json

import numpy as np
from PIL import Image

from tests.conftest import run_cli, run_torchrun


def test_two_processes_split_the_prompts(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    common = ["--from-file", str(prompts), "--model", str(tiny_model), "--num-images", "2", "--steps", "3",
              "--scheduler", "euler-a"]
    # no --seed: rank 0 draws the base seed and broadcasts it, so image i has seed base + i on whichever rank
    r = run_torchrun("txt2img", *common, "--outdir", str(dist_out), "-q", "--grid")
    assert r.returncode == 0, r.stderr[-2000:]
    dist_files = sorted(p.name for p in dist_out.glob("0*.png"))
    seeds = [json.loads(Image.open(dist_out / name).info["ldm_pipeline"])["seed"] for name in dist_files]
    assert len(dist_files) == 6 and (dist_out / "grid-00000.png").is_file()
    assert seeds == [seeds[0] + i for i in range(6)], seeds
    assert [int(n.split("-")[1].split(".")[0]) for n in dist_files] == seeds
    # same thread count as torchrun's ranks: CPU float reductions depend on it, not on how work is split
    r1 = run_cli("txt2img", *common, "--seed", str(seeds[0]), "--outdir", str(single_out), "-q",
                 env={"OMP_NUM_THREADS": "1"})
    assert r1.returncode == 0, r1.stderr
    assert dist_files == sorted(p.name for p in single_out.glob("*.png"))
    for name in dist_files:
        a = np.asarray(Image.open(dist_out / name))
        b = np.asarray(Image.open(single_out / name))
        assert np.array_equal(a, b), name
    # both ranks wrote: each saved path is printed by the rank that made it
    assert len([ln for ln in r.stdout.splitlines() if ln.endswith(".png")]) == 7


def test_grid_with_a_rank_that_has_no_jobs(tiny_model, tmp_path):
    # one image for two ranks: rank 1 gets nothing to do but must still join the grid's gather
    out = tmp_path / "out"
    r = run_torchrun("txt2img", "a red circle", "--model", str(tiny_model), "--seed", "4", "--steps", "2",
                     "--outdir", str(out), "-q", "--grid", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-4.png", "grid-00000.png"]
    assert Image.open(out / "grid-00000.png").size == (64, 64)
