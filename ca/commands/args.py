"""Argument checks shared by the commands, kept free of heavy imports (the parser is
built for every command, `serve` included)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ca.decimal_text import is_decimal


def check_url(url: str) -> str:
    """The daemon's base URL without a trailing slash, or ValueError saying what is
    wrong with it: an http:// URL would otherwise end in 'Server disconnected' and a
    URL without a scheme in a bare echo of itself."""
    text = url.strip()
    if "://" not in text:
        raise ValueError(f"{url!r} has no scheme; write https://{text.rstrip('/')}")
    parts = urlsplit(text)
    if parts.scheme.lower() == "http":
        raise ValueError(f"{url}: hsmca serves HTTPS only; use "
                         f"https://{text.split('://', 1)[1].rstrip('/')}")
    if parts.scheme.lower() != "https":
        raise ValueError(f"{url}: the scheme must be https, not {parts.scheme!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number, or out of range
    except ValueError:
        port = parts.netloc.rpartition(":")[2]
        raise ValueError(f"{url}: the port {port} is not between 1 and 65535" if is_decimal(port)
                         else f"{url}: the port is not a number") from None
    if not parts.hostname:
        raise ValueError(f"{url} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url}: give only https://HOST[:PORT][/PATH]")
    # A path of the API's own (a client trial gave --url .../v1 and was told "no such
    # endpoint: /v1/v1/x509/enroll"); a proxy's prefix, as /ca or /api/v1/hsmca, is taken.
    segments = [p for p in parts.path.split("/") if p]
    for i, segment in enumerate(segments):
        if segment in _API and (i + 1 == len(segments) or segments[i + 1] in _API[segment]):
            base = f"{parts.scheme}://{parts.netloc}" + "".join(f"/{s}" for s in segments[:i])
            raise ValueError(f"{url}: give the daemon's base URL, {base}: hsmca adds the "
                             f"API's paths ({'/' + '/'.join(segments[i:])} is one)")
    return text.rstrip("/")


# The API's own paths: a first segment, and what may follow it
_API = {"v1": {"x509", "ssh", "audit", "keys", "inventory", "tokens", "whoami", "acme"},
        ".well-known": {"est", "acme-challenge"}}


def serial_hex(text: str) -> str:
    """A serial number as people copy it: hex as hsmca prints it ('1a2b...'), with a
    0x prefix, in the colon form `openssl x509 -text` prints ('1a:2b:...'), or as
    `openssl x509 -serial` prints it ('serial=1A2B...'); returned as the lowercase hex
    without leading zeros the API takes, or ValueError saying what is wrong with it."""
    t = text.strip().lower()
    t = t.removeprefix("serial=").removeprefix("0x")
    if ":" in t:
        if not re.fullmatch(r"[0-9a-f]{1,2}(:[0-9a-f]{1,2})+", t):
            raise ValueError(f"serial {text!r}: the colon form is pairs of hex digits, "
                             "like 1a:2b:3c")
        t = t.replace(":", "")
    if re.fullmatch(r"[0-9a-f]+", t) and len(t.lstrip("0")) > 40:
        # (leading zeros are no digits of it: openssl pads to whole bytes)
        raise ValueError(f"serial {text!r} has {len(t.lstrip('0'))} hex digits: a "
                         "certificate serial has at most 40 (20 bytes); a digit too many?")
    if re.fullmatch(r"[0-9a-f]+", t) and int(t, 16) == 0:  # ('00' is hex: a web trial)
        raise ValueError(f"serial {text!r} is zero, which no certificate has (RFC 5280 "
                         "4.1.2.2: serials are positive)")
    if not re.fullmatch(r"[0-9a-f]+", t):
        raise ValueError(f"serial {text!r} is not a certificate serial number in hex (as "
                         "hsmca prints it, with 0x, or as 1a:2b:... from openssl x509 -text)")
    return format(int(t, 16), "x")


def ssh_serial(text: str) -> int:
    """An SSH certificate's serial as ssh-keygen -L shows it (decimal): argparse's int
    said "invalid int value: '0x12'" to an SSH trial."""
    if not is_decimal(text) or not 0 < int(text) < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is not an SSH certificate serial: a "
                                         "decimal number from 1 to 2^64-1, as ssh-keygen -L "
                                         "shows it")
    return int(text)


def positive(text: str) -> int:
    """A count of 1 or more (--limit 0 and -3 showed one row: an operator trial)."""
    if not is_decimal(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return int(text)


def state_file(text: str) -> Path:
    """A --state a command saves to: its directory must exist, said before any work
    (saving failed at the end, naming a temporary file; the web view crashed on every
    page after a whole verification, a web trial found)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the directory {path.parent} does not exist")
    return path


def duration(text: str) -> int:
    """A duration flag like 90s, 5m, 1h, 2d or 1h30m, in seconds: read as the CA reads
    a requested lifetime, with its words when it is no such duration."""
    from ca.policy import Refused, parse_ttl
    try:
        return parse_ttl(text, "")
    except Refused as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def exec_timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exec-timeout", type=duration, default=300, metavar="DURATION",
                        help="kill --exec (and what it started) if it runs longer than this, "
                        "so that a hung reload never stops renewals (default 5m)")


def confirm(question: str, refusal: str) -> None:
    """Ask on stderr for "yes"; anything else raises CLIError(refusal). With stdin not a
    terminal (a pipe, a script) the answer is not echoed, so the error goes on a line of
    its own rather than after the prompt."""
    from ca.errors import CLIError
    sys.stderr.write(f"{question} Type yes: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        sys.stderr.write("\n")
    if answer.strip().lower() != "yes":
        raise CLIError(f"{refusal} (confirm with yes, or pass --yes)")


def warn(text: str) -> None:
    """A warning of a command: one line on stderr, after what it did."""
    print(f"hsmca: warning: {text}", file=sys.stderr)
