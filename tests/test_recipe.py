"""The shapes recipe end to end on a tiny budget: every stage runs through the real commands' code paths."""

import json

import pytest

from ldm_pipeline.cli import main as ldm_main


@pytest.mark.slow  # every stage, run five times (minutes on 2 CPU cores)
def test_recipe_tiny_budget_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "recipe"
    assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress"]) == 0
    metrics = json.loads((out / "recipe.json").read_text())
    assert metrics["vae"]["psnr"] > 0 and metrics["vae"]["scaling_factor"] > 0
    assert set(metrics["scores"]) >= {"default", "ddim50", "defaults"}
    assert (out / "tokenizer" / "vocab.json").is_file()
    model = out / "model"
    assert (model / "model_index.json").is_file() and (model / "README.md").read_text().startswith("# ldm_pipeline")
    te = json.loads((model / "text_encoder" / "config.json").read_text())
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    assert te["vocab_size"] == len(vocab) and te["max_position_embeddings"] == 32  # the tokenizer decides
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == metrics["vae"]["scaling_factor"]
    # the packaged model generates through the normal CLI with its own defaults
    assert ldm_main(["txt2img", "a red circle on a blue background", "--model", str(model), "--seed", "0",
                     "--outdir", str(tmp_path / "img"), "-q"]) == 0
    assert len(list((tmp_path / "img").glob("*.png"))) == 1
    # running again continues: every stage is already done, the evaluation included
    scores = out / "eval" / "scores.json"
    evaluated = scores.stat().st_mtime_ns
    assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress"]) == 0
    assert scores.stat().st_mtime_ns == evaluated
    # a different evaluation setting evaluates again
    assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress",
                     "eval_recolour=1"]) == 0
    assert scores.stat().st_mtime_ns != evaluated
    # so does a changed evaluator: scores of older evaluation code are not reused
    import ldm_pipeline.shapes.recipe as recipe

    evaluated = scores.stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(recipe, "_evaluator_hash", lambda: "changed")
        assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress",
                         "eval_recolour=1"]) == 0
    assert scores.stat().st_mtime_ns != evaluated
    # stage times add up over the invocations that did work; a re-evaluation replaces the evaluation's time
    times = json.loads((out / "times.json").read_text())
    assert set(metrics["seconds"]) == {"data", "vae", "tokenizer", "unet", "eval", "total"}
    assert all(v > 0 for v in metrics["seconds"].values())
    assert times["unet"] == metrics["seconds"]["unet"] and times["eval"] != metrics["seconds"]["eval"]
    # an edited `defaults:` of the model config reaches the trained model without training again, and the
    # evaluation is run again at the new defaults
    import ldm_pipeline.models as models

    real = models.load_model_spec

    def new_defaults(name):
        spec = real(name)
        spec.defaults.guidance_cutoff = 0.5
        return spec

    evaluated, unet_time = scores.stat().st_mtime_ns, json.loads((out / "times.json").read_text())["unet"]
    with monkeypatch.context() as m:
        m.setattr(models, "load_model_spec", new_defaults)
        assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress",
                         "eval_recolour=1"]) == 0
    assert scores.stat().st_mtime_ns != evaluated
    assert json.loads(scores.read_text())["defaults"]["guidance_cutoff"] == 0.5
    assert json.loads((model / "ldm_defaults.json").read_text())["guidance_cutoff"] == 0.5
    assert "at timesteps >= 0.5 of the schedule" in (model / "README.md").read_text()
    times = json.loads((out / "times.json").read_text())
    assert times["unet"] == unet_time
    # a stage trained with other settings is never silently reused: one line naming the difference, exit 2
    capsys.readouterr()
    assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress",
                     "train_overrides.learning_rate=0.5"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.5" in err and "remove it" in err, err
    assert json.loads((out / "times.json").read_text())["unet"] == times["unet"]
    # nor is an initial model built before its architecture YAML was edited (the same config name)
    def edited(name):
        spec = real(name)
        spec.unet = {**spec.unet, "layers_per_block": 7}
        return spec

    with monkeypatch.context() as m:
        m.setattr(models, "load_model_spec", edited)
        assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "init was made with other settings (unet.layers_per_block:" in err and "-> 7" in err, err


def test_interrupted_stage_still_counts_its_time(tmp_path, monkeypatch):
    import time

    import ldm_pipeline.training.loop as loop

    def interrupted(config):
        time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    out = tmp_path / "recipe"
    assert ldm_main(["recipe", "shapes", "--output-dir", str(out), "--budget", "tiny", "--no-progress"]) == 130
    times = json.loads((out / "times.json").read_text())
    assert times["unet"] >= 0.05 and times["data"] > 0 and times["tokenizer"] > 0
