"""Client commands: serve, token create, enroll, renew, revoke."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca.commands.args import exec_timeout_flag, serial_hex, warn
from ca.decimal_text import is_decimal
from ca.errors import ClientError, CLIError, GaveUp

if TYPE_CHECKING:  # the config and the HSM's library load when a command runs, not
    from ca.config import Config  # for the parser every command builds (a start's tenth)

TOKEN_ENV = "HSMCA_TOKEN"
REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded",
           "cessationOfOperation", "privilegeWithdrawn")  # a leaf's (ca.ra.LEAF_REASONS)


def _config(args: argparse.Namespace) -> Config:
    from ca.config import load
    return load(args.config)


def _admin(args: argparse.Namespace) -> tuple[str, ssl.SSLContext]:
    """URL and admin mTLS context from --config (the credential `hsmca init` made)."""
    from ca import client  # aiohttp: not loaded by `serve`
    cfg = _config(args)
    url = _daemon_url(args, cfg)
    ca = args.ca or cfg.root_pem
    return url, client.ssl_context(ca, cfg.admin_cert, cfg.admin_key)


def _daemon_url(args: argparse.Namespace, cfg: Config) -> str:
    """--url, or where the daemon of --config listens."""
    from ca import client
    url = client.base_url(args.url or cfg.local_url)
    if args.url is None and cfg.not_running:
        from ca.config import answers
        if answers(url):  # not this CA's daemon, which would have written its URL
            raise CLIError(f"the daemon of {args.config} is not running (it writes "
                           f"{cfg.url_file} while it runs), and something else answers at "
                           f"{url}: another CA's daemon? Start this one (`hsmca serve "
                           f"--config {args.config}`), or give --url")
    if args.url is None and cfg.cluster:
        from ca.config import answers
        if not answers(url):
            # Its own node stopped, the others elsewhere: "is hsmca serve running there?"
            # of a default address sent a cluster trial looking in the wrong place.
            raise CLIError(f"no node of this CA runs from {cfg.state_dir} (nothing answers "
                           f"at {url}): give --url with another node's address, or the "
                           "load balancer's")
    return url


STATUS_WAIT_S = 15


def status(args: argparse.Namespace) -> int:
    """`hsmca status`: GET /health in words (an operator trial looked for a command and
    found only curl); exit 1 unless every part is ok."""
    import json

    from ca import client
    # The URL and root of --config, no client certificate: /health asks for none, and
    # an expired admin credential or a proxy that does not take it would fail the ask
    # (a review)
    if args.url is not None and (args.ca is not None or (
            args.config == Path("hsmca.toml") and not args.config.exists())):
        # A client host has no hsmca.toml: --url (and --ca) are enough (an upgrade trial)
        url, ctx = args.url, client.ssl_context(args.ca)
    else:
        cfg = _config(args)
        url = client.base_url(args.url or cfg.local_url)
        ctx = client.ssl_context(args.ca or cfg.root_pem)

    async def ask() -> Any:
        try:  # (its handler takes at most about 2 s: longer is a stuck worker)
            return await asyncio.wait_for(client.call("GET", f"{url}/health", ctx,
                                                      expect=(200, 503)), STATUS_WAIT_S)
        except TimeoutError:
            raise CLIError(f"{url} took the connection, but /health did not answer within "
                           f"{STATUS_WAIT_S} s: a worker process may be stuck (the daemon's "
                           "log says; it kills one after [server] worker-timeout-s)") from None
    try:
        if args.url is None:
            url = _daemon_url(args, cfg)  # inside: a monitor's --json gets its document
        health = asyncio.run(ask())
        if not isinstance(health, dict) or not isinstance(health.get("status"), str) or \
                "type" in health:
            # A load balancer's own 503 page, or a problem of a proxy: not the daemon's
            # words (a review's got a traceback)
            raise CLIError(f"GET {url}/health: the answer is not the daemon's health (a "
                           f"proxy or load balancer in front?): {str(health)[:100]!r}")
    except (CLIError, ClientError) as exc:
        if args.json:
            # A monitor that reads --json got nothing on stdout when the daemon was down
            # (a trial): a document still comes, the line to stderr as well.
            # (a proxy's page, or no answer in time: something answered, so "unknown")
            state = ("unreachable" if isinstance(exc, ClientError) and exc.status is None
                     else "unknown")
            print(json.dumps({"status": state, "url": url, "error": str(exc)}, indent=2))
        raise
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        print(f"{url}: {health.get('status')}")
        for part, said in health.items():
            if part != "status":
                print(f"  {part}: {said}")
    return 0 if health.get("status") == "ok" else 1


def admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None,
               expect: int = 200) -> Any:
    """One request to the running daemon's admin API, with the admin credential of
    --config (`_admin`); its JSON answer."""
    from ca import client
    url, ctx = _admin(args)
    return asyncio.run(client.call(method, f"{url}{path}", ctx, expect=expect,
                                   json_body=body))


def _worker_count(text: str) -> int:
    """A number of workers, or "auto" (0: one per CPU), as the config's `workers`."""
    from ca.config import MAX_WORKERS
    if text == "auto":
        return 0
    if not is_decimal(text) or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be \"auto\" or a number from 1 to "
                                         f"{MAX_WORKERS}")
    return int(text)


