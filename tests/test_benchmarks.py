"""Benchmarks write results files, and the docs' tables are generated from them (benchmarks/results.py, report.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def generate_result(tmp_path_factory) -> Path:
    """One minimal bench_generate.py run (tiny random model, 1 repeat, no warm-up, 2 steps) in a subprocess."""
    out = tmp_path_factory.mktemp("results")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_generate.py"), "--model", "config:tiny", "--repeats", "1", "--warmup", "0",
         "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--results-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.glob("generate-*.json"))
    assert len(files) == 1, (files, proc.stdout)
    assert f"results: {files[0]}" in proc.stdout  # the path is printed
    return files[0]


def test_generate_writes_a_complete_results_file(generate_result):
    rec = json.loads(generate_result.read_text())
    assert rec["benchmark"] == "generate"
    assert rec["command"].startswith("python benchmarks/bench_generate.py --model config:tiny --repeats 1")
    m = rec["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["ram_gib"] > 0 and m["os"]
    assert rec["device"]["type"] == "cpu" and rec["device"]["name"]
    for pkg in ("python", "torch", "diffusers", "transformers", "accelerate", "ldm_pipeline"):
        assert rec["versions"][pkg], pkg
    assert rec["date"].endswith("Z") and "T" in rec["date"]
    stamp = rec["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
    assert generate_result.name == f"generate-{stamp}.json"
    s = rec["settings"]
    assert (s["model"], s["steps"], s["height"], s["width"], s["repeats"], s["warmup"]) == \
        ("config:tiny", 2, 32, 32, 1, 0)
    raw = rec["raw"]
    assert len(raw["ours"]) == 1 and len(raw["plain"]) == 1 and all(t > 0 for t in raw["ours"] + raw["plain"])
    assert rec["derived"]["ratio"] == pytest.approx(raw["ours"][0] / raw["plain"][0])


def test_report_renders_a_row_per_file(generate_result, tmp_path):
    report = _module("report")
    tables = report.render(report.load(generate_result.parent), page=tmp_path / "page.md")
    rows = [line for line in tables.splitlines() if generate_result.name in line]
    assert len(rows) == 1
    assert "`config:tiny`, 32×32, 2 DDIM steps" in rows[0] and "CPU " in rows[0]
    rec = json.loads(generate_result.read_text())
    assert f"{rec['derived']['ratio']:.3f}" in rows[0]

    page = tmp_path / "page.md"
    page.write_text(f"# Benchmarks\n\nprose\n\n{report.BEGIN}\nstale\n{report.END}\n\nmore prose\n")
    args = ["--results-dir", str(generate_result.parent)]
    assert report.main([*args, "--check", str(page)]) == 1
    assert report.main([*args, "--write", str(page)]) == 0
    text = page.read_text()
    assert "stale" not in text and rows[0] in text and text.startswith("# Benchmarks\n\nprose\n") \
        and text.endswith("\n\nmore prose\n")
    assert report.main([*args, "--check", str(page)]) == 0


def test_docs_page_is_generated_from_the_committed_results():
    """docs/benchmarks.md shows exactly what benchmarks/results/*.json hold: rerun report.py --write after a run."""
    report = _module("report")
    page = ROOT / "docs" / "benchmarks.md"
    assert report.main(["--check", str(page)]) == 0, "python benchmarks/report.py --write docs/benchmarks.md"


def test_results_files_are_never_overwritten(tmp_path):
    results = _module("results")
    rec = {"benchmark": "demo", "date": "2024-01-02T03:04:05Z", "raw": [1.0]}
    first, second = results.write(rec, tmp_path), results.write({**rec, "raw": [2.0]}, tmp_path)
    assert (first.name, second.name) == ("demo-20240102-030405.json", "demo-20240102-030405-2.json")
    assert json.loads(first.read_text())["raw"] == [1.0] and json.loads(second.read_text())["raw"] == [2.0]
    assert {p.name for p in tmp_path.iterdir()} == {first.name, second.name}  # no temporary left behind


def test_a_check_that_crashes_fails_and_the_rest_still_run():
    acc = _module("gpu_acceptance").Acceptance()
    acc.run("boom", lambda: 1 / 0)
    acc.run("fine", lambda: (True, "ok"))
    acc.run("n/a", lambda: (None, "needs CUDA"))
    assert acc.checks["boom"]["ok"] is False and "ZeroDivisionError" in acc.checks["boom"]["detail"]
    assert acc.checks["fine"]["ok"] is True and acc.checks["n/a"]["ok"] is None


@pytest.mark.slow
def test_gpu_acceptance_dry_run_on_cpu(tmp_path):
    """The GPU acceptance script is run on CPU (tiny model) before any GPU time is spent on it: every check that
    applies to a CPU passes, and the results file has the acceptance fields."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_acceptance.py"), "--device", "cpu", "--results-dir",
                           str(out)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("gpu-*.json")
    rec = json.loads(path.read_text())
    assert rec["device"]["type"] == "cpu" and "fast_speedup_sd15_512" in rec
    checks = rec["checks"]
    expected = {"txt2img_fp32", "img2img_fp32", "txt2img_bf16", "img2img_bf16", "replay_bit_exact", "cpu_offload",
                "vae_tiling", "fast_vs_plain", "train_sigkill_resume", "train_cached_latents", "train_lora",
                "train_fsdp_1_process", "sdxl_txt2img", "sdxl_finetune_step", "sdxl_lora_step"}
    assert set(checks) == expected
    skipped = {n for n, c in checks.items() if c["ok"] is None}
    assert skipped == {"cpu_offload", "train_fsdp_1_process"}  # CUDA-only
    assert all(c["ok"] is True and c["detail"] for n, c in checks.items() if n not in skipped), checks
    assert "weights equal" in checks["train_sigkill_resume"]["detail"]
