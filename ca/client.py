"""Client side of the CLI: enroll, renew, revoke, tokens, over (mutual) TLS.

Everything that can be checked locally is checked before the first request: the URL,
the CA file, the client certificate's validity and key, where the results will be
written. A one-time token or a renewal is never spent on a command that then cannot
use its result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca.chains import issued_by, presented, self_signed
from ca.commands.args import check_url
from ca.config import CA_SERVER_NAME
from ca.errors import ClientError  # defined there: a failed command loads no HTTP client
from ca.fileutil import copy_new, write_atomic
from ca.validity import ended

TIMEOUT = aiohttp.ClientTimeout(total=60)


def base_url(url: str, flag: str = "--url") -> str:
    """The daemon's base URL without a trailing slash; see check_url."""
    try:
        return check_url(url)
    except ValueError as exc:
        raise ClientError(f"{flag} {exc}") from None


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ClientError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ClientError(f"{flag} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ClientError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


def load_certificates(path: Path, flag: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path, flag))
    except ValueError:
        raise ClientError(f"{flag} {path} holds no PEM certificate") from None


def load_private_key(path: Path, flag: str = "--key") -> Any:
    data = _read(path, flag)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ClientError(f"{flag} {path} is encrypted; hsmca needs the key unencrypted "
                          "(protected by its file mode, 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = ""
        if b"-----BEGIN PUBLIC KEY-----" in data:  # audit_key.pem, as `audit verify --key`
            hint = (": it is a public key (such as the audit key, which `hsmca audit "
                    "verify --key` takes); here give your client certificate's private key")
        raise ClientError(f"{flag} {path} holds no PEM private key{hint}") from None


@dataclass(frozen=True)
class _ContextInfo:
    ca: Path | None
    cert: Path | None


# What each context was made from, to explain a failed handshake in terms of the flags.
_INFO: weakref.WeakKeyDictionary[ssl.SSLContext, _ContextInfo] = weakref.WeakKeyDictionary()


def loopback(host: str | None) -> bool:
    """Whether `host` (a URL's) names this machine: certificates for such names are no
    proof of who answers, since the CA certifies fleet hosts for them."""
    if not host:
        return False
    host = host.strip("[]").lower().removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CAContext(ssl.SSLContext):
    """A client context for the CA's own daemon, trusting the CA's root: at a loopback
    address the server must prove CA_SERVER_NAME, which only the daemon's listener
    carries, instead of the loopback name, which fleet hosts may be certified for (an
    SSH trial had a host's credential for 127.0.0.1 answer in the CA's place)."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if not server_side and isinstance(server_hostname, str) and loopback(server_hostname):
            server_hostname = CA_SERVER_NAME
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def ssl_context(ca: Path | None, cert: Path | None = None,
                key: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2+ context trusting `ca` (else the system's CAs, which may hold this CA's
    root too), presenting cert/key; a daemon at a loopback address must prove it is the
    CA's (_CAContext). What ssl.create_default_context makes, of that class."""
    ctx = _CAContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain, checks names
    if ca is not None:
        ctx.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode()
            for c in load_certificates(ca, "--ca")))
    else:
        ctx.load_default_certs()
    if sys.version_info >= (3, 13):  # as create_default_context sets them there
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        _read(cert, "--cert")
        if key is not None:
            _read(key, "--key")
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            if reason == "KEY_VALUES_MISMATCH":
                raise ClientError(f"--key {key} is not the private key of --cert {cert}"
                                  ) from None
            # Said of the file at fault, in words (OpenSSL says "PEM lib")
            load_certificates(cert, "--cert")
            load_private_key(key or cert, "--key")
            raise ClientError(f"cannot load the client certificate {cert} / key {key}: "
                              f"{reason}") from None
    _INFO[ctx] = _ContextInfo(ca, cert)
    return ctx


def _problem_detail(body: bytes, content_type: str) -> str:
    detail = body.decode("utf-8", "replace").strip()[:300]
    if content_type == "application/problem+json":
        try:
            detail = json.loads(body).get("detail", detail)
        except (ValueError, AttributeError):
            pass
    return " ".join(str(detail).split())  # one line, whatever the server sent


async def _request(session: aiohttp.ClientSession, method: str, url: str,
                   ctx: ssl.SSLContext, *, json_body: Any = None,
                   headers: dict[str, str] | None = None,
                   expect: int | tuple[int, ...] = 200) -> tuple[str, bytes]:
    """(content type, body bytes) of a response with status `expect` (or one of them);
    every failure, the daemon's problem+json detail included, becomes one ClientError
    line."""
    info = _INFO.get(ctx, _ContextInfo(None, None))
    try:
        async with session.request(method, url, json=json_body, headers=headers,
                                   ssl=ctx) as r:
            body = await r.read()
            if r.status not in (expect if isinstance(expect, tuple) else (expect,)):
                detail = _problem_detail(body, r.content_type)
                raise ClientError(f"{method} {url}: {r.status} {r.reason}: {detail}",
                                  status=r.status, detail=detail,
                                  retryable=r.status >= 500 or r.status == 429)
            return r.content_type, body
    except aiohttp.ClientConnectorCertificateError as exc:
        reason = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
        if CA_SERVER_NAME in str(reason):
            trusted = f"--ca {info.ca}" if info.ca is not None else "the system's CAs"
            raise ClientError(
                f"cannot connect to {url}: the server there is not this CA's daemon: its "
                f"certificate verifies against {trusted} but lacks {CA_SERVER_NAME}, "
                "which only the daemon's own carries (a host certified for a loopback name "
                "answered; or the daemon is older than 0.3.0, which renews its certificate "
                "when it starts)") from None
        code = getattr(exc.certificate_error, "verify_code", None)
        if code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
            # By this host's clock: a clock behind was told to check its root file (a
            # client trial, after the daemon renewed its own certificate)
            raise ClientError(
                f"cannot connect to {url}: by this host's clock (now "
                f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}) the server's "
                f"certificate chain is {'not valid yet' if code == 9 else 'expired'} "
                f"({reason}): is this host's clock right?",
                # A clock behind is put right by NTP, often minutes after a boot: a
                # renewer waits for it (it exited for good, its unit not restarted)
                retryable=code == 9) from None
        if info.ca is not None:
            raise ClientError(f"cannot connect to {url}: the server's certificate chain does "
                              f"not verify against --ca {info.ca} ({reason}); is that file "
                              "this CA's root.pem? (After a root rotation whose old root is "
                              "retired, it must hold the new root.pem: `hsmca renew` adds it "
                              "while the old root hands over.)") from None
        raise ClientError(f"cannot connect to {url}: the server's certificate is not trusted "
                          f"({reason}); pass --ca with the CA's root.pem") from None
    except aiohttp.ClientConnectorError as exc:
        raise ClientError(f"cannot connect to {url}: {_connect_failure(exc.os_error)}",
                          retryable=True) from None
    except TimeoutError:
        raise ClientError(f"{method} {url}: no answer within {TIMEOUT.total:.0f} s",
                          retryable=True, unanswered=True) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        # The daemon ends the handshake when it refuses a client certificate; the local
        # checks make that rare, but a restart of the daemon looks the same.
        hint = (f"; if it persists, the daemon is refusing the client certificate "
                f"{info.cert}" if info.cert is not None else "")
        raise ClientError(f"{method} {url}: the connection was closed ({exc}){hint}",
                          retryable=True, unanswered=True) from None
    except aiohttp.ClientError as exc:
        raise ClientError(f"{method} {url} failed: {exc}", retryable=True) from None


