"""`hsmca witness serve`: a witness an auditor runs, on a host the CA does not control."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ca.commands.args import state_file
from ca.errors import CLIError

if TYPE_CHECKING:
    from ca.audit.witness_server import Witness

DEFAULT_LISTEN = "127.0.0.1:7380"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    w = sub.add_parser("witness", help="run a C2SP witness that cosigns a log's checkpoints")
    wsub = w.add_subparsers(dest="witness_command", metavar="SUBCOMMAND", required=True)
    s = wsub.add_parser(
        "serve", help="cosign each checkpoint that extends the last one cosigned",
        description="A C2SP tlog-witness (c2sp.org/tlog-witness): it answers POST "
        "/add-checkpoint, cosigns a checkpoint signed by the pinned log key only if it "
        "extends the last one it cosigned (a consistency proof), and keeps that one in "
        "--state, flushed before it answers. Put it on a host the CA's operators cannot "
        "write to, behind a TLS proxy if it listens beyond this host. Prints its URL and "
        "its verifier key (for the CA's [audit] witness-keys) and serves until SIGTERM.")
    s.add_argument("--key-file", type=Path, required=True,
                   help="the witness's Ed25519 private key, PEM, mode 0600 (make one with "
                   "`openssl genpkey -algorithm ed25519 -out KEY`)")
    s.add_argument("--name", help="the witness's name in its cosignatures (default: "
                   "<this host's name>/hsmca-witness)")
    s.add_argument("--log", dest="logs", action="append", required=True, metavar="ORIGIN=VKEY",
                   help="a log to witness: its checkpoint origin and its verifier key (the "
                   "CA's GET /v1/audit/key: name, verifier_key); repeat for more logs")
    s.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to listen (default {DEFAULT_LISTEN}; port 0 picks one)")
    s.add_argument("--state", type=state_file, help="the file holding the latest checkpoint "
                   "cosigned for each log (default: witness-state.json beside the key file)")
    s.add_argument("--new-state", action="store_true",
                   help="this witness's first run: make --state, holding no checkpoint "
                   "(it then trusts the first one each log offers). Refused when the "
                   "state exists; without it, a missing state is refused, since a witness "
                   "that starts over lets a log rewritten meanwhile through")
    s.set_defaults(command_key="witness-serve")


def serve(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from ca.audit.cosignature import ALG_NOTE, VerifierKey, parse_verifier_key
    from ca.audit.witness_server import Witness, WitnessState, WitnessStateError
    from ca.fileutil import check_private
    from ca.logs import configure

    check_private([args.key_file])
    try:
        key = load_pem_private_key(args.key_file.read_bytes(), password=None)
    except OSError as exc:
        raise CLIError(f"cannot read the key file {args.key_file}: {exc.strerror}") from None
    except ValueError:
        raise CLIError(f"{args.key_file} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CLIError(f"{args.key_file} is not an Ed25519 key (openssl genpkey -algorithm "
                       "ed25519)")
    logs: dict[str, VerifierKey] = {}
    for spec in args.logs:
        origin, sep, vkey = spec.partition("=")
        if not sep or not origin:
            raise CLIError(f"--log {spec!r}: expected ORIGIN=VKEY")
        if origin in logs:
            # (the last one given was kept, silently: an auditor trial gave a log's old and
            # new keys after a rotation of its audit key)
            raise CLIError(f"--log {origin} is given twice: a witness follows a log by one "
                           "key; after a rotation of the log's audit key, give the new one "
                           "alone (docs/keys.md)")
        try:
            logs[origin] = parse_verifier_key(vkey, ALG_NOTE)
        except ValueError as exc:
            raise CLIError(f"--log {origin}: {exc}") from None
    from ca.config import split_listen  # (not for the parser: a start's tenth)
    try:
        host, port = split_listen(args.listen, need_host=True)
    except ValueError as exc:
        raise CLIError(f"--listen {exc}") from None
    name = args.name or f"{socket.getfqdn()}/hsmca-witness"
    try:
        state = WitnessState(args.state or args.key_file.parent / "witness-state.json",
                             new=args.new_state)
    except WitnessStateError as exc:
        raise CLIError(str(exc)) from None
    try:
        witness = Witness(name, key, logs, state)
    except ValueError as exc:
        state.close()
        raise CLIError(f"--name: {exc}") from None
    configure()
    try:
        asyncio.run(_serve(witness, host.strip("[]"), int(port)))
    finally:
        state.close()
    return 0


async def _serve(witness: Witness, host: str, port: int) -> None:

    from ca.audit.witness_server import application
    from ca.http_server import app_runner, listen_failure, tcp_site
    runner = app_runner(application(witness))
    await runner.setup()
    site = tcp_site(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CLIError(listen_failure(exc, host, port)) from None
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on http://{shown}:{bound[1]}", flush=True)
    print(f"verifier key: {witness.verifier_key}", flush=True)
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