def serve(args: argparse.Namespace) -> int:
    import socket

    from ca.config import check_state, secret_files, trusted_paths
    from ca.daemon.primary import main
    from ca.fileutil import check_not_writable, check_private
    from ca.logs import LEVEL_ENV, LEVELS, configure
    cfg = _config(args)
    if args.node and not cfg.cluster:
        raise CLIError(f"--node names a node of a CA on PostgreSQL, but {cfg.path} has no "
                       "[store] section (one node on SQLite, which has no name): leave "
                       "--node out")
    cfg = cfg.for_node(args.node or socket.gethostname(), from_host=not args.node)
    # Before anything is started: a readable PIN or key file is refused, by name, and
    # so is a config, state or log that others could write.
    check_private(secret_files(cfg))
    check_not_writable(trusted_paths(cfg))
    # What the daemon creates (a node's directories, run files) is never writable by
    # others, whatever the umask it was started with: its next start would refuse them.
    os.umask(os.umask(0) | 0o022)
    check_state(cfg)
    os.environ[LEVEL_ENV] = cfg.log_level  # the workers inherit it
    configure(LEVELS[cfg.log_level])
    try:
        return main(cfg, args.listen, args.workers)
    except OSError as exc:
        if exc.filename:  # it names its file already
            raise
        # A write to an open file says only "No space left on device" (a recovery trial
        # had to guess where): name the places written and the room left in each, the
        # fullest first (a chaos trial's full disk was the audit log's, and the message
        # named the state directory's, with 61 GB free).
        import shutil
        room = []
        for what, where in {cfg.audit_log.parent: "the audit log's directory",
                            cfg.local_dir: "the state directory"}.items():
            try:
                room.append((shutil.disk_usage(what).free, f"{where} {what}"))
            except OSError:
                continue
        said = "; ".join(f"{name}: {free // 1024} KiB free" for free, name in sorted(room))
        raise CLIError(f"{exc.strerror or exc} ({said or f'in {cfg.local_dir}'})") from None


