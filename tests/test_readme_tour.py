"""The README's five-minute tour, run exactly as written against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import init_ca, require, start_daemon

ROOT = Path(__file__).resolve().parent.parent


def tour_script() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tour -->\n```bash\n(.*?)```\n<!-- /tour -->", text, re.S)
    assert m, "README.md lost its tour block"
    return m.group(1)


def files_outside_the_ca(work: Path) -> set[str]:
    """The checkout's files, except the CA state the running daemon itself writes to."""
    ca = work / "var" / "ca"
    return {p.relative_to(work).as_posix() for p in work.rglob("*")
            if ca not in p.parents and p != ca}


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    for tool in ("openssl", "curl", "ssh-keygen"):
        require(tool)
    work = tmp_path / "repo"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv/bin/hsmca
    ca = init_ca(work / "var")  # -> work/var/ca, as scripts/quickstart lays it out
    scratch = tmp_path / "tmp"  # where the tour's `mktemp -d` goes
    scratch.mkdir()
    before = files_outside_the_ca(work)
    d = start_daemon(ca.state)
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", tour_script()], cwd=work,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TMPDIR": str(scratch),
                                   "PATH": f"{work / '.venv/bin'}:{os.environ['PATH']}"})
    finally:
        d.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Nothing the tour made is in the checkout: it all went to its temporary directory.
    assert files_outside_the_ca(work) == before
    [tour_dir] = scratch.iterdir()
    assert (tour_dir / "svc.pem").is_file() and (tour_dir / "alice/id_ed25519-cert.pub").is_file()
    assert "--token " not in tour_script() and "Bearer $TOKEN" not in tour_script()
    out = proc.stdout
    assert "svc.pem: OK" in out
    assert "HostCertificate" in out
    assert 'Key ID: "alice@example.com:' in out and "alice" in out
    assert out.strip().splitlines()[-3].startswith("OK:")
    assert out.strip().splitlines()[-2].startswith("checkpoint: the daemon's latest ")
    assert out.strip().splitlines()[-1] == \
        "witnessed: no witness has cosigned a checkpoint of this log"
