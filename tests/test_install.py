"""`pip install .` gives an installable project: its packages, typed, and its console scripts.

The wheel is built from this checkout and installed into a fresh virtualenv, away from the
source tree. The dependencies are not downloaded again: the fresh environment reads this
environment's site-packages through a `.pth` line (which adds a folder, not the `.pth` files in
it, so the checkout's own editable install stays out), and every import of the project must
come from the installed copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "matcher-serve": "python -m service",
    "matcher-match": "python -m service.client",
    "matcher-train": "python -m train",
    "matcher-report": "python -m train.visual_report",
    "matcher-export": "python -m export",
    "matcher-integrity": "python -m integrity",
}
PACKAGES = ("matcher", "service", "train", "export", "integrity")


def run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the pinned setuptools of this environment builds it, offline.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", out, source, cwd=out)
    [built] = out.glob("matcher-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent)
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    run(*pip, "install", "--no-deps", "--no-index", wheel, cwd=root.parent)
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    deps = Path(sysconfig.get_path("purelib"))
    (Path(site.stdout.strip()) / "checkout-dependencies.pth").write_text(f"{deps}\n")
    return root


def test_the_wheel_holds_the_packages_and_their_type_information(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("matcher-")}
    assert tops == set(PACKAGES)
    assert {"matcher/py.typed", "matcher/v1/matcher_pb2.pyi", "matcher/v1/matcher_pb2.py"} <= set(
        names
    )
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{script} = " in text for script in SCRIPTS)


def test_installed_packages_come_from_the_install_not_the_checkout(venv: Path) -> None:
    code = "import sys; " + "; ".join(f"import {p}; print({p}.__file__)" for p in PACKAGES)
    files = run(venv / "bin" / "python", "-c", code, cwd=venv).stdout.split()
    assert len(files) == len(PACKAGES)
    assert all(Path(f).is_relative_to(venv) for f in files), files


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_runs_what_python_m_runs(venv: Path, script: str) -> None:
    installed = run(venv / "bin" / script, "--help", cwd=venv).stdout
    module = SCRIPTS[script].removeprefix("python -m ").split()
    from_source = run(sys.executable, "-m", *module, "--help", cwd=ROOT).stdout
    assert installed.strip() and installed == from_source
