"""SoftHSM2, the embedded default HSM: a private config and a token to go with it.

Used by `scripts/` for the embedded default under ./var and by the tests, which
make a fresh token per session. A real HSM needs none of this.
"""

from __future__ import annotations

import os
import pty
import re
import secrets
import select
import shutil
import subprocess
import time
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


def config_in_use(module: str) -> Path | None:
    """The softhsm2.conf a SoftHSM module reads in this process; None for other modules."""
    if "softhsm" not in Path(module).name.lower():
        return None
    return Path(os.environ.get("SOFTHSM2_CONF", "/etc/softhsm/softhsm2.conf"))


def why_not_loaded(module: str) -> str | None:
    """For SoftHSM, why it cannot start, as far as its config tells (it says nothing
    itself): the config file SOFTHSM2_CONF names, or the token directory in it, missing
    or unreadable. None when that is not it, or the module is not SoftHSM. Never raises:
    it is asked while something else is being reported."""
    conf = config_in_use(module)
    if conf is None:
        return None
    try:
        text = conf.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"its config {conf} (SOFTHSM2_CONF) cannot be read: " \
               f"{getattr(exc, 'strerror', None) or exc}"
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "directories.tokendir":
            return _tokendir_problem(Path(value.strip()), conf)
    return None  # SoftHSM's built-in default then (a review: no such line is no error)


def _tokendir_problem(tokens: Path, conf: Path) -> str | None:
    # Read, not os.access, which says yes to root whatever the mode. Path.is_dir()
    # raises PermissionError for a directory above it this user cannot search (a review:
    # raised from an HSM reconnect, it ended the signing thread for good).
    try:
        with os.scandir(tokens) as entries:
            next(entries, None)
    except FileNotFoundError:
        return f"its token directory {tokens} (directories.tokendir in {conf}) does not exist"
    except NotADirectoryError:
        return f"its token directory {tokens} (directories.tokendir in {conf}) is not a directory"
    except PermissionError:
        return f"its token directory {tokens} (in {conf}) cannot be read by this user"
    except (OSError, ValueError):  # (ValueError: a NUL in the path)
        pass
    return None


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


# softhsm2-util asks for each PIN twice, in this order, when --so-pin/--pin are absent.
_PROMPT = re.compile(rb"Please (?:re)?enter (SO|user) PIN: ")
_DIALOGUE_S = 60


def init_token(conf: Path, label: str, pin_file: Path) -> None:
    """Initialise a token; the user PIN is generated and written to `pin_file` (0600).

    softhsm2-util takes PINs either as --pin/--so-pin arguments, which every local user
    can read in /proc/PID/cmdline while it runs, or typed at its prompts. It reads the
    prompts only from a terminal, so it gets a pseudo-terminal here and the PINs are
    typed into it: they never appear in any process's argv. (The transcript, shown on
    failure, has any echoed PIN masked.)"""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHSMMissing("softhsm2-util not found; install it with: apt-get install softhsm2")
    pins = {b"user": secrets.token_hex(16).encode(),
            b"SO": secrets.token_hex(16).encode()}  # the dev token needs no SO: not kept
    pin_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pins[b"user"].decode() + "\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    status, transcript = _converse(
        [util, "--init-token", "--free", "--label", label], env, pins)
    if status != 0:
        raise RuntimeError(f"softhsm2-util could not create token {label!r}: "
                           f"{transcript.strip()[-500:]}")


def _converse(argv: list[str], env: dict[str, str], pins: dict[bytes, bytes]
              ) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal, answering each PIN prompt; (status, transcript)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                close_fds=True, start_new_session=True)
    finally:
        os.close(slave)
    transcript = b""
    answered = 0
    deadline = time.monotonic() + _DIALOGUE_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                transcript += b"\n(no answer within %d s)" % _DIALOGUE_S
                break
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            transcript += chunk
            prompts = _PROMPT.findall(transcript)
            for who in prompts[answered:]:
                os.write(master, pins[who] + b"\n")
            answered = len(prompts)
    finally:
        os.close(master)
        status = proc.wait()
    # A PIN typed before the tool turned echo off would be echoed into the transcript.
    for pin in pins.values():
        transcript = transcript.replace(pin, b"<PIN>")
    return status, transcript.decode("utf-8", "replace")
