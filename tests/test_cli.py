import subprocess
import sys

from mmt.cli import main


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    assert main(["demo", "--steps", "60", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "reloaded model gives identical loss: True" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file()
    assert main(["inspect", str(tmp_path / "demo")]) == 0


def test_bad_override_and_bad_checkpoint_are_clear_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmt", "demo", "--steps", "1", "--set", "decoder.depht=2"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown config key decoder.depht" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "mmt", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "missing the 'model_type' key" in result.stderr