def _connect_failure(error: OSError) -> str:
    """Why a connection failed, and what to check, in words: aiohttp's own text quotes
    its SSLContext object, and a server that took the connection and never answered
    came out as `ssl:<ca.client._CAContext object at 0x...> [None]` (an operator trial)."""
    if isinstance(error, TimeoutError) or (error.strerror is None and not error.args):
        return (f"no answer to the TLS handshake within {TIMEOUT.total:.0f} s (something "
                "there takes connections and says nothing: is that the daemon's port, "
                "and is the daemon stopped or stuck?)")
    if isinstance(error, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(error):
        return ("the server there does not speak TLS (a plain-HTTP port, say: the CRL and "
                "OCSP listener?); hsmca serves its API over HTTPS on [server] listen")
    return f"{error.strerror or error}; {_connect_hint(error)}"


def _connect_hint(error: OSError) -> str:
    """What to check, by what failed: the connection-limit hint was given for a name
    that does not resolve too (an operator trial)."""
    if isinstance(error, socket.gaierror):
        return "check the host name in --url"
    if error.errno == errno.ECONNREFUSED:
        return "is `hsmca serve` running there, on that port?"
    return ("is `hsmca serve` running there, and not at its connection limit (its log says "
            "\"refused a connection\")?")


def unreachable(exc: BaseException) -> str:
    """Why a request did not reach the daemon, in words: aiohttp's own text for a refused
    connection quotes its SSLContext object (`ssl:<ssl.SSLContext object at 0x...>`)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{exc.host}:{exc.port}: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT.total:.0f} s"
    return str(exc) or type(exc).__name__


async def call(method: str, url: str, ctx: ssl.SSLContext, *, json_body: Any = None,
               headers: dict[str, str] | None = None,
               expect: int | tuple[int, ...] = 200) -> Any:
    """One request on a fresh session; JSON bodies decoded, others as text."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        ctype, body = await _request(s, method, url, ctx, json_body=json_body,
                                     headers=headers, expect=expect)
    return json.loads(body) if ctype.endswith("json") else body.decode("utf-8", "replace")


async def get_raw(url: str, ctx: ssl.SSLContext) -> bytes:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        return (await _request(s, "GET", url, ctx))[1]


