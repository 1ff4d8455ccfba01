"""`ldm doctor`: what a bug report needs, and the known-bad combinations it warns about."""

from ldm_pipeline.cli import main as ldm_main


def test_doctor_prints_versions_devices_and_the_shipped_model(capsys):
    rc = ldm_main(["doctor"])
    out = capsys.readouterr().out
    for lib in ("torch", "diffusers", "transformers", "accelerate", "peft"):
        assert f"\n  {lib} " in out, out
    assert "cpu:" in out and "cuda:" in out
    assert "shipped 'shapes':" in out
    assert rc == 0 and "problems: none" in out  # CI's own install is a good one


def test_doctor_warns_about_a_peft_older_than_transformers_needs(capsys, monkeypatch):
    import transformers.integrations.peft as tp

    import ldm_pipeline.cli.doctor as doctor

    real = doctor.installed
    monkeypatch.setattr(doctor, "installed", lambda dist: "0.21.2" if dist == "peft" else real(dist))
    monkeypatch.setattr(tp, "MIN_PEFT_VERSION", "0.22.0")  # what transformers 5.24 and 5.25 ask for
    assert ldm_main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "needs peft >= 0.22.0 for text-encoder LoRA, but peft 0.21.2 is installed" in out


def test_doctor_warns_about_a_library_outside_the_declared_range(capsys, monkeypatch):
    import ldm_pipeline.cli.doctor as doctor

    real = doctor.installed
    monkeypatch.setattr(doctor, "installed", lambda dist: "0.30.0" if dist == "diffusers" else real(dist))
    assert ldm_main(["doctor"]) == 1
    assert "diffusers 0.30.0 is outside what ldm_pipeline needs: diffusers>=" in capsys.readouterr().out


def test_a_missing_extra_is_one_line_naming_the_pip_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert ldm_main(["make-shapes", "--output", str(tmp_path / "d"), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ldm make-shapes: error: ldm make-shapes needs a package that is not installed: pyarrow (for the "
                   "parquet written beside each shard); run pip install 'ldm_pipeline[train]'")
    assert not (tmp_path / "d").exists()
