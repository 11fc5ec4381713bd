"""`hsmca key list|rotate|retire|destroy`: the CA's keys, with the admin credential,
against the running daemon (every step decided, audited and picked up by every
process there; docs/keys.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ca.commands.args import confirm
from ca.errors import CLIError

KINDS = ("issuing", "ssh-user", "ssh-host", "audit")
ROOT_OFFLINE = ("the root is rotated offline, with the daemon stopped: hsmca key rotate-root "
                "--config FILE (docs/keys.md)")


def _context(args: argparse.Namespace) -> tuple[str, Any]:
    from ca import client
    from ca.commands.client_cmd import _admin
    if args.cert is not None or args.key is not None:
        if args.cert is None or args.key is None:
            raise CLIError("--cert needs --key too (or use --config's admin credential)")
        url, ca = args.url, args.ca
        if url is None or ca is None:
            # From --config, as its help says, for the credential given (a cluster trial's
            # --cert lost --ca's default, a docs trial's --url's)
            from ca.commands.client_cmd import _config
            try:
                cfg = _config(args)
            except CLIError as exc:
                raise CLIError(f"--cert needs --url and --ca, or a --config they default "
                               f"from ({exc})") from None
            url, ca = url or cfg.local_url, ca or cfg.root_pem
        url = client.base_url(url)
        return url, asyncio.run(client.preflight(url, ca, args.cert, args.key))
    return _admin(args)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None,
          expect: int = 200) -> Any:
    from ca import client
    url, ctx = _context(args)
    try:
        return asyncio.run(client.call(method, f"{url}{path}", ctx, json_body=body,
                                       expect=expect))
    except client.ClientError as exc:
        if method == "POST" and exc.unanswered:
            # A rotation or destruction that the daemon carried out before the answer was
            # lost: tried again, it makes one key more, or is refused (a key lifecycle
            # trial: the operator was told to suspect the client certificate).
            raise CLIError(f"{exc}. The daemon may have done it before the answer was lost: "
                           "look with `hsmca key list` before trying again") from None
        raise


# What a previous key still does, by kind, until it is retired.
PREVIOUS_DOES = {
    "issuing": "it keeps signing the CRL and OCSP responses of what it issued",
    "ssh-user": "it stays trusted: /v1/ssh/ca lists every key not retired",
    "ssh-host": "it stays trusted: /v1/ssh/ca lists every key not retired",
    "audit": "it signs every checkpoint beside the new key, so verifiers pinned to it follow",
}
# When a previous key may be retired, where that is not at once.
RETIRE_WHEN = {
    "audit": "It can be retired once the new key has signed a checkpoint of every log: the "
             "daemon's (or each node's) at its next checkpoint, a node not running when a "
             "node of its name starts, and on a cluster the init log's at the next `hsmca "
             "key rotate-root`.",
}


def _offline_keys(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The keys read from the inventory of --config when its daemon is stopped (a root
    ceremony, a token backup: a key trial could not list them then), else None: the
    running daemon answers. On a cluster, PostgreSQL is read (every node stopped for
    `key rotate-root`, whose steps list the keys: a cluster trial could not)."""
    if args.url is not None or args.cert is not None or args.key is not None:
        return None
    from ca.commands.client_cmd import _config
    from ca.config import answers
    cfg = _config(args)
    if not cfg.not_running and answers(cfg.local_url):
        return None
    from ca.lifecycle import key_rows
    if cfg.cluster:
        import asyncio

        from ca.store.postgres import PostgresStore
        from ca.store_move import database_name
        store = PostgresStore(str(cfg.store_location), max_size=1, reading=True)
        try:
            keys = key_rows(asyncio.run(store.keys()), asyncio.run(store.signed_by()))
        finally:
            store.close()
        where = f"the inventory in PostgreSQL (database {database_name(cfg.store_location)})"
    else:
        from ca.store.sqlite import read_keys
        keys, where = key_rows(*read_keys(cfg.db_path)), f"the inventory {cfg.db_path}"
    said = (f"the daemon of {args.config} is not running" if cfg.not_running else
            f"no daemon answers at {cfg.local_url}")
    print(f"hsmca: note: {said}: read from {where}", file=sys.stderr)
    return keys