def token_create(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`, which shares this module
    url, ctx = _admin(args)
    body = {"role": args.role, "names": args.name, "ttl": args.ttl}
    if args.principal:
        body["principals"] = args.principal
    out = asyncio.run(client.call("POST", f"{url}/v1/tokens", ctx, json_body=body, expect=201))
    print(out["token"])
    if args.role == "user" and not args.principal:
        # Said now: the person finds out at their first `hsmca ssh user`, token spent.
        print("hsmca: warning: no --principal: the credential this token gives gets no SSH "
              "user certificate (it grants no logins)", file=sys.stderr)
    return 0


def read_token(args: argparse.Namespace) -> str:
    """The bootstrap token from --token-file (a file, or - for stdin), HSMCA_TOKEN, or
    --token. A value in argv is readable by every local user in the process list for
    as long as the command runs, so it still works but is warned about."""
    if args.token is not None and args.token_file is not None:
        raise CLIError("give the token once: --token-file or --token, not both")
    if args.token_file is not None:
        where = "stdin" if str(args.token_file) == "-" else str(args.token_file)
        try:
            text = sys.stdin.read() if where == "stdin" else args.token_file.read_text()
        except OSError as exc:
            raise CLIError(f"--token-file {where}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CLIError(f"--token-file {where} is not text") from None
        token = text.lstrip("\ufeff").strip()  # (Notepad's "UTF-8 with BOM": an operator trial)
        if not token:
            raise CLIError(f"--token-file {where} is empty: it must hold the token")
        if len(token.split()) != 1:
            raise CLIError(f"--token-file {where} must hold the token and nothing else")
        return token
    if args.token is not None:
        if os.path.isfile(args.token):  # (False for any value no file has)
            # A path where the value goes: sent as the token, it was "unknown bootstrap
            # token" (an operator trial).
            raise CLIError(f"--token takes the token itself; {args.token} is a file: give "
                           f"it as --token-file {args.token}")
        print("hsmca: warning: --token puts the token in the process list, where every "
              "local user can read it; use --token-file FILE, --token-file - (stdin) or "
              f"{TOKEN_ENV}", file=sys.stderr)
        return str(args.token)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CLIError(f"no bootstrap token: pass --token-file FILE (- reads stdin) or set "
                       f"{TOKEN_ENV}")
    return token


def enroll(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    url = args.url
    token = read_token(args)
    issued = asyncio.run(client.enroll(url, token, args.name, args.out, args.ca,
                                       force=args.force, ttl=args.ttl, warn=warn))
    for text in issued.get("warnings", []):
        warn(text)
    print(f"enrolled: serial {issued['serial']}, valid until {issued['not_after']}; wrote "
          f"{args.out / 'key.pem'} (0600), {args.out / 'cert.pem'}, {args.out / 'chain.pem'}")
    return 0


def _hook_env(cert: Path, key: Path) -> dict[str, str]:
    """What a --exec command learns about the renewal (the files' absolute paths)."""
    from ca.client import load_certificates
    leaf = load_certificates(cert, "--cert")[0]
    return {"HSMCA_CERT": str(cert.absolute()), "HSMCA_KEY": str(key.absolute()),
            "HSMCA_SERIAL": format(leaf.serial_number, "x"),
            "HSMCA_NOT_AFTER": leaf.not_valid_after_utc.isoformat()}


def _say_if_exposed(key: Path) -> None:
    """A private key others can read is said, not changed: the renewal keeps its mode
    (a service's group may read it), but a key any user reads is nobody's own (a client
    trial's 0644 key.pem went unremarked)."""
    try:
        mode = key.stat().st_mode
        # Only a private key: a certificate given as --key by mistake was warned of, then
        # refused, two lines (an operator trial); the refusal says it alone.
        private = b"PRIVATE KEY-----" in key.read_bytes()[:64 * 1024] if mode & 0o007 else False
    except OSError:
        return  # the renewal says what is wrong with it
    if private:
        warn(f"--key {key} is readable by every user (mode {mode & 0o777:04o}): `chmod o-rwx "
             f"{key}` (0600, or 0640 for a service's group)")


