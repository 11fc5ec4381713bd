"""Packaging: the editable install the set-up script makes is quiet and plain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_editable_build_gives_no_warning_about_the_package_names(tmp_path: Path) -> None:
    # A copy of what the build reads, so that the build's egg-info and wheel stay out of
    # the checkout.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for package in ("ca", "hsm"):
        shutil.copytree(ROOT / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "wheel").mkdir()
    code = ("import setuptools.build_meta as backend, sys; "
            "print(backend.build_editable(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path / "wheel")],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "editable" in proc.stdout.lower()  # the wheel's name
    # setuptools' meta path finder strategy warns that folders named like the packages
    # (here the generic `ca` and `hsm`) may shadow them; a flat layout declared as such
    # gets a plain .pth entry instead.
    assert "Please be careful with folders" not in out


def test_collecting_the_suite_leaves_nothing_behind(tmp_path: Path) -> None:
    """Importing the suite's conftest (as `--collect-only` does) makes no SoftHSM
    directory: tokens are made by the session's first fixture, and removed with it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests/test_uri.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_uri.py" in proc.stdout
    assert list(scratch.iterdir()) == []
