"""README command 1: scripts/quickstart sets up the embedded default and serves."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_sets_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("scripts", "softhsm.conf", "pyproject.toml", "ca", "hsm"):
        (repo / name).symlink_to(ROOT / name)
    (repo / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["LISTEN"] = "127.0.0.1:0"
    proc = subprocess.Popen(["bash", "scripts/quickstart"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(180, proc.kill)  # a watchdog, not a synchronisation sleep
    timer.start()
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "ssh-keygen -L" in line:
                break
        text = "".join(lines)
        first = next(x for x in lines if x.startswith("listening on https://"))
        url = first.split()[-1]
        assert f"--url {url}" in text and "hsmca ssh user" in text and "enroll" in text
        ctx = ssl.create_default_context(cafile=str(repo / "var/ca/x509/root.pem"))
        with urllib.request.urlopen(f"{url}/health", context=ctx, timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        pin = (repo / "var/pin").read_text().strip()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    err = proc.stderr.read() if proc.stderr else ""
    assert pin not in text + err
    assert (repo / "var/tokens").is_dir() and (repo / "var/ca/hsmca.toml").is_file()
    log = (repo / "var/ca/audit/log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "hsm.logout"


def test_quickstart_says_a_listen_it_cannot_use_in_its_own_name() -> None:
    """A new user's trial set LISTEN=9443 and was told `--listen must be HOST:PORT`, a
    flag it never gave. Said as LISTEN, before anything is set up."""
    env = {**os.environ, "LISTEN": "9443"}
    proc = subprocess.run(["bash", "scripts/quickstart"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == (
        "quickstart: LISTEN must be HOST:PORT, e.g. LISTEN=127.0.0.1:9443 (port 0: a free "
        "one), not '9443'\n"), proc.stderr
