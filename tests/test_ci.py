""".ci/run: CI must fail, not pass with the browser tests skipped, where chromium cannot be installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CI_SCRIPT = Path(__file__).parent.parent / ".ci" / "run"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_ci_fails_when_chromium_cannot_be_installed(tmp_path):
    """A checkout copy whose PATH has no chromium and whose apt-get fails: the script stops with an
    error before `make test` runs (it used to warn and run the tests with the browser ones skipped)."""
    bash, dirname = shutil.which("bash"), shutil.which("dirname")
    if not (bash and dirname):
        pytest.skip("bash or dirname missing")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(CI_SCRIPT, repo / ".ci" / "run")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, target in (("bash", bash), ("dirname", dirname)):
        (tools / name).symlink_to(target)
    stub(tools, "apt-get", "exit 100")  # what apt-get says without network or package lists
    stub(tools, "make", f"echo \"$@\" >> '{tmp_path / 'make-ran'}'")
    done = subprocess.run([bash, str(repo / ".ci" / "run")], env={"PATH": str(tools), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    assert not (tmp_path / "make-ran").exists(), "the tests ran without a browser"
    assert "chromium" in done.stderr


def test_ci_requires_the_browser_tests_to_run():
    """The script exports the switch that turns a skipped browser test into a failure (tests/conftest.py)."""
    text = CI_SCRIPT.read_text()
    assert "export TUNESMITH_REQUIRE_BROWSER=1" in text
    assert text.index("export TUNESMITH_REQUIRE_BROWSER=1") < text.index("make test")


def test_a_skipped_browser_test_fails_under_ci(tmp_path):
    """With TUNESMITH_REQUIRE_BROWSER=1, a test skipped for want of chromium is reported as failed."""
    for name in ("conftest.py", "helpers.py"):
        (tmp_path / name).write_text((Path(__file__).parent / name).read_text())
    (tmp_path / "test_fake_browser.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='chromium is not installed')\ndef test_page():\n    pass\n")
    env = {**os.environ, "TUNESMITH_REQUIRE_BROWSER": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)]
    required = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert required.returncode == 1 and "TUNESMITH_REQUIRE_BROWSER=1 but the browser test was skipped" in required.stdout, \
        required.stdout
    env.pop("TUNESMITH_REQUIRE_BROWSER")
    relaxed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
