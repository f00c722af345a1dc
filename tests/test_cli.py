import subprocess
import sys

import pytest

from mmt.cli import main


@pytest.mark.e2e
def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    assert main(["demo", "--steps", "60", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "reloaded model gives identical loss: True" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file()
    assert main(["inspect", str(tmp_path / "demo")]) == 0


@pytest.mark.multiprocess
def test_bad_override_and_bad_checkpoint_are_clear_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmt", "demo", "--steps", "1", "--set", "decoder.depht=2"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown config key decoder.depht" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "mmt", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "missing the 'model_type' key" in result.stderr


@pytest.mark.multiprocess
def test_version_and_help_load_no_torch():
    code = "import sys; from mmt.cli import build_parser; build_parser(); import mmt; print(mmt.__version__, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [__import__("mmt").__version__, "False"]
    version = subprocess.run([sys.executable, "-m", "mmt", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"mmt {__import__('mmt').__version__}"


def test_old_spellings_still_work_and_say_what_to_write_instead(tmp_path, capsys):
    from mmt.cli import build_parser, parse

    parser = build_parser()
    args = parse(["train", "--run-dir", str(tmp_path), "vqa"])
    assert args.old_run_dir == str(tmp_path) and args.run_dir is None and args.task == "vqa"
    assert "mmt train TASK RUN_DIR" in capsys.readouterr().err
    args = parser.parse_args(["predict", "runs/x", "--input", "a.jsonl", "--output", "b.jsonl"])
    assert args.out == "b.jsonl" and "use --out" in capsys.readouterr().err
    args = parser.parse_args(["search", "idx", "--text", "a", "-k", "3"])
    assert args.num_results == 3 and "--num-results" in capsys.readouterr().err
    for command in (["data", "check", "x.json"], ["data", "pack", "x.json", "--out", "o"]):
        args = parser.parse_args([*command, "--images", "root"])
        assert args.image_root == "root" and "--image-root" in capsys.readouterr().err
    args = parse(["train", "vqa", "runs/v", "--resume"])
    assert args.run_dir == "runs/v" and args.resume is True
    args = parse(["train", "vqa", "--preset", "vqa-small", "runs/x", "--set", "train.steps=5"])  # options anywhere
    assert (args.task, args.run_dir, args.preset, args.set) == ("vqa", "runs/x", "vqa-small", ["train.steps=5"])


def test_decoding_flags_mean_the_same_on_eval_and_predict():
    from mmt.cli import _decoding, build_parser

    parser = build_parser()
    flags = ["--beam", "3", "--length-penalty", "0.6", "--num-return", "2", "--max-new-tokens", "9"]
    for command in (["eval", "runs/x"], ["predict", "runs/x"]):
        assert _decoding(parser.parse_args([*command, *flags])) == {  # beams, so not sampling, whatever the run says
            "num_beams": 3, "length_penalty": 0.6, "num_return": 2, "max_new_tokens": 9, "do_sample": False
        }
        assert _decoding(parser.parse_args([*command, "--sample", "--top-p", "0.9"])) == {"do_sample": True, "top_p": 0.9, "num_beams": 1}
        assert _decoding(parser.parse_args(command)) == {}  # unset: the run's own settings


def test_settings_out_of_range_are_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "vqa", str(run), "--set", "train.grad_clip=-1"]) == 2  # would flip the gradients' sign
    assert "train.grad_clip: -1.0 is out of range (must be >= 0)" in capsys.readouterr().err
    assert not run.exists()
    assert main(["train", "vqa", str(run), "--preset", "caption-small"]) == 2
    err = capsys.readouterr().err
    assert "preset 'caption-small' is not a model of `mmt train vqa`" in err and "vqa-small" in err
    for command in (["search", "idx", "--text", "a", "--nprobe", "0"], ["eval", "runs/x", "--beam", "0"],
                    ["predict", "runs/x", "--top-p", "1.5"], ["index", "runs/x", "g.jsonl", "--out", "i", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2 and "is out of range (must be" in capsys.readouterr().err, command


def test_a_corrupt_run_config_is_named_when_resuming(tmp_path, capsys):
    (tmp_path / "run_config.json").write_text('{"task": "vqa", "train": {')
    assert main(["train", "vqa", str(tmp_path), "--resume"]) == 2
    assert f"{tmp_path / 'run_config.json'}: not valid json" in capsys.readouterr().err
