"""Packaging: the extras that hold the heavy parts, and the error that names a missing one."""

import subprocess
import sys
import tomllib
from pathlib import Path

from mmt.extras import DISTRIBUTION, EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_optional_package_is_in_its_extra_and_in_all():
    meta = project()
    assert meta["name"] == DISTRIBUTION
    extras = meta["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert any(req.startswith(package) for req in extras[extra]), (module, extra, extras[extra])
        assert extra in extras["all"][0], extras["all"]
        assert not any(req.startswith(package) for req in meta["dependencies"]), f"{package} is optional, not a core dependency"
    assert any("[all]" in req for req in extras["dev"])  # the test command installs every extra


def test_license_and_type_marker_ship():
    assert project()["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert (ROOT / "mmt" / "py.typed").is_file()


def test_a_command_whose_extra_is_missing_names_the_extra(tmp_path):
    code = "import sys; sys.modules['faiss'] = None; import mmt.cli; sys.exit(mmt.cli.main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "search", str(tmp_path), "--text", "a red circle"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"pip install '{DISTRIBUTION}[search]'" in out.stderr and "faiss-cpu" in out.stderr
