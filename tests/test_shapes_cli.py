"""`ldm make-shapes` output through the training data loader; `ldm eval`'s harness on an oracle and a real model."""

from types import SimpleNamespace

import pytest

from ldm_pipeline.cli import main as ldm_main


def test_make_shapes_reads_back_through_the_training_loader(tmp_path):
    from ldm_pipeline.data import DataConfig, build_dataset, make_dataloader
    from ldm_pipeline.shapes.domain import HELD_OUT
    from ldm_pipeline.shapes.scoring import parse_prompt

    out = tmp_path / "shapes"
    assert ldm_main(["make-shapes", "--output", str(out), "--num-samples", "60", "--seed", "1",
                     "--samples-per-shard", "25"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    ds = build_dataset(DataConfig(source=str(out), resolution=64, num_workers=0), batch_size=20)
    loader = iter(make_dataloader(ds, 0))
    seen = []
    for _ in range(3):
        batch = next(loader)
        assert tuple(batch["pixel_values"].shape) == (20, 3, 64, 64)
        seen += batch["captions"]
    assert len(seen) == 60
    for caption in seen:
        e = parse_prompt(caption)
        assert (e.colour, e.shape) not in HELD_OUT
    assert ldm_main(["make-shapes", "--output", str(out), "--num-samples", "5"]) == 2  # not empty


class Oracle:
    """Draws exactly what each prompt asks (and recolours perfectly): the harness must score it 100 %."""

    def generate(self, jobs, batch_size=1):
        from ldm_pipeline.shapes.domain import ShapeSpec, render
        from ldm_pipeline.shapes.scoring import parse_prompt

        centres = {None: (32, 32), "in the center": (32, 32), "on the left": (14, 32), "on the right": (50, 32),
                   "at the top": (32, 14), "at the bottom": (32, 50)}
        for job in jobs:
            e = parse_prompt(job.prompt)
            cx, cy = centres[e.position]
            image = render(ShapeSpec(e.colour, e.shape, e.background, cx=cx, cy=cy, size=24))
            yield SimpleNamespace(job=job, image=image)


def test_eval_harness_scores_an_oracle_perfectly():
    from ldm_pipeline.shapes.evaluate import EvalSettings, run_eval

    result = run_eval(Oracle(), EvalSettings(seeds_per_prompt=1, recolour_prompts=10, caption_separation=False),
                      progress=False)
    r = result.report
    assert r.held_in_accuracy == 1.0 and r.held_out_accuracy == 1.0 and r.position_accuracy == 1.0
    assert r.num_held_out == 28
    assert result.recolour["count"] == 10 and result.recolour["all"] == 1.0


def test_eval_cli_on_a_random_model(tiny_model, tmp_path):
    import json

    out = tmp_path / "ev"
    assert ldm_main(["eval", "--model", str(tiny_model), "--max-prompts", "2", "--seeds-per-prompt", "1",
                     "--recolour", "2", "--steps", "2", "-o", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["txt2img"]["num_images"] == 6 and rep["settings"]["num_inference_steps"] == 2
    assert (out / "grid.png").is_file() and (out / "report.md").read_text().startswith("|")


@pytest.mark.parametrize("argv, msg", [(["eval", "--seeds-per-prompt", "0"], "at least 1"),
                                       (["make-shapes", "--output", "x", "--num-samples", "0"], "at least 1")])
def test_shapes_cli_errors(argv, msg, capsys):
    assert ldm_main(argv) == 2
    assert msg in capsys.readouterr().err
