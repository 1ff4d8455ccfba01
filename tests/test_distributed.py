"""2-process generation with torchrun on CPU (gloo): every image exactly once, identical to one process."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_split_the_prompts(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    common = ["--from-file", str(prompts), "--model", str(tiny_model), "--seed", "3", "--num-images", "2",
              "--steps", "3", "--scheduler", "euler-a"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ldm_pipeline", "txt2img",
           *common, "--outdir", str(dist_out), "-q", "--grid"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # same thread count as torchrun's ranks: CPU float reductions depend on it, not on how work is split
    r1 = run_cli("txt2img", *common, "--outdir", str(single_out), "-q", env={"OMP_NUM_THREADS": "1"})
    assert r1.returncode == 0, r1.stderr
    dist_files = sorted(p.name for p in dist_out.glob("0*.png"))
    assert dist_files == sorted(p.name for p in single_out.glob("*.png"))
    assert len(dist_files) == 6 and (dist_out / "grid-00000.png").is_file()
    for name in dist_files:
        a = np.asarray(Image.open(dist_out / name))
        b = np.asarray(Image.open(single_out / name))
        assert np.array_equal(a, b), name
    # both ranks wrote: each saved path is printed by the rank that made it
    assert len([ln for ln in r.stdout.splitlines() if ln.endswith(".png")]) == 7
    assert sys.executable
