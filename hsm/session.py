"""The PKCS#11 session of a process: library, token, login, key handles, signing.

python-pkcs11 calls C_Initialize(NULL), which tells SoftHSM that no two threads
will call it at once; SoftHSM then runs without locks and crashes if they do. So an
`HSM` belongs to one thread: the first thread that makes a PKCS#11 call through it
owns it, and any other thread is refused. That thread is the process's one HSM
thread (in hsmca, the signing thread of ca/issuance/pipeline.py); scale with
processes, never with threads.

It is a plain executor. It signs bytes with a named key and a signature scheme,
checks every signature against the key's public half before it returns it, and
signs only for an intent its operation log reports durable, once per intent. It
knows no certificate, writes no inventory and calls back into nothing: what it
has to report (open, login, errors, reconnects, key generation) it records in its
operation log, or leaves in `take_events()` for the thread's owner to write in
front of its next group of intents, so that the log has them in the order they
happened relative to the signatures.

When the session breaks it fails calls fast with HSMUnavailable, re-initialises,
re-opens and re-logs-in with back-off (`retry_in`, `tick`), and reports each step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from pkcs11 import MGF, Mechanism

from hsm import keys
from hsm.config import HSMConfig
from hsm.errors import (
    HSMError,
    HSMUnavailable,
    KeyNotFound,
    PinRefused,
    SignatureCheckFailed,
)
from hsm.oplog import OpLog
from hsm.uri import key_uri

# Errors after which the session (or the whole library state) cannot be trusted.
SESSION_ERRORS: tuple[type[pkcs11.PKCS11Error], ...] = (
    pkcs11.exceptions.SessionHandleInvalid, pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.TokenNotPresent, pkcs11.exceptions.TokenNotRecognised,
    pkcs11.exceptions.DeviceRemoved, pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.DeviceMemory, pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.KeyHandleInvalid, pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.GeneralError,
)
MAX_BACKOFF_S = 5.0
# A session that breaks again this soon after a reconnect is flapping: its back-off
# keeps growing, and a signature does not re-open it at once.
FLAP_WINDOW_S = 10.0
TOKEN_LOOKUP_RETRIES_S = (0.05, 0.2, 0.5)
LOGIN_TURN_WAIT_S = 30.0  # how long a login waits for another process's (login_gate)

Event = tuple[str, dict[str, Any]]
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


@contextlib.contextmanager
def _login_turn(gate: str | None, source: str) -> Iterator[Callable[[bool], None] | None]:
    """One login at a time among the processes sharing `gate`, and what they learned of
    the PIN file: yields None if the file as it is now was refused before (by any of
    them), else a function to call with whether the token refused it. After a PIN
    change, every process offered the old PIN once: as many wrong tries as processes,
    and many HSMs lock the user PIN after three (a fault trial). Only the file's inode
    and times are written, never anything of the PIN (not even its length)."""
    if gate is None or not source.startswith("file:"):
        yield lambda _refused: None
        return
    try:
        fd = os.open(gate, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # its directory gone: each process remembers alone, as before
        yield lambda _refused: None
        return
    try:
        # Held through the login: the others wait for its verdict. Bounded: a login hung
        # in a network HSM must not stop every other process's for good.
        deadline = time.monotonic() + LOGIN_TURN_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield lambda _refused: None  # as without the gate
                    return
                time.sleep(0.05)  # a back-off on the HSM thread, not synchronisation
        try:  # the PIN file as it is now, under the lock: read_pin reads it next
            st = os.stat(source[5:])
        except OSError:
            yield lambda _refused: None  # read_pin names the missing file
            return
        mark = f"{st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"
        if os.pread(fd, 200, 0).decode(errors="replace").strip() == mark:
            yield None
            return

        def verdict(refused: bool) -> None:
            os.ftruncate(fd, 0)
            if refused:
                os.pwrite(fd, mark.encode() + b"\n", 0)
        yield verdict
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Scheme:
    """How a message is signed: `ecdsa` (hashed here, CKM_ECDSA over the digest, the
    result DER-encoded), `eddsa` (CKM_EDDSA over the message), `rsa-pkcs1` or
    `rsa-pss` (the HSM hashes: CKM_SHAxxx_RSA_PKCS[_PSS], PSS salt = digest length)."""

    kind: str
    hash: str | None = None  # sha256 | sha384 | sha512; None for EdDSA

    @property
    def mechanism_name(self) -> str:
        if self.kind == "ecdsa":
            return "CKM_ECDSA"
        if self.kind == "eddsa":
            return "CKM_EDDSA"
        suffix = "_PSS" if self.kind == "rsa-pss" else ""
        return f"CKM_{(self.hash or 'sha256').upper()}_RSA_PKCS{suffix}"


@dataclass(frozen=True)
class KeyInfo:
    """A key in the token, as the rest of the process may know it: never the handle."""

    label: str
    uri: str
    key_type: str  # ec-p256 | ec-p384 | ed25519 | rsa-NNNN
    public_key: PublicKey

    @property
    def spki_sha256(self) -> str:
        der = self.public_key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()


_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
_RSA_PKCS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
             "sha512": Mechanism.SHA512_RSA_PKCS}
_RSA_PSS = {"sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256),
            "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384),
            "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512)}
_PREHASHED = {name: ec.ECDSA(utils.Prehashed(h)) for name, h in _HASHES.items()}


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _may_be_a_pin(name: str) -> bool:
    """Whether a name that names nothing could be the PIN itself, pasted after `env:`
    or `file:` (a config trial saw it repeated in the start's error, which systemd keeps
    in the journal): any but an upper-case variable name, or a file name with a dot
    or without a digit (`pin`, `hsm.pin`)."""
    return not (_ENV_NAME.fullmatch(name) or "." in name or not any(c.isdigit() for c in name))


def read_pin(source: str) -> str:
    """Read the user PIN; errors name the source, never the PIN."""
    if source.startswith("env:"):
        name = source[4:]
        pin = os.environ.get(name)
        if not pin:
            said = ("env:… (a name that is no upper-case variable name, not repeated in "
                    "case it is the PIN itself)" if not _ENV_NAME.fullmatch(name) else source)
            raise HSMError(f"PIN source {said}: that environment variable is not set")
        return pin
    path = source[5:] if source.startswith("file:") else source
    try:
        with open(path, encoding="utf-8") as fh:
            pin = fh.read().strip()
    except OSError as exc:
        said = path
        if isinstance(exc, FileNotFoundError) and _may_be_a_pin(os.path.basename(path)):
            said = (f"{os.path.join(os.path.dirname(path), '…')} (its name is not repeated, "
                    "in case it is the PIN itself)")
        raise HSMError(f"cannot read the PIN file {said}: {exc.strerror}") from None
    if not pin:
        raise HSMError(f"the PIN file {path} is empty")
    return pin


class HSM:
    """One token session, used from one thread (see the module docstring)."""

    def __init__(self, config: HSMConfig, oplog: OpLog) -> None:
        if oplog is None:
            raise TypeError("an HSM needs an operation log: every HSM use is audited")
        self.config = config
        self._oplog = oplog
        self._owner: threading.Thread | None = None
        self._lib: Any = None
        self._session: Any = None
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, KeyInfo] = {}
        # The keys the CA uses now (its keyring sets them): one the token does not show
        # is its loss (the HSM unavailable), not a caller's mistake; another missing is
        # KeyNotFound (destroyed by another process, say). Replaced whole, never changed
        # in place, so the owner thread reads it without a lock.
        self.expected: frozenset[str] = frozenset()
        self._events: list[Event] = []
        self._pid = os.getpid()
        self._refused_pin: bytes | None = None  # SHA-256 of the PIN the token refused
        # The last intent signed for, and whether it got its signature: each durable
        # intent allows one signature (tried again only if its first attempt failed).
        self._last_intent = -1
        self._last_signed = False
        self.broken: str | None = None  # why the session is unusable, if it is
        self._attempt = 0
        self._next_retry = 0.0
        self._last_reconnect = float("-inf")
        self.flap_window_s = FLAP_WINDOW_S
        self.reconnects = 0
        self.sign_calls = 0  # every C_Sign made, whatever its result
        self.on_sign_call: Callable[[], None] | None = None  # called after each count
        self.signatures = 0  # signatures that verified and were returned

    # ---- state, readable from any thread --------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.broken is None and self._session is not None

    @property
    def flapping(self) -> bool:
        return time.monotonic() - self._last_reconnect < self.flap_window_s

    def since_reconnect(self) -> float:
        """Seconds since the last reconnect that worked (inf: none)."""
        return time.monotonic() - self._last_reconnect

    def retry_in(self) -> float | None:
        """Seconds until the next reconnect attempt is due (None: the session works)."""
        if self.broken is None:
            return None
        return max(0.0, self._next_retry - time.monotonic())

    def take_events(self) -> list[Event]:
        """HSM events not yet written (owner thread): the owner writes them in front of
        its next group of intents, or records them at the end of its round."""
        events, self._events = self._events, []
        return events

    # ---- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Load the module, find the token, open a session and log in."""
        self._claim()
        self._open(reconnect=False)

    def close(self) -> None:
        self._claim()
        self._close_session(quiet=False)

    def tick(self) -> None:
        """Try to reconnect if the session is broken and the back-off has passed."""
        self._claim()
        if self.broken is not None and time.monotonic() >= self._next_retry:
            self._reconnect()

    # ---- keys --------------------------------------------------------------------------

    def key(self, label: str) -> KeyInfo:
        """The key `label`, checked non-exportable (KeyExportable otherwise)."""
        self._claim()
        self._ready()
        found = self._keys.get(label)
        if found is not None and label in self._handles:
            return found
        try:
            return self._find(label)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None
        except KeyNotFound as exc:
            # SoftHSM finds nothing, rather than failing, while its token directory is
            # away, and a session that looked then goes on finding nothing once it is
            # back (a key made by another process meanwhile: a rotation). Ask a fresh
            # session before calling the key missing, unless one was opened just now.
            if self.flapping:
                raise self._missing(label, exc) from None
            self._mark_broken(exc)
            self._reconnect()
            if self.broken is not None:
                raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None
        try:
            return self._find(label)  # still missing on a fresh session: it is
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None
        except KeyNotFound as exc:
            raise self._missing(label, exc) from None

    def remnants(self, label: str) -> tuple[bool, bool]:
        """Whether the token holds the private and the public key `label`, asked of a
        fresh session (a destroy must not take SoftHSM's "nothing" from a session that
        looked while the token was away for "gone")."""
        self._claim()
        self._ready()
        self._reconnect()  # recorded as hsm.reconnect, with its result
        if self._session is None:  # it failed: broken, retried as its back-off allows
            self.broken = self.broken or "reconnect failed"
            raise HSMUnavailable(f"HSM unavailable: {self.broken}")
        try:
            return (keys.find_private(self._session, label, required=False) is not None,
                    bool(keys.find_objects(self._session, label, public=True)))
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None

    def generate(self, label: str, key_type: str, intent_seq: int, op_id: str) -> KeyInfo:
        """Generate a non-exportable key pair in the token, for the durable hsm.keygen
        intent line `intent_seq` (a key is announced like a signature: no key is made
        that the log does not show); its outcome is logged as hsm.keygen with `op_id`."""
        self._claim()
        self._check_intent(intent_seq)
        self._ready()
        uri = str(key_uri(self.config.token, label))
        paired = {"phase": "outcome", "op_id": op_id}
        try:
            keys.generate(self._session, label, key_type)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None
        except pkcs11.PKCS11Error as exc:
            self._record("hsm.keygen", **paired, key=uri, type=key_type,
                         result=type(exc).__name__)
            raise HSMError(f"generating {key_type} key {label!r} failed: "
                           f"{type(exc).__name__}") from None
        attrs = keys.check_non_exportable(keys.find_private(self._session, label), label)
        info = self._find(label)
        self._record("hsm.keygen", **paired, key=uri, type=key_type, result="ok",
                     attributes=attrs, public_key_sha256=info.spki_sha256)
        return info

    def destroy(self, label: str, intent_seq: int) -> None:
        """C_DestroyObject on the key pair `label`, for the durable intent line
        `intent_seq` (a destruction is recorded like a signature)."""
        self._claim()
        self._check_intent(intent_seq)
        self._ready()
        try:
            # Either half may be gone already (a destroy cut short between the two).
            found = [*filter(None, [keys.find_private(self._session, label, required=False)]),
                     *keys.find_objects(self._session, label, public=True)]
            if not found:
                raise KeyNotFound(f"no key labelled {label!r} in the token")
            self._last_signed = True  # the intent is spent whatever happens next
            for obj in found:
                obj.destroy()
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None
        self._handles.pop(label, None)
        self._keys.pop(label, None)

    def key_labels(self, public: bool = False) -> list[str]:
        """The labels of the token's private (or public) keys (for the start's check
        that the CA knows every key in it)."""
        self._claim()
        self._ready()
        try:
            return keys.key_labels(self._session, public)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None

    def probe(self) -> None:
        """A cheap call that fails if the token or session went away (reading an
        attribute of a key handle: SoftHSM answers ObjectHandleInvalid once its token
        directory is gone, while signing state may still look fine)."""
        self._claim()
        self._ready()
        try:
            # A key the CA uses, not found at the last reconnect: still missing, the HSM
            # is unavailable for it (its signatures are refused as such).
            for label in sorted(self.expected - self._handles.keys()):
                try:
                    self._find(label)
                except KeyNotFound as exc:
                    raise self._missing(label, exc) from None
            for handle in self._handles.values():
                handle[pkcs11.Attribute.LABEL]
                return
            self._token(self.config.token)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None

    def session_call(self, fn: Any) -> Any:
        """`fn(session)` for the test suite and key ceremonies: raw PKCS#11 access on
        the owner thread (session errors break the session like any other call)."""
        self._claim()
        self._ready()
        try:
            return fn(self._session)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {self.broken}") from None

    # ---- signing ---------------------------------------------------------------------------

    def sign(self, label: str, scheme: Scheme, message: bytes, intent_seq: int) -> bytes:
        """Sign `message` with key `label` for the durable intent line `intent_seq`,
        check the signature with the public key, and return it.

        Raises HSMError if the intent is not durable or was signed for already,
        SignatureCheckFailed if the HSM's signature does not verify, HSMUnavailable
        if the session is broken (a stale session is re-opened once, at once, unless
        it is flapping)."""
        self._claim()
        self._check_intent(intent_seq)
        self._ready()
        try:
            try:
                raw = self._sign(label, scheme, message)
            except SESSION_ERRORS as exc:
                # A session that went stale (the token came back, the HSM restarted) is
                # found out here: re-open it at once and sign again, so this request
                # does not fail for nothing; unless it is flapping, when it backs off.
                retry = not self.flapping
                self._mark_broken(exc)
                if retry:
                    self._reconnect()
                self._ready()
                raw = self._sign(label, scheme, message)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            raise HSMUnavailable(f"HSM unavailable: {type(exc).__name__}") from None
        except KeyNotFound as exc:
            raise self._missing(label, exc) from None
        self._last_signed = True
        info = self._keys[label]
        try:
            _verify(info.public_key, scheme, message, raw)
        except InvalidSignature:
            raise SignatureCheckFailed(f"the HSM returned a signature that does not verify "
                                       f"with the public key of {info.uri}") from None
        self.signatures += 1
        return raw

    def _check_intent(self, seq: int) -> None:
        if not 0 <= seq < self._oplog.durable_size():
            raise HSMError(f"refusing to sign: intent line {seq} is not durable in the "
                           "operation log")
        if seq < self._last_intent or (seq == self._last_intent and self._last_signed):
            raise HSMError(f"refusing to sign: intent line {seq} was signed for already "
                           "(one signature per intent)")
        if seq != self._last_intent:
            self._last_intent, self._last_signed = seq, False

    def _sign(self, label: str, scheme: Scheme, message: bytes) -> bytes:
        handle = self._handles.get(label)
        if handle is None:
            self._find(label)
            handle = self._handles[label]
        self.sign_calls += 1
        if self.on_sign_call is not None:
            self.on_sign_call()
        if scheme.kind == "ecdsa":
            h = hashes.Hash(_HASHES[scheme.hash or "sha256"])
            h.update(message)
            raw = handle.sign(h.finalize(), mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                              int.from_bytes(raw[half:], "big"))
        if scheme.kind == "eddsa":
            return bytes(handle.sign(message, mechanism=Mechanism.EDDSA))
        name = scheme.hash or "sha256"
        if scheme.kind == "rsa-pkcs1":
            return bytes(handle.sign(message, mechanism=_RSA_PKCS[name]))
        if scheme.kind == "rsa-pss":
            mech, hash_mech, mgf = _RSA_PSS[name]
            return bytes(handle.sign(message, mechanism=mech, mechanism_param=(
                hash_mech, mgf, _HASHES[name].digest_size)))
        raise HSMError(f"unknown signature scheme {scheme.kind!r}")

    # ---- internals (owner thread) ------------------------------------------------------

    def _claim(self) -> None:
        current = threading.current_thread()
        if self._owner is None:
            self._owner = current
        elif self._owner is not current:
            raise HSMError(f"PKCS#11 calls run on one thread per process ({self._owner.name}); "
                           f"refused on {current.name}")

    def _ready(self) -> None:
        """Refuse at once (HSMUnavailable) while the session is broken, after a
        reconnect attempt if one is due."""
        if self.broken is not None and time.monotonic() >= self._next_retry:
            self._reconnect()
        if self.broken is not None:
            raise HSMUnavailable(f"HSM unavailable: {self.broken}")

    def _record(self, event: str, **fields: Any) -> None:
        # The pid tells which process had the trouble (each worker has its own session).
        self._events.append((event, {"token": self.config.token, "pid": self._pid, **fields}))

    def _missing(self, label: str, exc: KeyNotFound) -> HSMError:
        """What to raise for a key the token does not show, even on a fresh session.
        One the CA uses (`expected`; SoftHSM: its object files moved away or removed) is
        the HSM unavailable for it, not the request wrong: a chaos trial got 500s, no
        recovery until a restart once the files were back, and an intent and an outcome
        a second for the refresher's retries. The session is then broken until a
        reconnect, with its back-off, finds the key again (SoftHSM reads its objects anew
        at C_Initialize). Another key is simply missing (KeyNotFound)."""
        if label not in self.expected:
            return exc
        self._mark_broken(exc)
        self.broken = f"the token no longer holds the key {label!r}"
        self._handles.pop(label, None)
        return HSMUnavailable(f"HSM unavailable: {self.broken}")

    def _mark_broken(self, exc: BaseException) -> None:
        self.broken = type(exc).__name__
        if self.flapping:  # broke again soon after a reconnect: keep backing off
            self._next_retry = time.monotonic() + min(MAX_BACKOFF_S, 0.1 * 2 ** self._attempt)
        else:
            self._attempt = 0
            self._next_retry = time.monotonic()  # the first retry is immediate
        self._record("hsm.error", error=self.broken, action="reconnecting")

    def _reconnect(self) -> None:
        self._attempt += 1
        self._close_session(quiet=True)
        try:
            self._lib.reinitialize()
            self._open(reconnect=True)
        except Exception as exc:
            delay = min(MAX_BACKOFF_S, 0.1 * 2 ** (self._attempt - 1))
            self._next_retry = time.monotonic() + delay
            self._record("hsm.reconnect", attempt=self._attempt, result=type(exc).__name__,
                         retry_in_s=delay)
            # Why it cannot be re-opened now, not why it broke: /health and the operator
            # log said ObjectHandleInvalid while the PIN file was missing (an operator's
            # trial). HSMError's texts name sources, never a PIN.
            self.broken = str(exc) if isinstance(exc, HSMError) and str(exc) \
                else type(exc).__name__
            if not isinstance(exc, HSMError):
                # SoftHSM says only GeneralError when it cannot read its token directory
                # (gone, or unreadable to this user: an SRE trial): what its config tells.
                from hsm.softhsm import why_not_loaded
                if why := why_not_loaded(self.config.module):
                    self.broken += f": SoftHSM cannot start: {why}"
            return
        self._record("hsm.reconnect", attempt=self._attempt, result="ok")
        self._last_reconnect = time.monotonic()
        self.reconnects += 1
        self.broken = None

    def _open(self, reconnect: bool) -> None:
        cfg = self.config
        if self._lib is None:
            if not os.path.exists(cfg.module):
                raise HSMError(f"PKCS#11 module not found: {cfg.module}")
            try:
                self._lib = pkcs11.lib(cfg.module)
            except Exception as exc:
                from hsm.softhsm import why_not_loaded
                why = why_not_loaded(cfg.module) or str(exc) or type(exc).__name__
                raise HSMError(f"cannot load PKCS#11 module {cfg.module}: {why}") from None
        try:
            # At a reconnect the back-off does the looking again.
            token = self._find_token(retries=() if reconnect else TOKEN_LOOKUP_RETRIES_S)
        except pkcs11.exceptions.MultipleTokensReturned:
            raise HSMError(f"more than one token is labelled {cfg.token!r} in {cfg.module}; "
                           "token labels must be unique") from None
        refused_before = PinRefused(
            f"wrong PIN for token {cfg.token!r} (PIN from {describe_source(cfg.pin_source)}), "
            "refused before: not tried again until the PIN there changes"
            + (f" (recorded in {cfg.login_gate}; if the token's PIN was set to match the "
               "file instead, touch the file or delete that one)" if cfg.login_gate else ""))
        with _login_turn(cfg.login_gate, cfg.pin_source) as verdict:
            if verdict is None:  # another process of this daemon was refused it
                raise refused_before
            pin = read_pin(cfg.pin_source)
            # A PIN the token refused is not offered again (a reconnect's back-off would
            # offer it every few seconds, and many HSMs lock the PIN after a few wrong
            # tries): only its digest is kept, in memory, to know it again.
            tried = hashlib.sha256(pin.encode()).digest()
            if tried == self._refused_pin:
                del pin
                raise refused_before
            self._record("hsm.open", module=cfg.module, reconnect=reconnect)
            try:
                session = self._login(token, pin, retries=() if reconnect else
                                      TOKEN_LOOKUP_RETRIES_S)
            except pkcs11.exceptions.PinIncorrect:
                self._record("hsm.login", result="PinIncorrect")
                self._refused_pin = tried
                verdict(True)
                raise PinRefused(f"wrong PIN for token {cfg.token!r} (PIN from "
                                 f"{describe_source(cfg.pin_source)})") from None
            except pkcs11.exceptions.PinLocked:
                # Not remembered: offering a locked PIN counts nothing, and the officer
                # may unlock the token keeping the same PIN.
                self._record("hsm.login", result="PinLocked")
                raise PinRefused(f"the user PIN of token {cfg.token!r} is locked; the "
                                 "security officer must reset it") from None
            finally:
                del pin
            verdict(False)
        self._session = session
        self._record("hsm.login", result="ok", user="CKU_USER")
        # Handles belong to the session: find them again and make sure the token still
        # holds the same keys, so a swapped token is never used silently.
        old = dict(self._keys)
        self._handles.clear()
        for label, info in old.items():
            try:
                found = self._find(label)
            except KeyNotFound:
                # Destroyed meanwhile (`hsmca key destroy`, run by another process):
                # forgotten here too; asked for again, it is missing, and says so.
                self._keys.pop(label, None)
                self._record("hsm.error", error="KeyNotFound", key=info.uri, action="forgotten")
                continue
            if found.public_key != info.public_key:
                raise HSMError(f"key {label!r} in the token changed since start-up")

    def _login(self, token: Any, pin: str, retries: tuple[float, ...]) -> Any:
        """A logged-in session. SoftHSM answers GeneralError here too while another
        process rewrites the token's files (seen at a start right after a kill -9 under
        load), so at start the login is tried again a few times, as the lookup is."""
        for delay in retries:
            try:
                return token.open(rw=True, user_pin=pin)
            except pkcs11.exceptions.GeneralError:
                time.sleep(delay)  # a back-off before trying again, on the HSM thread
        try:
            return token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.GeneralError:
            if not retries:
                raise  # a reconnect: its back-off tries again, and records this as it is
            raise HSMError(f"the token {self.config.token!r} in {self.config.module} cannot "
                           "be opened (GeneralError)") from None

    def _find_token(self, retries: tuple[float, ...]) -> Any:
        """The configured token. SoftHSM leaves out of its slot list, or answers
        GeneralError for, a token whose files another process is rewriting at that
        moment (seen when several workers start at once while the primary signs), so
        at start a missing token is looked for again, a few times, before it is
        reported missing."""
        label = self.config.token
        for delay in (*retries, None):
            try:
                return self._token(label)
            except (pkcs11.exceptions.NoSuchToken, pkcs11.exceptions.GeneralError) as exc:
                if delay is None:
                    if isinstance(exc, pkcs11.exceptions.GeneralError):
                        raise HSMError(f"the token {label!r} in {self.config.module} cannot "
                                       "be read (GeneralError)") from None
                    break
                time.sleep(delay)  # a back-off before looking again, on the HSM thread
                self._lib.reinitialize()
        # An empty label is a free slot SoftHSM keeps for the next token: not a token.
        labels = sorted({t.label for t in self._tokens()[0]} - {""})
        from hsm.softhsm import config_in_use, why_not_loaded
        conf = config_in_use(self.config.module)
        # A token directory this process cannot read shows no token at all: said so (an
        # SRE trial's chmod 000 read as a token that is not there).
        why = why_not_loaded(self.config.module) if not labels else None
        raise HSMError(f"no token labelled {label!r} in {self.config.module} (tokens present: "
                       f"{', '.join(repr(lbl) for lbl in labels) or 'none'}"
                       f"{f'; SoftHSM reads {conf}' if conf else ''}"
                       f"{f': {why}' if why else ''})") from None

    def _tokens(self) -> tuple[list[Any], int]:
        """The tokens present that can be read, and how many slots could not be.
        SoftHSM answers GeneralError for the slot of a token whose directory another
        process deleted (softhsm2-util --delete-token beside a running hsmca) until the
        library is initialised again, and python-pkcs11's get_token(token_label=...)
        then fails for every label, this one's too: such a slot is left out."""
        tokens, unreadable = [], 0
        for slot in self._lib.get_slots(token_present=True):
            try:
                tokens.append(slot.get_token())
            except (pkcs11.exceptions.TokenNotPresent,
                    pkcs11.exceptions.TokenNotRecognised):
                continue  # gone meanwhile, or a card that is not a token: as get_token did
            except pkcs11.exceptions.GeneralError:
                unreadable += 1
        return tokens, unreadable

    def _token(self, label: str) -> Any:
        tokens, unreadable = self._tokens()
        found = [token for token in tokens if token.label == label]
        if len(found) > 1:
            raise pkcs11.exceptions.MultipleTokensReturned
        if found:
            return found[0]
        if unreadable:  # this one may be the token being rewritten: said as before
            raise pkcs11.exceptions.GeneralError
        raise pkcs11.exceptions.NoSuchToken

    def _close_session(self, quiet: bool) -> None:
        if self._session is None:
            return
        session, self._session = self._session, None
        self._handles.clear()
        try:
            session.close()
            if not quiet:
                self._record("hsm.logout", result="ok")
        except Exception as exc:  # a broken session may not close; nothing to save
            if not quiet:
                self._record("hsm.logout", result=type(exc).__name__)

    def _find(self, label: str) -> KeyInfo:
        priv = keys.find_private(self._session, label)
        keys.check_non_exportable(priv, label)
        key_type, pub = keys.public_key_of(keys.find_public(self._session, label))
        info = KeyInfo(label, str(key_uri(self.config.token, label)), key_type, pub)
        self._handles[label] = priv
        self._keys[label] = info
        return info


def _verify(pub: PublicKey, scheme: Scheme, message: bytes, signature: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `scheme`'s over `message`."""
    name = scheme.hash or "sha256"
    if scheme.kind == "ecdsa" and isinstance(pub, ec.EllipticCurvePublicKey):
        h = hashes.Hash(_HASHES[name])
        h.update(message)
        pub.verify(signature, h.finalize(), _PREHASHED[name])
    elif scheme.kind == "eddsa" and isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, message)
    elif scheme.kind == "rsa-pkcs1" and isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, message, padding.PKCS1v15(), _HASHES[name])
    elif scheme.kind == "rsa-pss" and isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, message, padding.PSS(padding.MGF1(_HASHES[name]),
                                                   _HASHES[name].digest_size), _HASHES[name])
    else:
        raise InvalidSignature


def describe_source(source: str) -> str:
    """Where a PIN comes from, for messages (never the PIN)."""
    return f"environment variable {source[4:]}" if source.startswith("env:") else (
        f"file {source.removeprefix('file:')}")
