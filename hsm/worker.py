"""The one thread that talks to the PKCS#11 library.

python-pkcs11 calls C_Initialize(NULL), which tells SoftHSM that no two threads
will call it at once; SoftHSM then runs without locks and crashes if they do. So
every PKCS#11 call of the process runs on this worker's thread, and the event loop
awaits it (`run`, `sign`). Scale with processes, never with threads.

The worker owns the library, the token, one logged-in session and the key handles
(found once: C_FindObjects is slow with many objects). When the session breaks it
fails calls fast with HSMUnavailable, re-initialises, re-opens and re-logs-in with
backoff, and reports every step to the operation log it was built with.

Signatures are done in groups, whole, on this thread: the intents of every request
that arrived together are made durable in one group commit, then signed and checked,
then their outcomes made durable in one more, and the results handed back to the
event loop in one wake-up. On a VM a thread wake-up costs tens of microseconds of
CPU; passing each signature through the loop between those steps cost about eight
of them per certificate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Mechanism

from hsm import keys
from hsm.completion import STOP, Batch, Coalescer, Sink, async_sink, claim, drain_queue, stop_thread
from hsm.errors import HSMError, HSMUnavailable, SignatureCheckFailed
from hsm.ids import IdSource
from hsm.oplog import OpLog
from hsm.signers import (
    HSMEd25519Key,
    HSMEllipticCurveKey,
    HSMKey,
    HSMKeyMixin,
    HSMRSAKey,
    Signature,
)
from hsm.uri import key_uri

T = TypeVar("T")

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


@dataclass(frozen=True)
class HSMConfig:
    module: str
    token: str
    pin_source: str  # "file:/path", "env:NAME", or a plain file path


def read_pin(source: str) -> str:
    """Read the user PIN; errors name the source, never the PIN."""
    if source.startswith("env:"):
        name = source[4:]
        pin = os.environ.get(name)
        if not pin:
            raise HSMError(f"PIN source {source}: environment variable {name} is not set")
        return pin
    path = source[5:] if source.startswith("file:") else source
    try:
        with open(path, encoding="utf-8") as fh:
            pin = fh.read().strip()
    except OSError as exc:
        raise HSMError(f"cannot read the PIN file {path}: {exc.strerror}") from None
    if not pin:
        raise HSMError(f"the PIN file {path} is empty")
    return pin


class HSMWorker:
    """One thread, one session; `await run(fn)` executes `fn(session)` on it."""

    def __init__(self, config: HSMConfig, oplog: OpLog, *, actor: str = "local") -> None:
        if oplog is None:
            raise TypeError("an HSMWorker needs an operation log: every HSM use is audited")
        self.config = config
        self._oplog = oplog
        self._actor = actor
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._thread = threading.Thread(target=self._loop, name="hsm", daemon=True)
        self._lib: Any = None
        self._session: Any = None
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, HSMKey] = {}
        self._capture: list[Signature] | None = None
        self._broken: str | None = None
        self._attempt = 0
        self._next_retry = 0.0
        self._last_reconnect = float("-inf")
        self.flap_window_s = FLAP_WINDOW_S
        # HSM events made on this thread, written in front of its next group commit
        # (or on their own at the end of the round), so the log has them in the order
        # they happened relative to the signatures.
        self._pending_events: list[tuple[str, dict[str, Any]]] = []
        self.reconnects = 0
        self.sign_count = 0
        self._op_ids = IdSource()
        self._pid = os.getpid()
        # Called on the HSM thread after each call with its duration in seconds.
        self.on_call: Callable[[float], None] | None = None
        # Called on the HSM thread after each audited signature: (purpose, result).
        self.on_sign: Callable[[str, str], None] | None = None
        # Called on the HSM thread when the session breaks (False) or is back (True).
        self.on_health: Callable[[bool], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread, open the session and log in; raise HSMError if that fails."""
        self._thread.start()
        try:
            self._submit(self._open_session).result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop_thread(self._thread, self._queue)

    @property
    def healthy(self) -> bool:
        return self._broken is None and self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        return self._broken

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _event(self, event: str, **fields: Any) -> None:
        """Record a non-signing HSM event; ordering is kept, durability is not awaited."""
        # The pid tells which process had the trouble (each worker has its own session).
        line = (event, {"token": self.config.token, "pid": self._pid, **fields})
        if threading.current_thread() is self._thread:
            self._pending_events.append(line)
            return
        self._record_events([line])

    def _record_events(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        for event, fields in lines:
            fut = self._oplog.record(event, fields)
            fut.add_done_callback(lambda f: f.exception())  # never leave it unobserved

    def _flush_events(self) -> None:
        if self._pending_events:
            lines, self._pending_events = self._pending_events, []
            self._record_events(lines)

    def _append_durable(self, entries: list[tuple[str, Mapping[str, Any]]]
                        ) -> list[cf.Future[int]]:
        """The oplog's group commit, with this thread's pending events in front."""
        events, self._pending_events = self._pending_events, []
        written = self._oplog.append_durable([*events, *entries])
        return written[len(events):]

    # ---- thread ------------------------------------------------------------------------

    def _submit(self, fn: Callable[[Any], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        self._queue.put((fn, fut))
        return fut

    def _loop(self) -> None:
        batch = Batch()
        while True:
            timeout = None
            if self._broken is not None:
                timeout = max(0.0, self._next_retry - time.monotonic())
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._reconnect()
                self._flush_events()
                continue
            # Everything queued meanwhile runs now and the results go out together;
            # signatures next to each other in the queue are signed as one group.
            items = drain_queue(self._queue, first)
            group: list[_SignOp] = []
            for item in items:
                if isinstance(item, _SignOp):
                    group.append(item)
                    continue
                if group:
                    self._sign_group(group, batch)
                    group = []
                if item is STOP:
                    batch.flush()
                    self._close_session()
                    self._flush_events()
                    return
                self._run_one(*item, batch)
            if group:
                self._sign_group(group, batch)
            self._flush_events()
            batch.flush()

    def _run_one(self, fn: Callable[[Any], Any], sink: Sink, batch: Batch) -> None:
        if not claim(sink):
            return
        if not self._session_ready():
            batch.fail(sink, HSMUnavailable(f"HSM unavailable: {self._broken}"))
            return
        started = time.perf_counter()
        try:
            result = fn(self._session)
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            batch.fail(sink, HSMUnavailable(f"HSM unavailable: {type(exc).__name__}"))
            return
        except BaseException as exc:
            batch.fail(sink, exc)
            return
        if self.on_call is not None:
            self.on_call(time.perf_counter() - started)
        batch.ok(sink, result)

    def _session_ready(self) -> bool:
        """Whether the session works, after a reconnect attempt if one is due."""
        if self._broken is not None and time.monotonic() >= self._next_retry:
            self._reconnect()
        return self._broken is None

    def _mark_broken(self, exc: BaseException) -> None:
        self._broken = type(exc).__name__
        if self.on_health is not None:
            self.on_health(False)
        if self.flapping:  # broke again soon after a reconnect: keep backing off
            self._next_retry = time.monotonic() + min(MAX_BACKOFF_S,
                                                      0.1 * 2 ** self._attempt)
        else:
            self._attempt = 0
            self._next_retry = time.monotonic()  # the first retry is immediate
        self._event("hsm.error", error=self._broken, action="reconnecting")

    @property
    def flapping(self) -> bool:
        return time.monotonic() - self._last_reconnect < self.flap_window_s

    def _reconnect(self) -> None:
        self._attempt += 1
        self._close_session(quiet=True)
        try:
            self._lib.reinitialize()
            self._open_session(None, reconnect=True)
        except Exception as exc:
            delay = min(MAX_BACKOFF_S, 0.1 * 2 ** (self._attempt - 1))
            self._next_retry = time.monotonic() + delay
            self._event("hsm.reconnect", attempt=self._attempt, result=type(exc).__name__,
                        retry_in_s=delay)
            return
        self._event("hsm.reconnect", attempt=self._attempt, result="ok")
        self._last_reconnect = time.monotonic()
        self.reconnects += 1
        self._broken = None
        if self.on_health is not None:
            self.on_health(True)

    def _open_session(self, _session: Any, reconnect: bool = False) -> None:
        """Load the module, find the token, open a session and log in (HSM thread)."""
        cfg = self.config
        if self._lib is None:
            if not os.path.exists(cfg.module):
                raise HSMError(f"PKCS#11 module not found: {cfg.module}")
            try:
                self._lib = pkcs11.lib(cfg.module)
            except Exception as exc:
                raise HSMError(f"cannot load PKCS#11 module {cfg.module}: {exc}") from None
        try:
            # At a reconnect the back-off does the looking again.
            token = self._find_token(retries=() if reconnect else TOKEN_LOOKUP_RETRIES_S)
        except pkcs11.exceptions.MultipleTokensReturned:
            raise HSMError(f"more than one token is labelled {cfg.token!r} in {cfg.module}; "
                           "token labels must be unique") from None
        self._event("hsm.open", module=cfg.module, reconnect=reconnect)
        pin = read_pin(cfg.pin_source)
        try:
            session = token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.PinIncorrect:
            self._event("hsm.login", result="PinIncorrect")
            raise HSMError(f"wrong PIN for token {cfg.token!r} (PIN from "
                           f"{_describe_source(cfg.pin_source)})") from None
        except pkcs11.exceptions.PinLocked:
            self._event("hsm.login", result="PinLocked")
            raise HSMError(f"the user PIN of token {cfg.token!r} is locked; the security "
                           "officer must reset it") from None
        finally:
            del pin
        self._session = session
        self._event("hsm.login", result="ok", user="CKU_USER")
        # Handles belong to the session: find them again and make sure the token still
        # holds the same keys, so a swapped token is never used silently.
        old = dict(self._keys)
        self._handles.clear()
        for label, key in old.items():
            fresh = self._find(label)
            if fresh.public_key() != key.public_key():
                raise HSMError(f"key {label!r} in the token changed since start-up")

    def _find_token(self, retries: tuple[float, ...]) -> Any:
        """The configured token. SoftHSM leaves out of its slot list a token whose files
        another process is rewriting at that moment (seen when several workers start
        at once), so at start a missing token is looked for again, a few times, before
        it is reported missing."""
        label = self.config.token
        for delay in (*retries, None):
            try:
                return self._lib.get_token(token_label=label)
            except pkcs11.exceptions.NoSuchToken:
                if delay is None:
                    break
                time.sleep(delay)  # a back-off before looking again, on the HSM thread
                self._lib.reinitialize()
        labels = sorted({s.get_token().label for s in self._lib.get_slots(token_present=True)})
        raise HSMError(f"no token labelled {label!r} in {self.config.module} (tokens present: "
                       f"{', '.join(repr(lbl) for lbl in labels) or 'none'})") from None

    def _close_session(self, quiet: bool = False) -> None:
        if self._session is None:
            return
        session, self._session = self._session, None
        self._handles.clear()
        try:
            session.close()
            if not quiet:
                self._event("hsm.logout", result="ok")
        except Exception as exc:  # a broken session may not close; nothing to save
            if not quiet:
                self._event("hsm.logout", result=type(exc).__name__)

    # ---- keys --------------------------------------------------------------------------

    def _find(self, label: str) -> HSMKey:
        priv = keys.find_private(self._session, label)
        keys.check_non_exportable(priv, label)
        key_type, pub = keys.public_key_of(keys.find_public(self._session, label))
        uri = str(key_uri(self.config.token, label))
        cls = {"ed25519": HSMEd25519Key}.get(key_type) or (
            HSMRSAKey if key_type.startswith("rsa") else HSMEllipticCurveKey)
        key: HSMKey = cls(self, label, uri, key_type, pub)  # type: ignore[arg-type]
        self._handles[label] = priv
        self._keys[label] = key
        return key

    async def probe(self, max_wait: float = 1.0) -> None:
        """A cheap PKCS#11 call that fails if the token or session went away (reading
        an attribute of a key handle: SoftHSM answers ObjectHandleInvalid once its
        token directory is gone, while signing state may still look fine).

        When the session is broken, it waits for the next reconnect attempt if that is
        due within `max_wait` and lets it run, so a health check sees a recovery at
        once but never makes the worker retry faster than its backoff allows."""
        await self._await_retry(max_wait)

        def check(_s: Any) -> None:
            # Reached only with a working session: a broken one is retried (when due)
            # or refused by _run_one before any job runs.
            for handle in self._handles.values():
                handle[pkcs11.Attribute.LABEL]
                return
            self._lib.get_token(token_label=self.config.token)

        await self.run(check)

    async def _await_retry(self, max_wait: float = 1.0) -> None:
        """With the session broken: refuse at once (HSMUnavailable) if the next
        reconnect attempt is more than `max_wait` away, else wait for it to be due, so
        a request sees a recovery at once without the worker retrying faster than its
        backoff allows (and an outage still answers within a second)."""
        if self._broken is None:
            return
        wait = self._next_retry - time.monotonic()
        if wait > max_wait:
            raise HSMUnavailable(f"HSM unavailable: {self._broken}")
        if wait > 0:
            await asyncio.sleep(wait)  # a back-off the worker set, not synchronisation

    async def load_key(self, label: str) -> HSMKey:
        """Find a key, check it cannot be exported, and return a signer for it."""
        return await self.run(lambda _s: self._find(label))

    async def generate_key(self, label: str, key_type: str) -> HSMKey:
        """Generate a non-exportable key pair in the token and log it as hsm.keygen."""

        def gen(session: Any) -> HSMKey:
            uri = str(key_uri(self.config.token, label))
            try:
                keys.generate(session, label, key_type)
            except pkcs11.PKCS11Error as exc:
                self._event("hsm.keygen", key=uri, type=key_type, result=type(exc).__name__)
                raise HSMError(f"generating {key_type} key {label!r} failed: "
                               f"{type(exc).__name__}") from None
            priv = keys.find_private(session, label)
            attrs = keys.check_non_exportable(priv, label)
            key = self._find(label)
            self._event("hsm.keygen", key=uri, type=key_type, result="ok", attributes=attrs,
                        public_key_sha256=_spki_sha256(key.public_key()))
            return key

        return await self.run(gen)

    # ---- calls -------------------------------------------------------------------------

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(session)` on the HSM thread and await its result."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (fn, sink))
        return await fut  # type: ignore[no-any-return]

    def sign_raw(self, key: HSMKeyMixin, message: bytes, mechanism: Mechanism, data: bytes,
                 param: Any, check: Callable[[bytes], None]) -> bytes:
        """Called by a key's sign(): only on this thread, only inside `sign()` below."""
        if threading.current_thread() is not self._thread or self._capture is None:
            raise HSMError("HSM keys sign only inside HSMWorker.sign(), after the intent "
                           "is in the audit log")
        raw = self._handles[key.label].sign(data, mechanism=mechanism, mechanism_param=param)
        if mechanism == Mechanism.ECDSA:
            half = len(raw) // 2
            raw = encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                       int.from_bytes(raw[half:], "big"))
        self._capture.append(Signature(message, raw, lambda: check(raw)))
        self.sign_count += 1
        return raw

    def _build(self, key: HSMKey, build: Callable[[HSMKey], T]) -> tuple[T, list[Signature]]:
        self._capture = []
        try:
            out = build(key)
        finally:
            sigs, self._capture = self._capture, None
        return out, sigs

    async def sign(self, key: HSMKey, build: Callable[[HSMKey], T], *, purpose: str,
                   actor: str, request_id: str | None = None,
                   details: Mapping[str, Any] | None = None, hash_name: str = "sha256",
                   describe: Callable[[T], Mapping[str, Any]] | None = None,
                   also: Callable[[T], cf.Future[Any]] | None = None) -> T:
        """The only way to sign: intent durable, then `build(key)` on the HSM thread
        (cryptography's builder calls key.sign()), then check the signature, then the
        outcome durable. Returns what `build` returned.

        `describe(result)` adds fields to the outcome line. `also(result)` runs on the
        HSM thread once the signature checks out and returns a future (e.g. the
        inventory insert); it is done, with the outcome line, before this returns.

        Raises AuditUnavailable (nothing was signed) if the intent cannot be written,
        HSMUnavailable if the session is broken.

        The whole operation runs on the HSM thread, for every signature that arrived
        together (see _sign_group), so a caller that is cancelled (client gone,
        shutdown) after its intent was written cannot leave it without an outcome.
        """
        await self._await_retry()
        intent = {"phase": "intent", "op_id": self._op_ids.next(), "key": key.uri,
                  "mechanism": key.mechanism_name(hash_name), "purpose": purpose,
                  "actor": actor, "request_id": request_id, **(details or {})}
        fut, sink = async_sink()
        self._coalescer.put(sink[0], _SignOp(key, build, intent, describe, also, sink))
        return await fut  # type: ignore[no-any-return]

    def _sign_group(self, ops: list[_SignOp], batch: Batch) -> None:
        """Sign a group of operations: one group commit for their intents, the
        signatures, one for their outcomes, results handed back together."""
        live = [op for op in ops if claim(op.sink)]  # a caller gone before anything ran
        if not live:
            return
        if not self._session_ready():
            error = HSMUnavailable(f"HSM unavailable: {self._broken}")
            for op in live:  # nothing was recorded or signed: nothing to log
                batch.fail(op.sink, error)
            return
        written = self._append_durable([("hsm.sign", op.intent) for op in live])
        ready: list[_SignOp] = []
        for op, fut in zip(live, written, strict=True):
            exc = fut.exception()
            if exc is None:
                ready.append(op)
            else:  # not on disk, so not signed (fail closed)
                batch.fail(op.sink, exc)
        if not ready:
            return
        signed = [(op, *self._sign_one(op)) for op in ready]
        # The inventory writes start together (one transaction for the group, which
        # commits while the outcomes are written), after the signing: between
        # signatures, the GIL released in C_Sign would let the store commit each alone.
        done: list[tuple[_SignOp, Any, BaseException | None, cf.Future[Any] | None]] = []
        outcomes: list[tuple[str, Mapping[str, Any]]] = []
        for op, out, error, outcome in signed:
            extra: cf.Future[Any] | None = None
            if error is None and op.also is not None:
                try:
                    extra = op.also(out)
                except Exception as exc:
                    error = exc
            done.append((op, out, error, extra))
            outcomes.append(("hsm.sign", outcome))
        written = self._append_durable(outcomes)
        for (op, out, error, extra), fut in zip(done, written, strict=True):
            if error is None:
                error = fut.exception()
            if error is None and extra is not None:
                error = extra.exception()  # waits for the inventory's commit
            if self.on_sign is not None:
                self.on_sign(op.intent["purpose"], "ok" if error is None
                             else type(error).__name__)
            if error is None:
                batch.ok(op.sink, out)
            else:
                batch.fail(op.sink, error)

    def _sign_one(self, op: _SignOp) -> tuple[Any, BaseException | None, dict[str, Any]]:
        """Build and sign one operation and check the signature: (result, error, outcome
        fields). An error here is written into the outcome line and raised to the caller;
        the result is never released."""
        outcome: dict[str, Any] = {"phase": "outcome", "op_id": op.intent["op_id"]}
        if self._broken is not None:  # an earlier signature of the group broke the session
            error: BaseException = HSMUnavailable(f"HSM unavailable: {self._broken}")
            outcome["result"] = type(error).__name__
            return None, error, outcome
        started = time.perf_counter()
        try:
            try:
                out, sigs = self._build(op.key, op.build)
            except SESSION_ERRORS as exc:
                # A session that went stale (the token came back, the HSM restarted) is
                # found out here: re-open it at once and sign again, so this request
                # does not fail for nothing; unless it is flapping, when it backs off.
                retry = not self.flapping
                self._mark_broken(exc)
                if retry:
                    self._reconnect()
                if self._broken is not None:
                    error = HSMUnavailable(f"HSM unavailable: {self._broken}")
                    outcome["result"] = type(error).__name__
                    return None, error, outcome
                started = time.perf_counter()
                out, sigs = self._build(op.key, op.build)
            if len(sigs) != 1:
                raise HSMError(f"expected one signature per operation, got {len(sigs)}")
            try:
                sigs[0].check()
            except InvalidSignature:
                raise SignatureCheckFailed(f"the HSM returned a signature that does not "
                                           f"verify with the public key of {op.key.uri}"
                                           ) from None
            outcome.update(result="ok", digest=sigs[0].digest,
                           signature_digest=sigs[0].signature_digest)
            if op.describe is not None:
                outcome.update(op.describe(out))
        except SESSION_ERRORS as exc:
            self._mark_broken(exc)
            error = HSMUnavailable(f"HSM unavailable: {type(exc).__name__}")
            outcome["result"] = type(error).__name__
            return None, error, outcome
        except Exception as exc:
            outcome["result"] = type(exc).__name__
            return None, exc, outcome
        if self.on_call is not None:
            self.on_call(time.perf_counter() - started)
        return out, None, outcome

    async def drain(self) -> None:
        """Wait for every signing operation under way (before closing at shutdown):
        the thread finishes a group before it takes the next job from its queue."""
        if not self._thread.is_alive():
            return
        try:
            await self.run(lambda _s: None)
        except HSMError:
            pass  # a broken session refuses the job only after the groups before it


@dataclass(frozen=True, slots=True)
class _SignOp:
    key: HSMKey
    build: Callable[[HSMKey], Any]
    intent: dict[str, Any]
    describe: Callable[[Any], Mapping[str, Any]] | None
    also: Callable[[Any], cf.Future[Any]] | None
    sink: Sink


def _describe_source(source: str) -> str:
    return f"environment variable {source[4:]}" if source.startswith("env:") else (
        f"file {source.removeprefix('file:')}")


def _spki_sha256(pub: Any) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()
