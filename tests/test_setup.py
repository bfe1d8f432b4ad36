"""`make setup` is idempotent: a second run finds everything and installs nothing, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT


def pip_freeze():
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    )
    return sorted(out.stdout.splitlines())


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve(),
    reason="runs only inside the project's own .venv (made by `make setup`)",
)
def test_second_setup_installs_nothing_and_needs_no_network():
    before = pip_freeze()
    # Any attempt to reach a package index now fails at once.
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    env.pop("PIP_FIND_LINKS", None)
    result = subprocess.run(
        ["bash", "scripts/setup_env.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to install" in result.stdout, result.stdout
    assert "keeping" in result.stdout
    assert pip_freeze() == before


def test_requirements_check_reports_unmet(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from requirements_met import unmet_requirements
    finally:
        sys.path.pop(0)
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\npytest\nnumpy<0.1\nsurely-not-installed-pkg-xyz\n")
    unmet = unmet_requirements(str(req))
    assert len(unmet) == 2
    assert unmet[0].startswith("numpy<0.1 (found ")
    assert unmet[1] == "surely-not-installed-pkg-xyz (missing)"
