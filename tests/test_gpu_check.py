"""bench/gpu_check.sh carries, as wheels, everything tunesmith and the check need that the GPU
machine's image lacks (bench/gpu_image_packages.txt): a run there costs device time that a missing
package would waste (on 2026-12-04 a rehearsal found selenium carried without its own needs, and
three of tunesmith's dependencies not carried at all)."""
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later

ROOT = Path(__file__).resolve().parents[1]
# Extras the check uses there: QLoRA, the data readers, TRL for the comparison, the test runner.
# The `test` extra's selenium stays behind on purpose: there is no browser there, its tests skip.
EXTRAS = ("qlora", "data", "bench", "test")
NOT_CARRIED = {"selenium"}


def name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def image() -> set[str]:
    lines = (ROOT / "bench" / "gpu_image_packages.txt").read_text().splitlines()
    return {name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def carried() -> dict[str, str]:
    """name -> version of every package `gpu_check.sh prepare` downloads or builds."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    prepare = script[script.index('= "prepare" ]'):script.index("exit 0", script.index('= "prepare" ]'))]
    return {name(pkg): version for pkg, version in re.findall(r"([A-Za-z][A-Za-z0-9_.-]*)==([0-9][A-Za-z0-9.]*)", prepare)}


def needed(requirement: Requirement) -> bool:
    """Whether a package needs it there (Python 3.12, no extra asked for)."""
    return requirement.marker is None or requirement.marker.evaluate({**default_environment(), "extra": "",
                                                                      "python_version": "3.12"})


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in wanted if name(r.name) not in NOT_CARRIED]


def test_every_dependency_is_in_the_image_or_carried_at_a_version_in_range():
    wheels, requirements = carried(), project_requirements()
    available = image() | set(wheels)
    missing = [str(r) for r in requirements if name(r.name) not in available]
    assert not missing, f"bench/gpu_check.sh prepare must carry: {missing}"
    out_of_range = [f"{r.name}=={wheels[name(r.name)]} (tunesmith needs {r.specifier})"
                    for r in requirements
                    if name(r.name) in wheels and not r.specifier.contains(wheels[name(r.name)], prereleases=True)]
    assert not out_of_range, out_of_range


def test_what_is_carried_finds_its_own_dependencies_there():
    """Wheels install with --no-deps there: each carried package's requirements must be in the
    image or carried too. Read from the installed packages' metadata (those installed here)."""
    wheels = carried()
    available = image() | set(wheels)
    checked, missing = 0, []
    for package in wheels:
        try:
            requires = metadata.requires(package) or []
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        for requirement in map(Requirement, requires):
            if needed(requirement) and name(requirement.name) not in available:
                missing.append(f"{package} needs {requirement.name}")
    assert checked >= 8, f"only {checked} carried packages are installed here to read"
    assert not missing, missing


def test_the_check_finds_a_dependency_left_out(monkeypatch):
    """The check itself: a dependency neither in the image nor carried is reported."""
    original = project_requirements()
    monkeypatch.setattr(sys.modules[__name__], "project_requirements",
                        lambda: original + [Requirement("some-package-nobody-carries>=1")])
    try:
        test_every_dependency_is_in_the_image_or_carried_at_a_version_in_range()
    except AssertionError as err:
        assert "some-package-nobody-carries" in str(err)
    else:
        raise AssertionError("a missing dependency went unreported")