def make_csr(names: list[str], key: Any) -> str:
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if "://" in n:
                sans.append(x509.UniformResourceIdentifier(n))
            elif "@" in n:
                sans.append(x509.RFC822Name(n))
            else:
                sans.append(x509.DNSName(n))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def new_key(like: Any = None) -> Any:
    """A new private key: P-256, or of the same kind and size as `like` (a key being
    replaced: `renew --rekey` turned an RSA key into P-256 silently, and a service
    whose peers need RSA broke at its key rotation; a service team's trial)."""
    if isinstance(like, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=like.key_size)
    if isinstance(like, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(like.curve)
    if isinstance(like, ed25519.Ed25519PrivateKey):
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---- local checks of a client credential --------------------------------------------

def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def check_credential(cert: Path, key: Path, now: dt.datetime | None = None
                     ) -> x509.Certificate:
    """The client certificate as the daemon will judge it, judged here first: readable,
    valid now, and `key` is its key. An expired certificate would otherwise end in
    'Server disconnected' during the handshake."""
    leaf = load_certificates(cert, "--cert")[0]
    private = load_private_key(key, "--key")
    now = now or dt.datetime.now(dt.UTC)
    if ended(leaf.not_valid_after_utc, now):
        raise ClientError(f"--cert {cert} expired at {leaf.not_valid_after_utc.isoformat()} "
                          f"(this host's clock says {now.isoformat(timespec='seconds')}); an "
                          "expired certificate cannot authenticate to the CA: enroll again "
                          "with a new bootstrap token (if this host's clock is wrong, set it "
                          "right first)")
    if now < leaf.not_valid_before_utc:
        # Retryable: a renewer on a host booted with its clock behind (no RTC, NTP not
        # synced yet) exited for good, its unit not restarted (exit 3); it waits now.
        raise ClientError(f"--cert {cert} is not valid before "
                          f"{leaf.not_valid_before_utc.isoformat()}; is this host's clock "
                          "right?", retryable=True)
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        raise ClientError(f"--key {key} is not the private key of --cert {cert}")
    return leaf


def ending(cert: Path, now: dt.datetime | None = None) -> str | None:
    """A warning when the client certificate `cert` is in the last third of its
    lifetime, when `hsmca renew` would renew it: past its end only a new bootstrap
    token helps (an SSH trial: a person's credential ended the next day, unannounced)."""
    leaf = load_certificates(cert, "--cert")[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    now = now or dt.datetime.now(dt.UTC)
    if now < start + (end - start) * 2 / 3:
        return None
    seconds = max(int((end - now).total_seconds()), 0)
    left = seconds // 60
    # (in seconds below a minute: an SSH trial read "in 0 h 0 min")
    when = f"{left // 60} h {left % 60} min" if left else f"{seconds} s"
    return (f"--cert {cert} ends at {end.isoformat()} (in {when}): "
            f"renew it before then (hsmca renew --cert {cert} --key ...), or an admin must "
            "give you a new bootstrap token")


async def check_issuer(url: str, anon: ssl.SSLContext, cert: Path,
                       leaf: x509.Certificate) -> None:
    """Ask the daemon for its issuing CAs (anonymously; every one still in use, so a
    certificate from before a key rotation counts) and check that one issued `leaf`: a
    certificate from another CA is named here instead of failing the handshake with a
    reset connection."""
    text = await call("GET", f"{url}/v1/x509/bundle", anon)
    try:
        chain = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise ClientError(f"GET {url}/v1/x509/bundle: the daemon sent no PEM") from None
    if not any(issued_by(leaf, ca) for ca in chain):
        # An issuing CA of this CA's root that the bundle no longer lists (its certificate
        # was revoked: `hsmca key revoke`), found in the file beside the leaf: the
        # daemon's answer says why it refuses it (a docs trial was told "another CA").
        roots = [c for c in chain if c.subject == c.issuer]
        if any(issued_by(leaf, c) and any(issued_by(c, r) for r in roots)
               for c in load_certificates(cert, "--cert")[1:]):
            return
        issuer = leaf.issuer.rfc4514_string()
        if any(ca.subject == leaf.issuer for ca in chain):
            # Same name, other key: another CA (staging and production, say), not this one.
            raise ClientError(f"--cert {cert} was issued by a CA named '{issuer}' whose key is "
                              f"not one of the CA at {url}, which has that name too: it "
                              "comes from another CA (another hsmca instance?); use a "
                              "certificate this CA issued, or enroll with it")
        raise ClientError(f"--cert {cert} was issued by '{issuer}', "
                          f"not by the CA at {url} (which issues as "
                          f"'{chain[0].subject.rfc4514_string()}'); use a certificate this "
                          "CA issued, or enroll with it")


async def preflight(url: str, ca: Path | None, cert: Path, key: Path) -> ssl.SSLContext:
    """Every check before a mutual-TLS request; returns the context to make it with."""
    leaf = check_credential(cert, key)
    ctx = ssl_context(ca, cert, key)
    await check_issuer(url, ssl_context(ca), cert, leaf)
    return ctx


async def check_standing(url: str, ca: Path | None, cert: Path, key: Path) -> None:
    """`preflight`, then whether the CA still answers to this certificate (not revoked,
    still in its inventory): what a long-running renewer checks when it starts."""
    ctx = await preflight(url, ca, cert, key)
    await call("GET", f"{url}/v1/whoami", ctx)


# ---- writing results: checked before the request, atomic after it -------------------

def _keep_or(dfd: int, name: str, default: int, private: bool) -> tuple[int, int, int]:
    """(mode, uid, gid) for a replacement of `name` in `dfd`: the existing file's (an
    operator may have given a certificate to a service's group), or `default` for a new
    one; a private key never gets any bit for others."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return default, -1, -1
    if not stat.S_ISREG(st.st_mode):
        return default, -1, -1
    mode = stat.S_IMODE(st.st_mode)
    if private:
        mode &= 0o770
    return mode, st.st_uid, st.st_gid


PREVIOUS = ".hsmca-previous"  # what a file held while a replacement is under way


def previous_of(path: Path) -> Path:
    """Where `Staged.commit` keeps the file `path` held until every file is replaced."""
    return path.parent / _previous(path.name)


def _previous(name: str) -> str:
    return f".{name}{PREVIOUS}"


@dataclass
class _Slot:
    """One file `Staged` replaces: the directory it is in and its temporary file, both
    opened when they were checked, so that whoever can write that directory cannot
    redirect the write with links swapped in while the CA answers."""

    dfd: int  # the directory, walked to without following any link
    name: str  # the file's name in it
    tmp: str  # the temporary file's name in it
    fd: int  # the temporary file, open since it was made


def not_regular(path: Path, real: Path | None = None) -> None:
    """Refuses a path that is there and is no regular file: a device, a pipe, a socket
    (an operator trial's `--out` replaced a device node with a file, hung on a pipe, and
    on /dev/full was killed reading zeros for ever, with nothing said)."""
    try:
        mode = (real or path).stat().st_mode
    except OSError:
        return  # not there (or unreadable: the write says why)
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ClientError(f"{path} is not a regular file (a device, a pipe or a socket); "
                          "give the path of a file to write")


@dataclass
class Staged:
    """Files to replace, each prepared as a temporary file beside it before anything
    is spent: if a directory is not writable the command stops before the request.
    `commit` writes, fsyncs and renames each into place, all or none: what each file
    held is kept beside it (`previous_of`, a hard link) until every rename is done, put
    back if one fails, and found by `restore_interrupted` after a crash between them.
    A symlink is followed: the file it points to is replaced, the link stays. Every step
    after the check goes through the directory and temporary file opened at it, never
    by name (a review found a renewal run as root writing through a link the directory's
    owner put in place of its temporary file). `abort` removes the temporary files."""

    targets: dict[Path, tuple[int, bool]]  # path -> (mode for a new file, private)
    # Take the room for each file now (see _reserve): for who would rather not ask
    # than hold an answer it cannot write (a one-shot renew, which cannot hold it)
    reserve: bool = False
    _slots: dict[Path, _Slot] = field(default_factory=dict)

    def prepare(self) -> Staged:
        for path in self.targets:
            try:
                self._slots[path] = self._slot(path, self.reserve)
            except ClientError:
                self.abort()
                raise
        return self

    @staticmethod
    def _slot(path: Path, reserve: bool) -> _Slot:
        real = replaceable(path)
        _sweep(real.parent, f".{real.name}.", files=True)
        if real.is_dir():
            raise ClientError(f"{path} is a directory; it would be replaced by a file")
        not_regular(path, real)
        if not real.parent.exists():
            raise ClientError(f"cannot write {path}: {real.parent} does not exist")
        dfd = opened_dir(real.parent)
        try:
            if os.fstat(dfd).st_mode & stat.S_IWOTH:  # the directory opened, not a name
                raise ClientError(f"{real.parent} is writable by every user: "
                                  f"`chmod o-w {real.parent}`")
            tmp, fd = _new_file(dfd, f".{real.name}.")
            try:
                if reserve:
                    # At least what the file holds now, twice: a KRL grows past the
                    # fixed room (a review)
                    _reserve(fd, max(RESERVED, 2 * _size(real)))
            except OSError:
                os.close(fd)
                _unlink(dfd, tmp)
                raise
        except OSError as exc:  # a full or read-only disk may be fixed: retryable
            os.close(dfd)
            raise ClientError(f"cannot write to {real.parent}: {exc.strerror} (checked "
                              "before contacting the CA: nothing was spent)",
                              retryable=True,
                              full=exc.errno in (errno.ENOSPC, errno.EDQUOT)) from None
        except ClientError:
            os.close(dfd)
            raise
        return _Slot(dfd, real.name, tmp, fd)

    def commit(self, data: dict[Path, bytes | str]) -> None:
        try:
            self._commit(data)
        except BaseException:
            self.abort()  # whatever failed: no descriptor or temporary file is left
            raise

    def _commit(self, data: dict[Path, bytes | str]) -> None:
        try:
            for path, slot in self._slots.items():
                self._write(path, slot, data[path])
        except OSError as exc:  # a full disk: nothing is replaced, and it may pass
            self.abort()
            raise ClientError(f"cannot write the new files beside {next(iter(data))}: "
                              f"{exc.strerror or exc}; every file is as it was before",
                              retryable=True) from None
        slots = self._slots
        for path, slot in slots.items():
            if not _same_file(slot.dfd, slot.tmp, slot.fd):
                self.abort()
                raise ClientError(
                    f"{path}: its temporary file {slot.tmp} changed while the CA answered "
                    "(someone who can write that directory replaced it); nothing was "
                    "replaced (the new certificate was issued but not installed)")
        kept: set[Path] = set()
        done: list[Path] = []
        try:
            for path, slot in slots.items():
                if _exists(slot.dfd, slot.name):
                    _keep_copy(slot.dfd, slot.name)
                    kept.add(path)
            for slot in slots.values():  # what to go back to is durable before any rename
                os.fsync(slot.dfd)
            # The key first, so that a reader who finds a new certificate also finds
            # its key; the hook runs only after all are in place.
            for path, slot in slots.items():
                os.replace(slot.tmp, slot.name, src_dir_fd=slot.dfd, dst_dir_fd=slot.dfd)
                done.append(path)
        except OSError as exc:
            failed = next((p for p in slots if p not in done), next(iter(slots)))
            for path in reversed(done):
                slot = slots[path]
                if path in kept:
                    kept.discard(path)
                    os.replace(_previous(slot.name), slot.name, src_dir_fd=slot.dfd,
                               dst_dir_fd=slot.dfd)
                else:  # it did not exist before
                    _unlink(slot.dfd, slot.name)
            for path in kept:
                _unlink(slots[path].dfd, _previous(slots[path].name))
            self.abort()
            raise ClientError(
                f"cannot replace {failed}: {exc.strerror or exc}; every file is as it was "
                "before (the new certificate was issued but not installed: `renew "
                "--daemon` installs it once the file can be replaced, a one-shot renew "
                "asks again then)", retryable=True) from None
        for slot in slots.values():
            os.fsync(slot.dfd)
        for path in kept:
            _unlink(slots[path].dfd, _previous(slots[path].name))
        for slot in slots.values():
            os.close(slot.fd)
            os.close(slot.dfd)
        slots.clear()

    def _write(self, path: Path, slot: _Slot, payload: bytes | str) -> None:
        mode, uid, gid = _keep_or(slot.dfd, slot.name, *self.targets[path])
        os.fchmod(slot.fd, mode)
        if uid != -1 and (uid, gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(slot.fd, uid, gid)
            except PermissionError:
                pass  # not root: the file becomes ours, as any editor would do
        view = memoryview(payload.encode() if isinstance(payload, str) else payload)
        size = len(view)
        while view:
            view = view[os.write(slot.fd, view):]
        os.ftruncate(slot.fd, size)  # what _reserve took beyond it
        os.fsync(slot.fd)

    def abort(self) -> None:
        for slot in self._slots.values():
            if _same_file(slot.dfd, slot.tmp, slot.fd):
                _unlink(slot.dfd, slot.tmp)
            os.close(slot.fd)
            os.close(slot.dfd)
        self._slots.clear()


_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # Linux: only search permission needed


def opened_dir(directory: Path) -> int:
    """`directory` (resolved: no symlink in it) opened by walking it one name at a time
    without following a link, so that one swapped in after the checks is refused instead
    of written through. Only search permission is needed on the way (O_PATH)."""
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", _O_PATH | flags)
    try:
        parts = directory.parts[1:]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = os.open(part, (os.O_RDONLY if last else _O_PATH) | flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:
            nxt = os.open(".", os.O_RDONLY | flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ClientError(f"{directory} changed while it was checked (a symlink was put "
                              "on the way): refusing to write there") from None
        raise ClientError(f"cannot open {directory}: {exc.strerror} (checked before "
                          "contacting the CA: nothing was spent)") from None
    return fd


# Room taken for each new file before the CA is asked: a certificate, its chain and a
# key in one file take under 8 KiB. An empty file is made on a full disk, so the check
# found no want of room, and each one-shot renewal on one was issued and thrown away (a
# full-disk trial: four certificates for nobody). `renew --daemon` asks all the same and
# holds the answer until it can be written: through a long full disk, the certificate
# it renews may expire meanwhile, and the answer held is then the only way on.
RESERVED = 16 * 1024


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _reserve(fd: int, size: int = RESERVED) -> None:
    """Take `size` bytes of the disk for `fd` now (OSError ENOSPC on a full one), so
    that writing the answer into it later cannot run out of room."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it
            raise


def _new_file(dfd: int, prefix: str) -> tuple[str, int]:
    """A new file of ours in `dfd` named `prefix` and 8 random characters (what `_sweep`
    looks for), open for writing."""
    while True:
        name = prefix + secrets.token_hex(4)
        try:
            return name, os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except FileExistsError:
            continue


def _same_file(dfd: int, name: str, fd: int) -> bool:
    """Whether `name` in `dfd` is still the file open as `fd`."""
    try:
        there = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def followed(path: Path) -> Path:
    """The file `path` names, refused if a symlink met on the way there (the file's own,
    or a directory's) was made by someone other than root, the user renewing, or the
    owner of the file it ends at: a renewal run as root in a directory a service account
    could write replaced whatever file that account linked `chain.pem` to, /etc/shadow
    included, and a link of root's into the account's directory could lead through one
    of the account's (two reviews). Root's links to a service's own files (what
    configuration management makes) are followed."""
    real = path.resolve()
    if real.is_dir():
        return real  # refused by the callers, as a directory
    try:
        owner = real.stat().st_uid
    except FileNotFoundError:  # a new file: whoever owns the directory it goes in
        owner = real.parent.stat().st_uid if real.parent.exists() else os.geteuid()
    trusted = {0, os.geteuid(), owner}
    for link in _links_met(path):
        maker = os.lstat(link).st_uid
        if maker not in trusted:
            raise ClientError(
                f"{path} leads to {real} through the symlink {link}, made by uid {maker}: "
                f"neither root, this user, nor that file's owner (uid {owner}); refusing to "
                "replace it (a link planted by whoever can write a directory on the way "
                "could point anywhere); make the link as the file's owner or root, or "
                "replace it with the file")
    return real


def replaceable(path: Path) -> Path:
    """The file a renewal replaces for `path` (`followed`), refused also when its
    directory, or the link's, is writable by every user, who could replace the files
    in it or plant links there. `renew --daemon` asks at its start, so that a layout an
    older release accepted fails then, not at the first renewal hours later (an
    upgrade trial)."""
    real = followed(path)
    for where in dict.fromkeys((path.parent, real.parent)):
        if where.exists() and where.stat().st_mode & stat.S_IWOTH:
            raise ClientError(f"{where} is writable by every user, who could replace the "
                              f"files in it or plant links there: `chmod o-w {where}` "
                              "(checked before contacting the CA: nothing was spent)")
    return real


def _links_met(path: Path) -> list[Path]:
    """Every symlink the kernel would follow resolving `path`, in order: its directories'
    and its own, and those their targets lead through."""
    met: list[Path] = []
    # Not os.path.abspath: it drops "link/.." before the link is followed, where the
    # kernel goes up from the link's target.
    pending = list((path if path.is_absolute() else Path.cwd() / path).parts[1:])
    here = Path("/")
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            here = here.parent
            continue
        step = here / part
        if not step.is_symlink():
            here = step
            continue
        met.append(step)
        if len(met) > 40:  # the kernel's own bound (ELOOP)
            raise ClientError(f"{path}: too many levels of symbolic links")
        target = Path(os.readlink(step))
        if target.is_absolute():
            here = Path("/")
        pending = list(target.parts[1 if target.is_absolute() else 0:]) + pending
    return met


def _keep_copy(dfd: int, name: str) -> None:
    """What `name` in `dfd` holds now, kept beside it (`previous_of`): a hard link, or,
    where the kernel allows none (a file owned by another user, under
    fs.protected_hardlinks), a copy, flushed. Neither follows a link."""
    backup = _previous(name)
    _unlink(dfd, backup)
    try:
        os.link(name, backup, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        return
    except OSError:
        pass
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(src)
        copy_new(src, st.st_size, backup, stat.S_IMODE(st.st_mode), dir_fd=dfd)
    finally:
        os.close(src)


STALE_S = 600  # a temporary file this old is a run that was killed, not one under way


def _sweep(parent: Path, prefix: str, files: bool) -> None:
    """Remove what a killed run left beside a target: its temporary files (named by
    mkstemp: the prefix and 8 characters), or its empty staging directories."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        rest = entry.name.removeprefix(prefix)
        if rest == entry.name or PREVIOUS in rest:
            continue
        try:
            if files and len(rest) == 8 and entry.is_file() and not entry.is_symlink() \
                    and now - entry.stat().st_mtime > STALE_S:
                entry.unlink()
            elif not files and rest.startswith("enroll-") and entry.is_dir():
                entry.rmdir()  # only if empty: a staging directory never filled
        except OSError:
            pass


def restore_interrupted(paths: list[Path], consistent: Any) -> bool:
    """After a replacement that died between its renames (kill -9, power loss), put
    back what every file held before it, unless what is in place is `consistent()` (the
    renames were all done). Whether anything was put back."""
    real = [followed(p) for p in paths]
    kept = [previous_of(p) for p in real if previous_of(p).exists()]
    if not kept:
        return False
    try:
        whole = consistent()
    except ClientError:
        whole = False
    if not whole:
        for path in real:
            dfd = opened_dir(path.parent)
            try:
                if _exists(dfd, _previous(path.name)):
                    os.replace(_previous(path.name), path.name, src_dir_fd=dfd,
                               dst_dir_fd=dfd)
                    os.fsync(dfd)
            finally:
                os.close(dfd)
        return True
    for backup in kept:
        backup.unlink(missing_ok=True)
    return False


CREDENTIAL_FILES = ("key.pem", "cert.pem", "chain.pem")


@dataclass
class OutputDir:
    """Where `enroll` writes key.pem, cert.pem and chain.pem, checked before the token
    is spent. A new directory is built beside its final place and renamed into it, so
    it appears complete or not at all; an existing one must be empty, or --force. The
    new one is written through descriptors opened when it was made, so that whoever can
    write its parent cannot swap it for a link meanwhile."""

    out: Path
    force: bool = False
    _staging: tuple[int, str, int] | None = None  # parent's fd, name, its own fd
    _created: list[Path] = field(default_factory=list)
    _files: Staged | None = None

    def prepare(self) -> OutputDir:
        out = self.out
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise ClientError(f"--out {out} exists and is not a directory")
            if any(not p.name.startswith(f".{KEPT_KEY}-") for p in out.iterdir()) \
                    and not self.force:
                raise ClientError(f"--out {out} already exists and is not empty; pass --force "
                                  f"to replace {', '.join(CREDENTIAL_FILES)} in it")
            self._files = Staged({out / n: (0o600 if n == "key.pem" else 0o644,
                                            n == "key.pem") for n in CREDENTIAL_FILES})
            self._files.prepare()
            return self
        _sweep(out.parent, f".{out.name}.", files=False)
        missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
        try:
            for parent in reversed(missing):
                parent.mkdir()
                self._created.append(parent)
            pfd = opened_dir(out.parent.resolve())
            try:
                name = f".{out.name}.enroll-{secrets.token_hex(4)}"
                os.mkdir(name, 0o700, dir_fd=pfd)
                self._staging = (pfd, name, os.open(name, os.O_RDONLY | os.O_DIRECTORY
                                                    | os.O_NOFOLLOW | os.O_CLOEXEC,
                                                    dir_fd=pfd))
            except OSError:
                os.close(pfd)
                raise
        except ClientError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            # In the directory the user named, not our staging directory's name (an
            # operator trial read ".o1.enroll-267713fb")
            where = Path(exc.filename) if exc.filename else out.parent
            if where.name.startswith(f".{out.name}.enroll-"):
                where = out.parent
            raise ClientError(f"cannot create --out {out}: {exc.strerror} in {where} "
                              "(checked before the token was used: it is still valid)"
                              ) from None
        return self

    def commit(self, files: dict[str, bytes | str]) -> None:
        try:
            self._commit(files)
        except BaseException:
            self.abort()  # the staging directory goes, key.pem with it
            raise

    def _commit(self, files: dict[str, bytes | str]) -> None:
        if self._files is not None:
            self._files.commit({self.out / n: data for n, data in files.items()})
            return
        assert self._staging is not None
        pfd, staging, sfd = self._staging
        for name, data in files.items():
            mode = 0o600 if name == "key.pem" else 0o644
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode, dir_fd=sfd)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(data.encode() if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        # What mkdir would have made, but never writable by group or others, whatever
        # the umask: whoever can write it can plant links for the renewals (a review
        # found one under umask 000 made 0777).
        os.fchmod(sfd, 0o755 & ~umask)
        os.fsync(sfd)
        if not _same_file(pfd, staging, sfd):
            raise ClientError(f"--out {self.out}: the directory being filled, {staging}, was "
                              "replaced while the CA answered (someone who can write "
                              f"{self.out.parent}); the certificate was issued but not "
                              "installed")
        os.rename(staging, self.out.name, src_dir_fd=pfd, dst_dir_fd=pfd)
        os.fsync(pfd)
        os.close(sfd)
        os.close(pfd)
        self._staging = None

    def abort(self) -> None:
        if self._files is not None:
            self._files.abort()
        if self._staging is not None:
            pfd, staging, sfd = self._staging
            if _same_file(pfd, staging, sfd):
                shutil.rmtree(staging, dir_fd=pfd, ignore_errors=True)
            os.close(sfd)
            os.close(pfd)
            self._staging = None
        for parent in reversed(self._created):
            try:
                parent.rmdir()
            except OSError:
                pass
        self._created.clear()


KEPT_KEY = "hsmca-enroll-key"


def kept_key_paths(out: Path, token: str) -> tuple[Path, Path]:
    """Where `enroll` keeps its new key from before its request until its files are in
    place: inside --out when that directory exists, else beside it; named after the
    token (a hash of it), so that only the same enrollment takes it up again."""
    name = f"{KEPT_KEY}-{hashlib.sha256(token.encode()).hexdigest()[:16]}.pem"
    return out / f".{name}", out.parent / f".{out.name}.{name}"


def _kept_key(out: Path, token: str) -> tuple[Path, Any] | None:
    """The key an earlier enrollment into `out` with this token kept, its files never
    written: only a file of this user's, readable by nobody else, that is no link (a
    review planted a key of its own in a shared directory, and the enrollment certified
    it)."""
    for path in kept_key_paths(out, token):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ClientError(f"cannot read the kept key {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                    or st.st_mode & 0o077:
                raise ClientError(f"{path} is not a key an enrollment of yours kept (another "
                                  "owner, or readable by others): remove it and try again")
            data = fh.read()
        try:
            return path, serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ClientError(f"the kept key {path} is damaged: remove it (its token "
                              "may be spent: then ask an admin for a new one)") from None
    return None


def _keep_key(out: Path, token: str, key: Any) -> Path:
    """Write `key` (0600, flushed) where a later run finds it, before the token is used:
    a disk too full for it fails here, the token still valid."""
    path = kept_key_paths(out, token)[0 if out.is_dir() else 1]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ClientError(f"cannot write the new key to {path}: {exc.strerror} (checked "
                          "before the token was used: it is still valid)") from None
    return path


async def enroll(url: str, token: str, names: list[str], out: Path, ca: Path | None, *,
                 force: bool = False, ttl: str | None = None,
                 warn: Any = None) -> dict[str, Any]:
    """Enroll with a new key into `out`. The key is written before the request, and kept
    until the files are in place: when they cannot be written (a full disk) after the CA
    answered, the token is spent, and running the same enrollment again sends the kept
    key, which the CA answers with that certificate again (the key was lost with the
    token before: a client trial)."""
    ctx = ssl_context(ca)
    target = OutputDir(out, force).prepare()
    try:
        kept = _kept_key(out, token)
        if kept is not None:
            kept_path, key = kept
            if warn is not None:
                warn(f"using the key an earlier enrollment kept in {kept_path}, its files "
                     "never written: if the CA issued a certificate to it, it sends that "
                     "one again")
        else:
            key = new_key()
            kept_path = _keep_key(out, token, key)
    except BaseException:
        target.abort()
        raise
    try:
        body: dict[str, Any] = {"csr": make_csr(names, key)}
        if ttl is not None:
            body["ttl"] = ttl
        for retry in (False, True):
            try:
                # 200: the certificate this token already enrolled, for this very key
                issued = await call("POST", f"{url}/v1/x509/enroll", ctx, json_body=body,
                                    headers={"Authorization": f"Bearer {token}"},
                                    expect=(201, 200))
                break
            except ClientError as exc:
                # The answer was lost (a timeout, a closed connection): the same CSR
                # again gets the certificate if the token was spent on it, and a first
                # enrollment if the request never arrived.
                if retry or not exc.unanswered:
                    raise
        issued = check_answer(url, issued, key.public_key(), ca)
        # cert.pem holds the leaf and the CA certificates above it but the root: what a
        # TLS server or client sends, so that a relying party needs only the root, and
        # keeps working when the issuing key is rotated (a leaf alone failed at every
        # relying party that pinned the old issuing certificate; a service team's
        # trial). Renewals keep the shape.
        cert_pem = issued["certificate"] + intermediates(issued["chain"])
    except BaseException as exc:
        target.abort()
        if kept is None and isinstance(exc, ClientError) and not exc.unanswered and \
                not isinstance(exc, BadAnswer):  # (spent, maybe on a good one: kept)
            # Refused, or never sent: no certificate names this key. (A request that may
            # have been carried out keeps it, for the next run to ask with.)
            kept_path.unlink(missing_ok=True)
        raise
    try:
        target.commit({"key.pem": key_pem(key), "cert.pem": cert_pem,
                       "chain.pem": issued["chain"]})
    except (OSError, ClientError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ClientError(
            f"the CA issued certificate {issued['serial']} to the new key, and --out {out} "
            f"could not be written: {reason}. The token is spent on it; the key is kept "
            f"in {kept_path}: once that is mended, run the same enrollment again, before "
            "the token's expiry: it sends the kept key, and the CA answers with that "
            "certificate again") from None
    kept_path.unlink(missing_ok=True)
    return issued


class BadAnswer(ClientError):
    """The CA answered with what cannot be its certificate for this key (check_answer);
    trying again may get the real one."""


def check_answer(url: str, issued: Any, public_key: Any, ca: Path | None) -> dict[str, Any]:
    """The CA's answer, its serial and notAfter read from its certificate; BadAnswer
    unless it holds a certificate of `public_key` that its chain's issuing CA signed,
    and (with --ca) a chain that leads to a root of `ca`: checked before anything is
    replaced. A faulty CA, node or proxy's answer was installed as it came (another
    key's certificate, a self-signed one), the --exec hook ran on it, and every renewal
    after it failed on the mismatch (an enrollment trial)."""
    def bad(what: str) -> BadAnswer:
        return BadAnswer(f"the CA's answer at {url} {what}: nothing was written (a retry "
                         "asks again)", retryable=True)
    try:
        leaf = x509.load_pem_x509_certificate(str(issued["certificate"]).encode())
        chain = x509.load_pem_x509_certificates(str(issued["chain"]).encode())
    except (KeyError, TypeError, ValueError):
        raise bad("holds no PEM certificate and chain (a proxy's page?)") from None
    if _spki(leaf.public_key()) != _spki(public_key):
        raise bad(f"is a certificate of another key (serial {leaf.serial_number:x}), not "
                  "of the key sent")
    if not chain or not issued_by(leaf, chain[0]):
        raise bad(f"is a certificate its chain's issuing CA did not sign (issuer "
                  f"'{leaf.issuer.rfc4514_string()}')")
    if ca is not None:
        try:
            roots = load_certificates(ca, "--ca")
        except ClientError as exc:  # (read after the answer: the kept key stays)
            raise BadAnswer(str(exc), retryable=True) from None
        if not _leads_to(leaf, chain, roots):
            raise bad(f"has a chain that leads to no root of --ca {ca}")
    # What is said of it is the certificate's own, not the answer's words about it (a
    # re-trial's fake CA had "serial: bad" printed)
    return {**issued, "serial": format(leaf.serial_number, "x"),
            "not_after": leaf.not_valid_after_utc.isoformat()}


def _leads_to(leaf: x509.Certificate, chain: list[x509.Certificate],
              roots: list[x509.Certificate]) -> bool:
    """Whether `chain`, walked from `leaf` link by link (each certificate signed by the
    next), reaches one of `roots`, or a certificate one of them signed (the old root's
    certificate of the new one, while a root rotation hands over). Not "some certificate
    of the chain is": a leaf of another CA with this CA's chain after it passed that (a
    review)."""
    below = leaf
    for cert in chain:
        if not issued_by(below, cert):
            return False
        if any(cert == r or issued_by(cert, r) for r in roots):
            return True
        below = cert
    return False


def intermediates(chain_pem: str) -> str:
    """The CA's chain as PEM without its self-signed root (ca/chains.py)."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                   for c in presented(x509.load_pem_x509_certificates(chain_pem.encode())))


def _names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


async def renew(url: str, cert: Path, key: Path, ca: Path | None, rekey: bool, *,
                ttl: str | None = None, warn: Any = None,
                root_said: Any = None, reserve_room: bool = False) -> dict[str, Any]:
    """Renew `cert` over mutual TLS and replace cert (and, with `rekey`, key) and the
    chain.pem beside the certificate, all or none, once the CA has answered. The files
    keep their shape: a certificate file that held CA certificates after the leaf gets
    the new chain's (without its self-signed root, which a peer never needs), and one
    file holding both certificate and key (haproxy's) keeps both. Then
    `ca` follows a root rotation (`follow_root`, which says so through `root_said`).
    `reserve_room`: the room for the files is taken before the CA is asked (Staged)."""
    with _renewing(cert):
        issued = await _renew(url, cert, key, ca, rekey, ttl, warn, reserve_room)
    if ca is not None:
        await follow_root(url, ca, issued["chain"], root_said or warn)
    return issued


async def follow_root(url: str, ca: Path, chain_pem: str, warn: Any = None) -> None:
    """While the CA's root rotation hands over, its chain carries the new root certified
    by the old one (RFC 4210's NewWithOld). A renewer whose --ca holds the old root adds
    the new one to that file, on the old root's word: once the old root is retired, the
    daemon's chain ends at the new root, and every renewer pinned to the old one failed
    for good at its next connection (a key trial). Never fails the renewal it follows:
    its certificate is installed already (a review), so a failure is said, not raised."""
    try:
        added = await _followed_root(url, ca, chain_pem)
    except (ClientError, OSError, ValueError) as exc:
        if warn is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            warn(f"the CA's root was rotated, and --ca {ca} could not take the new root "
                 f"({reason}): put the CA's new root.pem there before the old root is "
                 "retired, or this renewer stops then")
        return
    if added and warn is not None:
        warn(f"the CA's root was rotated: --ca {ca} now holds the new root too (SHA-256 "
             f"{', '.join(added)}), certified by the root it held; give the CA's root.pem "
             "to the relying parties you look after")


async def _followed_root(url: str, ca: Path, chain_pem: str) -> list[str]:
    """The new roots added to `ca` (their SHA-256 fingerprints). Only a root that is
    in the served chain's path and vouched for is added: the chain's issuing CA is
    signed by its key, a valid CA certificate of that key (NewWithOld) is signed by a
    self-signed root `ca` holds, and the root itself is a valid self-signed CA."""
    now = dt.datetime.now(dt.UTC)
    pinned = [c for c in load_certificates(ca, "--ca") if self_signed(c)]
    keys = {_spki(c.public_key()) for c in pinned}
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    if not chain:
        return []
    vouched = [c for c in chain[1:] if _usable_ca(c, now) and not self_signed(c)
               and _spki(c.public_key()) not in keys and issued_by(chain[0], c)
               and any(issued_by(c, p) for p in pinned)]
    if not vouched:
        return []
    body = await get_raw(f"{url}/v1/x509/roots", ssl_context(ca))
    new = [r for r in x509.load_pem_x509_certificates(body) if self_signed(r)
           and _usable_ca(r, now)
           and any(_spki(r.public_key()) == _spki(c.public_key()) for c in vouched)]
    if not new:
        return []
    real = ca.resolve()  # a link to it stays one
    st = real.stat()
    write_atomic(real, real.read_bytes().rstrip(b"\n") + b"\n" + b"".join(
        r.public_bytes(serialization.Encoding.PEM) for r in new), stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):  # its owner and group, as the file had them
        os.chown(real, st.st_uid, st.st_gid)
    return [r.fingerprint(hashes.SHA256()).hex() for r in new]


def _usable_ca(cert: x509.Certificate, now: dt.datetime) -> bool:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    return ca and cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@contextlib.contextmanager
def _renewing(cert: Path) -> Iterator[None]:
    """One renewal at a time in the certificate's directory (a timer and a daemon, say):
    another one's mend could otherwise undo this one's renames half-way."""
    real = followed(cert)
    try:
        fd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        # Said of the flag's file (an operator's trial read only a directory's name).
        raise ClientError(f"--cert {cert}: cannot open its directory {real.parent}: "
                          f"{exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Retryable: `renew --daemon` tries again later; a one-shot renew ends here.
            raise ClientError(f"another renewal in {real.parent} is under way (a "
                              "`renew --daemon` there, or a timer); try again once it is "
                              "done", retryable=True) from None
        yield
    finally:
        os.close(fd)  # and the lock with it


async def _renew(url: str, cert: Path, key: Path, ca: Path | None, rekey: bool,
                 ttl: str | None, warn: Any, reserve_room: bool = False) -> dict[str, Any]:
    mend(cert, key, warn)
    waiting = _UNINSTALLED.pop((cert, key), None)
    if waiting is not None and load_certificates(cert, "--cert")[0].serial_number == \
            waiting[1]:
        # The CA answered last time, but the files could not be replaced: install that
        # answer rather than ask for (and have the HSM sign) another. Before the checks
        # of the credential on disk, which may have expired meanwhile: a client trial's
        # disk stayed full past its end, and the agent threw away the valid certificate
        # it held, and told its host to enroll again.
        issued, held_serial, data, targets = waiting
        files = Staged(targets).prepare()
        _commit_or_keep(files, data, cert, key, issued, held_serial, targets)
        return issued
    ctx = await preflight(url, ca, cert, key)
    held = load_certificates(cert, "--cert")
    current = held[0]
    combined = cert.resolve() == key.resolve()
    targets = renewal_targets(cert, key, rekey)
    files = Staged(targets, reserve_room).prepare()
    try:
        body: dict[str, Any] = {}
        new = None
        if rekey:
            new = new_key(like=load_private_key(key))
            body["csr"] = make_csr(_names(current), new)
        if ttl is not None:
            body["ttl"] = ttl
        issued = await call("POST", f"{url}/v1/x509/renew", ctx, json_body=body, expect=201)
        issued = check_answer(url, issued, (new or current).public_key(), ca)
    except BaseException:
        files.abort()
        raise
    # The leaf alone if that is what it held; with the CA certificates it needs to be
    # accepted if it held any (after a root rotation: one more, for a while).
    leaf = issued["certificate"] + (intermediates(issued["chain"]) if len(held) > 1 else "")
    data: dict[Path, bytes | str] = {cert.parent / "chain.pem": issued["chain"]}
    if combined:
        data[cert] = leaf + (key_pem(new).decode() if new is not None else _key_block(key))
    else:
        data[cert] = leaf
        if new is not None:
            data[key] = key_pem(new)
    _commit_or_keep(files, data, cert, key, issued, current.serial_number, targets)
    return issued


def renewal_targets(cert: Path, key: Path, rekey: bool) -> dict[Path, tuple[int, bool]]:
    """The files a renewal replaces, each with the mode of a new one and whether it is
    private: the certificate (with the key, when one file holds both), chain.pem beside
    it, and with `rekey` the key."""
    combined = cert.resolve() == key.resolve()
    targets: dict[Path, tuple[int, bool]] = {}
    if rekey and not combined:
        targets[key] = (0o600, True)
    targets[cert] = (0o600, True) if combined else (0o644, False)
    targets[cert.parent / "chain.pem"] = (0o644, False)
    return targets


def check_writable(cert: Path, key: Path, rekey: bool) -> None:
    """What a renewal would find when it replaces its files, found now: `renew --daemon`
    asks at its start (a client trial's, on a read-only mount, scheduled its renewal
    15 h ahead and failed then)."""
    Staged(renewal_targets(cert, key, rekey)).prepare().abort()


# Answers of the CA that could not be installed (a file that cannot be replaced), by
# (cert, key): `renew --daemon` retries installing them, not the CA (each ask would be
# another signature). (issued, serial of the certificate it replaces, files, targets.)
_UNINSTALLED: dict[tuple[Path, Path], tuple[dict[str, Any], int, dict[Path, bytes | str],
                                            dict[Path, tuple[int, bool]]]] = {}


def _commit_or_keep(files: Staged, data: dict[Path, bytes | str], cert: Path, key: Path,
                    issued: dict[str, Any], held_serial: int,
                    targets: dict[Path, tuple[int, bool]]) -> None:
    try:
        files.commit(data)
    except ClientError:
        _UNINSTALLED[cert, key] = (issued, held_serial, data, targets)
        raise


def mend_alone(cert: Path, key: Path, warn: Any = None) -> None:
    """`mend`, under the directory's renewal lock (`renew --daemon` at start): a
    renewal under way in another process is not undone half-way; it mends its own."""
    try:
        with _renewing(cert):
            mend(cert, key, warn)
    except ClientError as exc:
        if warn is not None:
            warn(str(exc))


def mend(cert: Path, key: Path, warn: Any = None) -> None:
    """Put back a renewal of `cert` that died between replacing its files (the next
    renewal does it, under the lock it holds)."""
    if restore_interrupted([key, cert, cert.parent / "chain.pem"],
                           lambda: check_credential(cert, key)) and warn is not None:
        warn(f"a renewal of {cert} was interrupted between replacing its files; they are "
             "back as they were before it")


def _key_block(path: Path) -> str:
    """The PEM private key in a file that holds certificates too."""
    text = _read(path, "--key").decode()
    start = text.index("-----BEGIN ")
    while "PRIVATE KEY-----" not in text[start:text.index("\n", start)]:
        start = text.index("-----BEGIN ", start + 1)
    end = text.index("-----END ", start)
    return text[start:text.index("\n", end) + 1]


def serial_of(cert: Path) -> str:
    return format(load_certificates(cert, "--cert")[0].serial_number, "x")


async def get_bytes(session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> bytes:
    """GET `url` and return the body exactly as sent.

    Audit log lines must reach the verifier unchanged, tampered or not, so nothing is
    decoded. The caller owns `session`, so paging through a long log reuses one TLS
    connection.
    """
    return (await _request(session, "GET", url, ctx))[1]