def _say_still_previous(args: argparse.Namespace, kind: str, previous: str) -> None:
    """After a rotation: the keys of its kind an earlier rotation left previous, which go
    on with what a previous key does (a key trial rotated twice, and two old issuing keys
    went on signing CRLs and OCSP, with nothing said). Only a note: the rotation is done."""
    from ca.client import ClientError
    try:
        keys = _call(args, "GET", "/v1/keys")["keys"]
    except (ClientError, CLIError):
        return
    older = [k["label"] for k in keys if k["kind"] == kind and k["state"] == "previous"
             and k["label"] != previous]
    if older:
        print(f"hsmca: note: {', '.join(older)} {'is' if len(older) == 1 else 'are'} still "
              f"previous from an earlier rotation ({PREVIOUS_DOES[kind]}); retire "
              f"{'it' if len(older) == 1 else 'them'} when that is no longer needed "
              f"(hsmca key retire LABEL)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    action = args.key_command
    if action == "list":
        keys = _offline_keys(args)
        if keys is None:
            keys = _call(args, "GET", "/v1/keys")["keys"]
        print(f"{'LABEL':<36} {'KIND':<9} {'STATE':<10} {'ALGORITHM':<10} {'ISSUED':>7}  "
              "CREATED")
        for k in keys:
            print(f"{k['label']:<36} {k['kind']:<9} {k['state']:<10} {k['algorithm']:<10} "
                  f"{k['signed']:>7}  {_to_the_second(k['created_at'])}")
            ssh = f"  {k['ssh_fingerprint']}" if k.get("ssh_fingerprint") else ""
            print(f"    {k['uri']}  sha256:{k['fingerprint']}{ssh}")
            if k.get("revoked_at"):
                print(f"    its CA certificate revoked {_to_the_second(k['revoked_at'])} "
                      f"({k.get('revocation_reason') or 'unspecified'})")
            if k.get("live"):  # what retiring or destroying it cuts off (a key trial
                # had to start a retire and answer no to learn it)
                if k.get("revoked_at"):  # not "valid" to anyone now (a cluster trial)
                    print(f"    {k['live']} certificate(s) it issued not expired yet, refused "
                          "with its CA certificate: `hsmca cert list --issuer "
                          f"{k['label']}` lists their holders")
                else:
                    print(f"    {k['live']} certificate(s) it issued still valid, the last "
                          f"until {_to_the_second(k['live_until'])}{_replaced(k)}")
        return 0
    if action == "rotate-root":
        return _rotate_root(args)
    if action == "rotate":
        if args.kind == "root":
            raise CLIError(ROOT_OFFLINE)
        body: dict[str, object] = {"kind": args.kind}
        if args.stage:
            body["stage"] = True
        out = _call(args, "POST", "/v1/keys/rotate", body, expect=201)
        if out.get("state") == "next":
            # Who must trust it first: sshd trusts the user CA (which `ssh host --renew`
            # fetches), clients the host CA (known_hosts); an operator trial was sent to
            # wait for the hosts' refresh after staging a host CA key.
            who = ("clients trust the new key (`hsmca ssh known-hosts` writes their "
                   "@cert-authority lines; run it where they get known_hosts from)"
                   if out["kind"] == "ssh-host" else
                   "hosts trust the new key (`hsmca ssh host --renew` fetches it every "
                   "--refresh)")
            print(f"staged {out['kind']}: {out['label']} is published (GET /v1/ssh/ca) and "
                  f"signs nothing yet; {out['active']} still signs. Once {who}, "
                  f"`hsmca key rotate {out['kind']}` puts it in use")
            return 0
        staged = " (staged before)" if out.get("staged") else ""
        print(f"rotated {out['kind']}: {out['label']} is active{staged}, {out['previous']} is "
              f"previous ({PREVIOUS_DOES[out['kind']]} until you retire it)"
              + (f". {RETIRE_WHEN[out['kind']]}" if out["kind"] in RETIRE_WHEN else ""))
        if out["kind"] in ("ssh-user", "ssh-host") and not out.get("staged"):
            # Signing at once: a key trial's sshd refused the new certificates until its
            # `ssh host --renew` refreshed, with nothing said.
            who = ("hosts (sshd's TrustedUserCAKeys)" if out["kind"] == "ssh-user"
                   else "clients (known_hosts' @cert-authority lines)")
            print(f"hsmca: warning: certificates from {out['label']} are refused by {who} "
                  "until they refresh their trusted CA keys from /v1/ssh/ca; staging a key "
                  f"first (`hsmca key rotate {out['kind']} --stage`) lets them refresh "
                  "before it signs (docs/keys.md)", file=sys.stderr)
        _say_still_previous(args, out["kind"], out["previous"])
        return 0
    if action == "retire":
        out = _call(args, "POST", "/v1/keys/retire", {"label": args.label,
                                                      "confirm": _confirm_retire(args)})
        print(f"retired {out['label']}: it signs nothing any more")
        if out.get("live") and out.get("kind") in ("ssh-user", "ssh-host"):
            print(f"hsmca: warning: {out['live']} SSH certificate(s) it signed are still "
                  f"valid (the last until {out['live_until']}). Hosts and clients that "
                  "still trust this CA key accept them until then (the KRL goes on naming "
                  "those revoked); those that refresh their SSH CA keys from /v1/ssh/ca "
                  "stop accepting them", file=sys.stderr)
        elif out.get("live") and out.get("kind") == "issuing":
            print(f"hsmca: warning: {out['live']} certificate(s) it signed are still valid "
                  f"(the last until {out['live_until']}){_replaced(out)}. hsmca still "
                  "accepts its X.509 client certificates, but its CRL and OCSP responses are "
                  "signed no more: relying parties that check them refuse those certificates "
                  "once its last CRL and OCSP responses expire (within a day), and a "
                  "revocation of one from now on reaches neither. "
                  + _renew_advice(out), file=sys.stderr)
        return 0
    if action == "revoke":
        return _revoke(args)
    def destroy_question(key: dict[str, Any]) -> str:
        live = (f" {key['live']} certificate(s) it signed are unexpired (the last until "
                f"{key['live_until']}), refused already where its root's CRL is checked, "
                "since its CA certificate is revoked." if key.get("live")
                and key.get("revoked_at") else
                f" {key['live']} certificate(s) it signed are still valid (the last until "
                f"{key['live_until']}): their signatures stay good, but the CA can never "
                "sign for this key again." if key.get("live") else "")
        return f"Destroy {args.label} in the HSM? This cannot be undone.{live}"
    confirmed = _confirmed(args, lambda key: key["state"] == "retired", destroy_question,
                           "not destroyed")
    out = _call(args, "POST", "/v1/keys/destroy", {"label": args.label,
                                                    "confirm": confirmed})
    if out.get("absent_from_token"):  # no C_DestroyObject was called (a key trial)
        print(f"destroyed {out['label']}: recorded as destroyed, the token no longer "
              "holding it (the audit log records it)")
    else:
        print(f"destroyed {out['label']} (C_DestroyObject; the audit log records it)")
    if out.get("live") and out.get("revoked_at"):
        print(f"hsmca: warning: {out['live']} certificate(s) it signed are unexpired, but "
              "its CA certificate is revoked: relying parties that check its root's CRL "
              "refuse them already, and hsmca takes none of them", file=sys.stderr)
    elif out.get("live"):  # said in the daemon's log alone before (a key trial)
        nothing = ("no CRL, no OCSP" if out.get("kind") in ("issuing", "root")
                   else "no SSH certificate")
        print(f"hsmca: warning: {out['live']} certificate(s) it signed are still valid: "
              "they work where they are trusted until they expire, and the CA can sign "
              f"nothing for them any more ({nothing})", file=sys.stderr)
    for warning in out.get("warnings", []):
        print(f"hsmca: warning: {warning}", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    def question(key: dict[str, Any]) -> str:
        live = (f" It issued {key['live']} certificate(s) still valid (the last until "
                f"{key['live_until']}): their holders must enroll again."
                if key.get("live") else "")
        return (f"Revoke the CA certificate of {args.label} ({args.reason})? Relying parties "
                "that check its root's CRL refuse everything it issued, and hsmca no longer "
                f"takes its client certificates.{live} This cannot be undone.")
    confirmed = _confirmed(args, lambda key: key["kind"] == "issuing" and key["state"] in (
        "retired", "destroyed") and not key.get("revoked_at"), question, "not revoked")
    out = _call(args, "POST", "/v1/keys/revoke", {"label": args.label, "reason": args.reason,
                                                   "confirm": confirmed})
    print(f"revoked the CA certificate of {out['label']} (serial {out['serial']}, "
          f"{out['reason'] or 'unspecified'}): the CRL of {out['root']} lists it "
          "(/v1/x509/crls.pem)")
    for warning in out.get("warnings", []):
        print(f"hsmca: warning: {warning}", file=sys.stderr)
    if args.cert is None:
        _await_own_credential(args)
    return 0


def _await_own_credential(args: argparse.Namespace, wait_s: float = 30) -> None:
    """After a key revoke with --config's admin credential: when that credential was of
    the revoked key, its daemon renews it from the active key just after answering, and
    an admin command at once was refused ("enroll again": an upgrade trial). Waits,
    looking at the file, until it is renewed, and says so."""
    import time

    from ca import client
    from ca.commands.client_cmd import _config
    cfg = _config(args)
    try:
        before = cfg.admin_cert.read_bytes()
        asyncio.run(_whoami(args))
        return  # still taken: not of that key, or renewed already
    except OSError:
        return
    except client.ClientError:
        pass  # read while the daemon replaced the pair: being renewed, look at the file
    except CLIError as exc:
        if "was revoked" not in str(exc):
            return  # not this (the daemon away, say): the next command says it
    if args.url is not None and client.base_url(args.url) != client.base_url(cfg.local_url):
        # The daemon is elsewhere: it renews the credential in its own state directory,
        # not in this copy (a review: this waited 30 s, then said to wait)
        print(f"hsmca: warning: this --config's admin credential ({cfg.admin_cert}) was of "
              "that key: the daemon renews its own copy on its host; copy the renewed "
              "STATE_DIR/admin from there to go on with admin commands here",
              file=sys.stderr)
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.2)  # the daemon writes the file: nothing to wait on but it
        try:
            if cfg.admin_cert.read_bytes() != before:
                print(f"this host's admin credential ({cfg.admin_cert}) was of that key: "
                      "its daemon renewed it from the active key (an `hsmca ui` started "
                      "with the old one needs a restart)")
                return
        except OSError:
            continue
    print(f"hsmca: warning: this host's admin credential ({cfg.admin_cert}) was of that "
          f"key and is not renewed yet after {wait_s:.0f} s: its daemon renews it (its log "
          "says `this host's admin credential is renewed`); until then admin commands with "
          "it are refused", file=sys.stderr)


async def _whoami(args: argparse.Namespace) -> None:
    """GET /v1/whoami with --config's admin credential: CLIError if the daemon refuses
    it; ClientError (from loading the pair) while the daemon is replacing it."""
    from ca import client
    url, ctx = _context(args)
    try:
        await client.call("GET", f"{url}/v1/whoami", ctx)
    except client.ClientError as exc:
        raise CLIError(str(exc)) from None


def _to_the_second(at: str) -> str:
    """One shape in the column: init's times had whole seconds, a rotation's
    microseconds (a key trial)."""
    import datetime as dt
    try:
        return dt.datetime.fromisoformat(at).replace(microsecond=0).isoformat()
    except ValueError:
        return at


def _confirmed(args: argparse.Namespace, can: Callable[[dict[str, Any]], bool],
               question: Callable[[dict[str, Any]], str], refused: str) -> bool:
    """--yes, or a yes to `question` about the key as `hsmca key list` shows it now. A
    key the action cannot be done to (unknown, in the wrong state) is not asked about:
    the daemon's refusal says why (a key trial typed yes, then was told). Confirmed only
    if asked, so one that became so after this look is refused for want of it, not acted
    on unasked (a review)."""
    if args.yes:
        return True
    key = _listed(args)
    if key is None or not can(key):
        return False
    confirm(question(key), refused)
    return True


def _confirm_retire(args: argparse.Namespace) -> bool:
    """Retiring cannot be undone: ask, naming what the key is and what it issued."""
    def question(key: dict[str, Any]) -> str:
        issued = f"; it issued {key['signed']} certificate(s)" if key.get("signed") else ""
        if key.get("live"):
            issued += (f", {key['live']} still valid (the last until {key['live_until']})"
                       f"{_replaced(key)}")
        return (f"Retire {args.label} ({key['kind']}, {key['state']}{issued})? It will "
                "sign nothing any more, and a retired key is never used again."
                + RETIRE_CUTS.get(key["kind"], ""))
    return _confirmed(args, lambda key: key["state"] in ("previous", "next"), question,
                      "not retired")


# What retiring a key of a kind takes away, said before the "yes" (a key trial retired
# the previous root with nothing said, and its renewers stopped at the next restart).
RETIRE_CUTS = {
    "root": " The daemon's chain then ends at the current root alone: every client whose "
            "--ca holds only this root stops connecting (renewers that renewed since the "
            "rotation added the new root to their --ca; `ssh known-hosts --ca`, auditors "
            "and relying parties need x509/root.pem first).",
    "issuing": " Its CRL and OCSP responses are signed no more: relying parties that "
               "check them refuse its certificates still valid within a day.",
    # Said after the yes alone before (a key trial): for a host CA key, "Host key
    # verification failed" on every client that refreshed, for each host not yet moved.
    "ssh-user": " /v1/ssh/ca stops listing it: hosts that refresh their trusted user CA "
                "keys from it (`hsmca ssh host --renew`) refuse its certificates still "
                "valid.",
    "ssh-host": " /v1/ssh/ca stops listing it: clients that refresh their known_hosts from "
                "it (`hsmca ssh known-hosts`) refuse every host still presenting a "
                "certificate of it (\"Host key verification failed\").",
}


def _listed(args: argparse.Namespace) -> dict[str, Any] | None:
    """The key `args.label` as `hsmca key list` shows it (None: no such key)."""
    keys = {k["label"]: k for k in _call(args, "GET", "/v1/keys")["keys"]}
    return keys.get(args.label)


def _rotate_root(args: argparse.Namespace) -> int:
    from ca.commands.client_cmd import _config
    from ca.root_rotation import refuse_running_nodes, rotate_root
    config = _config(args)
    from ca.audit.log import AuditLogError, ensure_unlocked
    from ca.config import secret_files, trusted_paths
    from ca.fileutil import check_not_writable, check_private
    # As `serve` refuses them: the PIN goes to the module a config names, and the
    # ceremony writes the daemon's new TLS key (a key trial ran it with a 0644 PIN file
    # and a config anyone could write).
    check_private(secret_files(config))
    check_not_writable(trusted_paths(config))
    # A running daemon: said before the question, and as what to do.
    ensure_unlocked(config.audit_log, AuditLogError(
        f"the daemon (or another hsmca command) holds the audit log of "
        f"{config.state_dir}: the root is rotated with the daemon stopped; stop it "
        "(`systemctl stop hsmca`), then run hsmca key rotate-root again"))
    asyncio.run(refuse_running_nodes(config))  # on a cluster: every node, before asking
    if not args.yes:
        confirm(f"Make a new root for the CA in {config.state_dir}? Relying parties must be "
                "given the new root (x509/root.pem) before you retire the old one.",
                "no new root made")
    done = asyncio.run(rotate_root(config))
    x509_dir = config.root_pem.parent
    print(f"new root {done.root} (the active root; {done.previous} is previous), new issuing "
          f"key {done.issuing}\n"
          f"  {x509_dir / 'root.pem'}: the new root, for relying parties\n"
          f"  {x509_dir / 'roots.pem'}: every root, to trust both during the overlap\n"
          f"  {x509_dir / 'cross.pem'}: each root certified by the other\n"
          + ("Start the nodes (each writes its x509/root.pem and roots.pem from the "
             "inventory; cross.pem is on this host only)" if config.cluster else
             "Start the daemon")
          + ": new certificates chain to the new root, served with the old root's "
          f"certificate for it. Once every relying party trusts the new root: "
          f"hsmca key retire {done.previous}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ca.commands.client_cmd import admin_flags, credential_flags
    k = sub.add_parser("key", help="the CA's keys: list, rotate, retire, destroy, revoke, "
                       "rotate-root (admin)",
                       description="Manage the CA's keys in the HSM while the daemon runs: "
                       "no step needs a restart or interrupts issuance. Uses the admin "
                       "credential of --config, or --url/--ca/--cert/--key.")
    ksub = k.add_subparsers(dest="key_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        admin_flags(p)
        credential_flags(p, "an admin client certificate (default: --config's)",
                         required=False)
        p.set_defaults(command_key="key")

    common(ksub.add_parser(
        "list", help="every key: label, kind, state, algorithm, fingerprint, PKCS#11 URI",
        description="Every key of the CA, newest first: its label, kind, state (next: an "
        "SSH key staged, published and signing nothing; active, previous, retired, "
        "destroyed), algorithm, creation time, PKCS#11 URI and "
        "SHA-256 fingerprint, and ISSUED: how many certificates in the inventory it "
        "issued (X.509 and SSH; CA certificates, CRLs, OCSP responses and checkpoints are "
        "not counted: the audit log has every signature). With --config and no daemon "
        "answering (stopped for a ceremony or a backup), it reads the inventory itself, "
        "writing nothing (on a cluster PostgreSQL, with the password from PGPASSWORD or "
        "~/.pgpass as for the nodes)."))
    r = ksub.add_parser("rotate", help="a new key of a kind; the old one becomes previous",
                        description="Generate a new non-exportable key in the HSM; for "
                        "issuing, the root certifies it. New certificates (and checkpoints) "
                        "use it at once; until it is retired the previous key keeps signing "
                        "CRLs and OCSP for what it issued (issuing), stays trusted (SSH: "
                        "/v1/ssh/ca lists both), or signs each checkpoint beside the new one "
                        "(audit). The root is rotated offline (docs/keys.md). An SSH CA key "
                        "may be staged first (--stage): published, signing nothing, until "
                        "the next `rotate` of its kind puts it in use, once hosts and "
                        "clients trust it.")
    r.add_argument("kind", choices=(*KINDS, "root"), help="which key (root: see rotate-root)")
    r.add_argument("--stage", action="store_true",
                   help="SSH CA keys: make the new key and publish it (GET /v1/ssh/ca), but "
                   "keep signing with the active one; `hsmca key rotate KIND` later puts "
                   "the staged key in use (no certificate is refused by a host that has not "
                   "fetched the new key yet)")
    common(r)
    rr = ksub.add_parser(
        "rotate-root", help="a new root, with the daemon stopped (a ceremony)",
        description="With the daemon stopped, on the CA host: generate a new root key in "
        "the HSM, self-sign it under the old root's name, certify each root with the other "
        "(RFC 4210 root key update), make a new issuing key under the new root, and record "
        "it all in the inventory and the audit log. Relying parties that trust either root "
        "accept what the CA issues next. docs/keys.md has the whole ceremony.")
    rr.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                    help="the CA's config (default ./hsmca.toml)")
    rr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rr.set_defaults(command_key="key")
    t = ksub.add_parser("retire", help="stop every use of a previous key",
                        description="A retired key signs nothing any more; the certificates "
                        "it issued stay trusted as client certificates until they expire or "
                        "are revoked, but a revocation of one reaches no CRL or OCSP "
                        "response (it signs none), so retire a previous issuing key once its "
                        "certificates have expired. A retired SSH CA key's revoked "
                        "certificates stay in the KRL (it is not signed). Says how many "
                        "are still valid, and asks. Only a previous key, or a staged SSH "
                        "key never used, can be retired: an active one is refused (rotate "
                        "first); one that became retirable after the question was put (an "
                        "admin rotated meanwhile) is refused too, and asked about again.")
    t.add_argument("label", help="the key's label (hsmca key list)")
    t.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(t)
    d = ksub.add_parser("destroy", help="C_DestroyObject on a retired key",
                        description="Destroy a retired key in the HSM, recorded in the audit "
                        "log like a signature (intent, then outcome). Cannot be undone.")
    d.add_argument("label", help="the key's label (hsmca key list)")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(d)
    v = ksub.add_parser("revoke", help="put a retired issuing key's CA certificate on its "
                        "root's CRL",
                        description="Revoke the CA certificate of a retired (or destroyed) "
                        "issuing key: its root's CRL lists it from now on, so relying "
                        "parties that check every link of a chain (openssl verify "
                        "-crl_check_all, nginx ssl_crl with crls.pem) refuse everything the "
                        "key issued, and hsmca no longer takes its client certificates. For "
                        "an issuing key feared compromised: `hsmca key rotate issuing`, "
                        "`hsmca key retire OLD`, then this (docs/keys.md). Cannot be undone.")
    v.add_argument("label", help="the issuing key's label (hsmca key list)")
    v.add_argument("--reason", default="cACompromise", metavar="REASON",
                   help="RFC 5280 reason for a CA certificate: cACompromise (the default), "
                   "superseded, cessationOfOperation, affiliationChanged or unspecified")
    v.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(v)


def _replaced(key: dict[str, Any]) -> str:
    """How many of a key's live certificates their holders replaced by a renewal: those
    count until their notAfter whatever anyone renews (an operator's trial renewed
    everything and was told the same count again)."""
    n = key.get("live_renewed")
    if not n:
        return ""
    return f", {'all' if n == key.get('live') else n} of them replaced by a renewal already"


def _renew_advice(key: dict[str, Any]) -> str:
    if key.get("live_renewed") == key.get("live"):
        return ("Their holders have renewed: renewing again does not end these, which lapse "
                "at their notAfter")
    return ("Renew the others (`hsmca renew`) to move them to the active key; the ones "
            "replaced already lapse at their notAfter" if key.get("live_renewed") else
            "Renew them (`hsmca renew`) to move them to the active key")