def renew(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    url = args.url
    _say_if_exposed(args.key)
    if args.daemon:
        return _renew_daemon(args, url)
    from ca.commands.renewal import hook_is_pending, hook_pending_path
    pending = hook_pending_path(args.cert)
    if args.if_due and (due := _not_due(args.cert)) is not None:
        print(f"not renewed: not due until {due} (two thirds of its lifetime; --if-due)",
              flush=True)
        if args.exec and hook_is_pending(pending):
            # The hook failed after the last renewal: run again now, not at the next
            # renewal (a client trial's one-shot timer left nginx on the old certificate
            # until it expired, each hourly run saying "not due").
            print("running --exec again: it did not succeed after the last renewal",
                  flush=True)
            _run_exec(args, pending, "the last renewal was installed")
        return 0
    # No room for the files: nothing is asked (a full-disk trial's each try had a
    # certificate issued and thrown away; one command cannot hold an answer for later)
    issued = asyncio.run(client.renew(url, args.cert, args.key, args.ca, args.rekey,
                                      ttl=args.ttl, warn=warn, reserve_room=True))
    for text in issued.get("warnings", []):
        warn(text)
    print(f"renewed: serial {issued['serial']}, valid until {issued['not_after']}"
          f"{' (new key)' if args.rekey else ''}", flush=True)
    if args.exec:
        _run_exec(args, pending, "renewed")
    return 0


def _run_exec(args: argparse.Namespace, pending: Path, done: str) -> None:
    """Run --exec; until it succeeds a marker beside the certificate says it is owed, so
    that the next run with --if-due runs it even when nothing is due (as `--daemon`
    does with the same marker)."""
    from ca.commands.renewal import mark_hook_pending, run_hook, unmark_hook_pending
    mark_hook_pending(pending)
    status = asyncio.run(run_hook(args.exec, _hook_env(args.cert, args.key),
                                  timeout_s=args.exec_timeout))
    again = " (owed: the next run with --if-due runs it again)"
    if status == -signal.SIGKILL:  # (also what another process's kill -9 gives)
        raise CLIError(f"{done}, but --exec {args.exec!r} was killed (SIGKILL): it did "
                       f"not finish within --exec-timeout ({args.exec_timeout:g} s), or "
                       f"something else killed it{again}")
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:  # a real-time signal has no name
            name = f"number {-status}"
        raise CLIError(f"{done}, but --exec {args.exec!r} was killed by signal {name}{again}")
    if status != 0:
        raise CLIError(f"{done}, but --exec {args.exec!r} exited with status {status}{again}")
    unmark_hook_pending(pending)


def _not_due(path: Path) -> str | None:
    """When the certificate at `path` is due for renewal, if it is not yet: a person
    renewing before each `ssh user` (docs/ssh.md) piled up live credentials of one key,
    one per run (an SSH trial), where the docs promised it renews from two thirds."""
    from cryptography import x509

    from ca.commands.renewal import now, renew_time
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None  # renew says what is wrong with it
    due = renew_time(cert.not_valid_before_utc, cert.not_valid_after_utc, rng=None)
    return due.replace(microsecond=0).isoformat() if now() < due else None


def _renew_daemon(args: argparse.Namespace, url: str) -> int:
    """`renew --daemon`: renew at two thirds of each certificate's lifetime, forever."""
    import structlog

    from ca import client
    log = structlog.get_logger("hsmca.renew")
    from ca.commands.renewal import (
        Job,
        hold_sighup,
        hook_pending_path,
        now,
        renew_time,
        run_forever,
    )
    hold_sighup()

    cert, key = args.cert, args.key
    # A first mistake fails at once, not in a log hours later: the credential, a wrong
    # --ca or --url, a certificate the CA did not issue or has revoked. A CA that is
    # away is said, and waited for.
    client.mend_alone(cert, key, warn)  # a renewal cut short, before the pair is judged
    try:
        # What every renewal would refuse (a foreign link, a directory anyone can write)
        for path in dict.fromkeys((key, cert, cert.parent / "chain.pem")):
            client.replaceable(path)
        client.check_writable(cert, key, args.rekey)  # a read-only mount, say
    except client.ClientError as exc:
        if not exc.full:  # a read-only mount or a missing permission is a mistake to say
            raise GaveUp(str(exc)) from None
        warn(f"{exc}; renewing when due all the same")  # a full disk may have room then
    try:
        asyncio.run(client.check_standing(url, args.ca, cert, key))
    except client.ClientError as exc:
        if not exc.retryable:
            raise GaveUp(str(exc)) from None
        warn(f"{exc}; renewing when due all the same")
    schedule: dict[int, dt.datetime] = {}

    def current() -> Any:
        return client.load_certificates(cert, "--cert")[0]

    unreadable: list[str] = []  # what was said of the files while they cannot be read
    held: list[dt.datetime] = []  # the end of the last certificate read

    def due() -> dt.datetime:
        try:
            leaf = current()
            held[:] = [leaf.not_valid_after_utc]
        except client.ClientError as exc:
            if not schedule:
                raise
            # Being replaced by other means (configuration management's copy, a plain
            # cp): the schedule stands, and a renewal fails only if the file is still so
            # then (a client trial's agent ended for good, hours before its renewal).
            if str(exc) not in unreadable:
                unreadable.append(str(exc))
                log.warning("renew.unreadable", error=str(exc), detail="the renewal "
                            "stays as scheduled, and is tried again if it is still so then",
                            command="renew", cert=str(cert.absolute()))
            return next(iter(schedule.values()))
        unreadable.clear()
        # Drawn once per certificate: the jitter must not be re-rolled on every look.
        if leaf.serial_number not in schedule:
            schedule.clear()
            schedule[leaf.serial_number] = renew_time(leaf.not_valid_before_utc,
                                                      leaf.not_valid_after_utc)
        return schedule[leaf.serial_number]

    async def run() -> dict[str, Any]:
        try:
            old = format(current().serial_number, "x")
        except client.ClientError as exc:  # being rewritten, due now: tried again (a
            # docs trial), until the certificate it held has ended (a review)
            if held and held[0] <= now():
                raise client.ClientError(f"{exc}, and the certificate it held ended at "
                                         f"{held[0].isoformat()}: enroll again") from None
            raise client.ClientError(str(exc), retryable=True) from None
        issued = await client.renew(url, cert, key, args.ca, args.rekey, ttl=args.ttl,
                                    warn=lambda text: log.warning("renew.restored", detail=text),
                                    root_said=lambda text: log.warning("renew.root_rotated",
                                                                       detail=text))
        return {"old_serial": old, "serial": issued["serial"],
                "not_after": issued["not_after"], "rekey": args.rekey}

    def remaining_s() -> float | None:
        try:
            return (current().not_valid_after_utc - now()).total_seconds()
        except client.ClientError:
            return None

    def identity() -> str | None:
        try:
            return f"serial {current().serial_number:x}"
        except client.ClientError:  # being replaced, this very moment
            return None

    job = Job("renew", due, run, remaining_s, hook=args.exec,
              hook_env=lambda: _hook_env(cert, key), hook_timeout_s=args.exec_timeout,
              identity=identity,
              hook_pending=hook_pending_path(cert))
    return run_forever([job], command="renew", cert=str(cert.absolute()))


def parse_serial(text: str) -> str:
    """A serial number as people copy it (args.serial_hex), or one line saying what is
    wrong with it."""
    try:
        return serial_hex(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _reason(text: str) -> str:
    """RFC 5280 names (keyCompromise), snake case (key_compromise) and the numeric codes
    all work; the daemon gets the RFC name."""
    from ca.policy import Refused
    from ca.ra import revocation_reason
    try:
        name = revocation_reason(int(text) if is_decimal(text.strip()) else text)
    except Refused:
        raise argparse.ArgumentTypeError(f"{text!r} is not a revocation reason; one of: "
                                         f"{', '.join(REASONS)} (or key_compromise, or 1)"
                                         ) from None
    return name or "unspecified"


LINEAGE_SHOWN = 8  # serials of a revoked lineage named on the line; a long one is counted


def _certificate_pem(path: Path) -> str:
    """The first certificate of `path` (a cert.pem holds the leaf, then its issuer)."""
    from cryptography.hazmat.primitives import serialization

    from ca.client import load_certificates
    first = load_certificates(path, "--cert-file")[0]
    return first.public_bytes(serialization.Encoding.PEM).decode()


def revoke(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    if args.cert is not None or args.key is not None:
        # Self-revocation: a certificate holder revokes its own certificate over mutual
        # TLS (the daemon allows a non-admin that serial only).
        if args.cert is None or args.key is None or args.url is None:
            raise CLIError("revoking with --cert needs --key and --url too")
        url = args.url
        from ca.validity import ended
        leaf = client.load_certificates(args.cert, "--cert")[0]
        itself = args.identity is None and args.cert_file is None and (
            args.serial is None or parse_serial(args.serial)
            == format(leaf.serial_number, "x"))
        if itself and ended(leaf.not_valid_after_utc, dt.datetime.now(dt.UTC)):
            # (told to enroll again before: no help to one revoking a leaked key)
            raise CLIError(f"--cert {args.cert} expired at "
                           f"{leaf.not_valid_after_utc.isoformat()}: it cannot authenticate "
                           "to revoke itself, and everything refuses it already. If its key "
                           "leaked, an admin can put it on the CRL: hsmca revoke "
                           f"{format(leaf.serial_number, 'x')} --reason keyCompromise "
                           "--config ...")
        ctx = asyncio.run(client.preflight(url, args.ca, args.cert, args.key))
        serial = parse_serial(args.serial) if args.serial else client.serial_of(args.cert)
    else:
        given = sum(x is not None for x in (args.serial, args.identity, args.cert_file))
        if given > 1:  # (said as if none were given, an operator's trial read it so)
            raise CLIError("give only one of the SERIAL to revoke, --identity NAME and "
                           "--cert-file FILE")
        if given == 0:
            raise CLIError("give the SERIAL to revoke, --identity NAME or --cert-file FILE (or "
                           "--cert and --key to revoke that certificate itself)")
        serial = parse_serial(args.serial) if args.serial else None
        url, ctx = _admin(args)
    body: dict[str, str] = (
        {"identity": args.identity} if args.identity else
        {"certificate": _certificate_pem(args.cert_file)} if args.cert_file else
        {"serial": serial})
    if args.reason:
        body["reason"] = args.reason
    out = asyncio.run(client.call("POST", f"{url}/v1/x509/revoke", ctx, json_body=body))
    also = [s for s in out["revoked"] if s != out.get("serial")]
    first = f"revoked {out['serial']}" if "serial" in out else (
        f"revoked {len(out['revoked'])} certificate(s) issued to {args.identity}")
    lineage = ", ".join(also[:LINEAGE_SHOWN]) + (
        f" and {len(also) - LINEAGE_SHOWN} more (the audit log's cert.revoke line lists "
        "them all)" if len(also) > LINEAGE_SHOWN else "")
    print(f"{first} at {out['revoked_at']}"
          + (f"; with it its lineage: {lineage}" if also and "serial" in out else "")
          + (f"; and {out['ssh_certificates']} SSH certificate(s) issued on their strength"
             if out["ssh_certificates"] else ""))
    for warning in out.get("warnings", []):
        warn(warning)
    return 0


def admin_flags(p: argparse.ArgumentParser) -> None:
    """Where an admin command finds the daemon and the admin credential `init` made."""
    p.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="config whose admin credential to use (default ./hsmca.toml)")
    p.add_argument("--url", help="daemon URL (default: the URL the daemon serving this "
                   "config wrote to STATE_DIR/serve.url, which it removes at its stop; on a "
                   "cluster, the first node that answers of STATE_DIR/nodes/*/serve.url)")
    p.add_argument("--ca", type=Path, help="root CA PEM (default from config)")


def credential_flags(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """The client credential, named the same way in every command; the audit commands'
    --client-cert/--client-key are accepted too."""
    p.add_argument("--cert", "--client-cert", dest="cert", type=Path, required=required,
                   metavar="CERT", help=f"{what} (PEM; --client-cert is the same flag)")
    p.add_argument("--key", "--client-key", dest="key", type=Path, required=required,
                   metavar="KEY", help="its private key, unencrypted PEM (--client-key is the "
                   "same flag)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("serve", help="run the daemon",
                       description="Run the CA daemon: one HTTPS listener (TLS 1.2+), mutual "
                       "TLS for clients, served by worker processes that each hold their own "
                       "HSM session; this (primary) process writes the audit log and the "
                       "checkpoints. The first line of stdout is 'listening on URL'. Refuses "
                       "to start when the PIN file, the TLS key or the admin key can be read "
                       "by group or others. SIGTERM stops it gracefully (in-flight requests "
                       "finish); SIGHUP reloads [policy] from the config without a restart "
                       "(other settings need a restart, and the reload names them). The "
                       "first start of a new release migrates the inventory, and older "
                       "releases then refuse it: take `hsmca backup` before upgrading; "
                       "the way back is that backup (docs/operator.md, Upgrading).")
    s.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="config file (default ./hsmca.toml; `hsmca init` writes "
                   "STATE_DIR/hsmca.toml)")
    s.add_argument("--listen", help="HOST:PORT to listen on (port 0 picks a free port); "
                   "default from the config")
    s.add_argument("--node", metavar="NAME",
                   help="this node's name (default: the host name); with a PostgreSQL "
                   "store, several nodes share the database and the HSM, and what a node "
                   "keeps locally (audit log, run files) is named by it (docs/cluster.md)")
    s.add_argument("--workers", type=_worker_count, metavar="N|auto",
                   help="worker processes: a number, or \"auto\" for one per CPU, at most 8 "
                   "(default: [server] workers in the config, itself \"auto\" by default)")
    s.set_defaults(command_key="serve")

    t = sub.add_parser("token", help="bootstrap tokens (admin)")
    tsub = t.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    tc = tsub.add_parser("create", help="print a one-time bootstrap token",
                         description="Ask the daemon for a one-time bootstrap token that lets "
                         "its holder enroll once for the given role and names. The secret is "
                         "printed once and never stored by the CA: redirect it to a file "
                         "(umask 077) and hand that over.")
    tc.add_argument("--role", required=True,
                    choices=["service", "host", "user", "auditor", "admin"],
                    help="what the certificate may do")
    tc.add_argument("--name", required=True, nargs="+", action="extend",
                    help="names the certificate may carry (DNS, IP, URI; e-mail for users)")
    # extend: `--name a --name b` is both (the last alone before: an operator trial's
    # certificate carried one of two names, silently)
    tc.add_argument("--principal", nargs="+", action="extend",
                    help="SSH logins a user may get (role user)")
    tc.add_argument("--ttl", default="15m", help="how long the token is valid (default 15m; "
                    "at most [policy] token-max-ttl-s, 7d unless set)")
    admin_flags(tc)
    tc.set_defaults(command_key="token-create")

    e = sub.add_parser("enroll", help="enroll with a bootstrap token",
                       description="Make a P-256 key locally, enroll with a bootstrap token, "
                       "and write key.pem (0600), cert.pem and chain.pem to --out. Everything "
                       "is checked before the one-time token is used: --out is a directory "
                       "that does not exist yet or is empty (one with files needs --force), "
                       "and must be writable. A "
                       f"new --out appears complete or not at all. The token comes from "
                       f"--token-file, or the environment variable {TOKEN_ENV}. The "
                       "certificate names what --name asks that the token allows (its "
                       "subject is the first name); nothing else is taken from the request.")
    e.add_argument("--url", required=True, help="daemon URL, e.g. https://ca.example:8443")
    e.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file holding the bootstrap token; - reads it from stdin")
    e.add_argument("--token", metavar="TOKEN",
                   help=f"the token itself (visible in the process list: prefer --token-file "
                   f"or {TOKEN_ENV})")
    e.add_argument("--name", required=True, nargs="+", action="extend",
                   help="names to put in the certificate (several, or the flag again)")
    e.add_argument("--out", required=True, type=Path,
                   help="directory to write to (its missing parents are made, as mkdir -p "
                   "does, and removed again if the enrollment fails)")
    e.add_argument("--force", action="store_true",
                   help="replace key.pem, cert.pem and chain.pem in an existing --out")
    e.add_argument("--ttl", help="lifetime to ask for, e.g. 24h or 90s (default: the CA's "
                   "policy.x509-default-ttl-s)")
    e.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with (default: "
                   "the system's CAs)")
    e.set_defaults(command_key="enroll")

    r = sub.add_parser("renew", help="renew a certificate over mutual TLS",
                       description="Renew CERT with the daemon, authenticating with CERT and "
                       "KEY. The names are copied from the current certificate. CERT, "
                       "chain.pem beside it and (with --rekey) KEY are replaced all or none, "
                       "keeping their modes and shape (one file with certificate and key: "
                       "give it as both; a full chain stays one; a symlink stays one). "
                       "With --daemon, keep doing it: renew at two "
                       "thirds of each certificate's lifetime (with jitter), retry with "
                       "back-off while the CA is away, log each step as JSON on stderr, and "
                       "run --exec after each renewal; SIGHUP renews at once (after a CA key "
                       "rotation, say); SIGTERM stops it.")
    r.add_argument("--url", required=True, help="daemon URL, e.g. https://ca.example:8443")
    credential_flags(r, "the certificate to renew, also the client certificate")
    r.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with (default: "
                   "the system's CAs)")
    r.add_argument("--rekey", action="store_true",
                   help="generate a new key of the same kind and size (RSA 3072 stays RSA "
                   "3072), written to KEY, instead of keeping the current one")
    r.add_argument("--ttl", help="lifetime to ask for, e.g. 24h (default: the CA's "
                   "policy.x509-default-ttl-s)")
    r.add_argument("--daemon", action="store_true",
                   help="keep running and renew whenever two thirds of the lifetime have "
                   "passed")
    r.add_argument("--if-due", dest="if_due", action="store_true",
                   help="renew only once two thirds of the certificate's lifetime have "
                   "passed, else say when and exit 0 without asking the CA (for a login "
                   "script or cron; each renewal otherwise makes another live certificate "
                   "of the same key)")
    r.add_argument("--exec", metavar="CMD",
                   help="shell command to run after each renewal, e.g. 'systemctl reload "
                   "nginx'; it gets HSMCA_CERT, HSMCA_KEY, HSMCA_SERIAL and HSMCA_NOT_AFTER")
    exec_timeout_flag(r)
    r.set_defaults(command_key="renew")

    st = sub.add_parser("status", help="whether the daemon is healthy (GET /health)",
                        description="Ask the running daemon of --config how it is: its HSM, "
                        "audit log, inventory and worker processes, as GET /health says "
                        "(a load balancer asks /health itself). Exit status 0 when /health "
                        "says ok, 1 when a part is not (the line says why), 1 with one line "
                        "when nothing answers (with --json, also a document whose status "
                        "is \"unreachable\"). A worker that cannot start is said in "
                        "'workers' with status ok: the node still serves.")
    admin_flags(st)
    st.add_argument("--json", action="store_true",
                    help="print /health's JSON as it is; when nothing answers, "
                    "{\"status\": \"unreachable\", \"url\": ..., \"error\": ...} and exit 1 "
                    "(\"unknown\" when what answers is not the daemon's health)")
    st.set_defaults(command_key="status")

    v = sub.add_parser("revoke", help="revoke a certificate (admin, or your own)",
                       description="Revoke a certificate by serial with the admin credential "
                       "of --config, or revoke your own certificate with --cert and --key "
                       "(mutual TLS; SERIAL defaults to that certificate's), or, as admin, "
                       "everything live issued to a name with --identity. keyCompromise "
                       "revokes the whole lineage (the certificates renewed from it and "
                       "those it was renewed from). SSH certificates obtained with a revoked "
                       "certificate are revoked with it (the KRL lists them). The CRL is "
                       "re-signed and the OCSP response re-signed at once. An SSH "
                       "certificate by itself: `hsmca ssh revoke`.")
    v.add_argument("serial", nargs="?", metavar="SERIAL",
                   help="serial number in hex: 1a2b..., 0x1a2b... or 1a:2b:... (as "
                   "openssl x509 -text prints it)")
    v.add_argument("--identity", metavar="NAME",
                   help="revoke everything live issued to this name (a DNS name, IP, URI or "
                   "e-mail), with their lineages (admin)")
    v.add_argument("--cert-file", type=Path, metavar="FILE",
                   help="revoke the certificate in FILE (PEM), also one this CA signed and "
                   "its inventory does not know, as after a restore from a backup older "
                   "than it: it is recorded, then revoked (admin)")
    v.add_argument("--reason", type=_reason, metavar="REASON",
                   help="RFC 5280 reason, as keyCompromise, key_compromise or its code: "
                   f"{', '.join(REASONS)}; a certificate's holder may give unspecified, "
                   "keyCompromise, superseded, affiliationChanged, cessationOfOperation "
                   "(default unspecified)")
    admin_flags(v)
    credential_flags(v, "the client certificate to authenticate with instead of the "
                     "admin credential of --config: your own, to revoke it (SERIAL defaults "
                     "to its own), or an admin's, for a SERIAL or --identity from "
                     "another host", required=False)
    v.set_defaults(command_key="revoke")
