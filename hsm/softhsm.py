"""SoftHSM2, the embedded default HSM: a private config and a token to go with it.

Used by `scripts/` for the embedded default under ./var and by the tests, which
make a fresh token per session. A real HSM needs none of this.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHSMMissing(RuntimeError):
    pass


def module_path() -> str:
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise SoftHSMMissing("SoftHSM2 is not installed (no libsofthsm2.so); "
                         "install it with: apt-get install softhsm2")


def write_config(directory: Path) -> Path:
    """A SoftHSM config whose tokens live in `directory/tokens`."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens.resolve()}\n"
                    "objectstore.backend = file\n"
                    "log.level = ERROR\n"
                    "slots.removable = false\n")
    return conf


def init_token(conf: Path, label: str, pin_file: Path) -> None:
    """Initialise a token; the user PIN is generated and written to `pin_file` (0600)."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHSMMissing("softhsm2-util not found; install it with: apt-get install softhsm2")
    pin = secrets.token_hex(16)
    so_pin = secrets.token_hex(16)
    pin_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pin + "\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    # The PINs go on the command line because softhsm2-util has no other way; they
    # are never printed, and the SO PIN is thrown away (the dev token needs no SO).
    proc = subprocess.run([util, "--init-token", "--free", "--label", label,
                           "--pin", pin, "--so-pin", so_pin],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"softhsm2-util could not create token {label!r}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
