"""`ldm train` from the command line: errors are one line with exit code 2; the real console script runs."""

from __future__ import annotations

import pytest

from ldm_pipeline.cli import main as ldm_main
from ldm_pipeline.cli.train import main
from tests.conftest import run_cli


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", ["missing_data", "bad_model", "bad_key", "unwritable", "non_empty"])
def test_errors_are_one_line_exit_2(case, tiny_model, laion_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "--output-dir", str(out),
            "max_steps=1"]
    if case == "missing_data":
        args[5] = str(tmp_path / "nothing-here")
    elif case == "bad_model":
        args[3] = str(tmp_path / "no-model")
    elif case == "bad_key":
        args.append("optimiser.lr=1")
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        args[7] = str(tmp_path / "file" / "out")
    elif case == "non_empty":
        out.mkdir()
        (out / "something").write_text("x")
    assert main(args) == 2
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("ldm train: error:"), err
    assert "Traceback" not in err[0]


def test_console_script_end_to_end(tiny_model, laion_data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data),
                "--output-dir", str(out), "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "2")
    assert r.returncode == 0, r.stderr
    assert (out / "final" / "model_index.json").is_file() and (out / "samples" / "step-0000002.png").is_file()
    # txt2img loads the checkpoint (in-process: its console script has its own subprocess test)
    assert ldm_main(["txt2img", "a test", "--model", str(out / "checkpoint-2"), "--steps", "2", "--seed", "1",
                     "--height", "32", "--width", "32", "-o", str(tmp_path / "imgs"), "-q"]) == 0
    assert (tmp_path / "imgs" / "00000-1.png").is_file()


def test_data_summary_is_printed_each_epoch_and_at_the_end(tiny_model, laion_data, tmp_path, capsys):
    assert main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data),
                 "--output-dir", str(tmp_path / "run"), "--max-steps", "5", "--checkpoint-every", "0"]) == 0
    out = capsys.readouterr().out
    # 16 samples, 4 per optimizer step: epoch 0 is done after step 4 (seen once the first epoch-1 batch is out)
    assert "data after epoch 1: seen 16, used 16, skipped 0" in out, out
    assert "data: seen 20, used 20, skipped 0" in out, out


def test_user_error_in_a_dataloader_worker_is_one_line(tiny_model, tmp_path, capsys):
    from tests.fixtures import write_laion_fixture

    data = tmp_path / "bad"
    write_laion_fixture(data, n=0, shards=1, odd=("corrupt", "not_image"))  # nothing usable: the worker gives up
    rc = main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(data), "--output-dir",
               str(tmp_path / "out"), "max_steps=1", "data.num_workers=1"])
    err = _err(capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ldm train: error:") and "no usable sample" in err[0], err
