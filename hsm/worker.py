"""The one thread that talks to the PKCS#11 library.

python-pkcs11 calls C_Initialize(NULL), which tells SoftHSM that no two threads
will call it at once; SoftHSM then runs without locks and crashes if they do. So
every PKCS#11 call of the process runs on this worker's thread, and the event loop
awaits it (`run`, `sign`). Scale with processes, never with threads.

The worker owns the library, the token, one logged-in session and the key handles
(found once: C_FindObjects is slow with many objects). When the session breaks it
fails calls fast with HSMUnavailable, re-initialises, re-opens and re-logs-in with
backoff, and reports every step to the operation log it was built with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Mechanism

from hsm import keys
from hsm.completion import Batch, Sink, async_sink, claim
from hsm.errors import AuditUnavailable, HSMError, HSMUnavailable, SignatureCheckFailed
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
_STOP = object()


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
        self._thread = threading.Thread(target=self._loop, name="hsm", daemon=True)
        self._lib: Any = None
        self._session: Any = None
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, HSMKey] = {}
        self._capture: list[Signature] | None = None
        self._broken: str | None = None
        self._attempt = 0
        self._next_retry = 0.0
        self.reconnects = 0
        self.sign_count = 0
        self._op_ids = IdSource()
        self._inflight: set[asyncio.Future[Any]] = set()
        # Called on the HSM thread after each call with its duration in seconds.
        self.on_call: Callable[[float], None] | None = None
        # Called on the event loop after each audited signature: (purpose, result).
        self.on_sign: Callable[[str, str], None] | None = None

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
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

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
        fut = self._oplog.record(event, {"token": self.config.token, **fields})
        fut.add_done_callback(lambda f: f.exception())  # never leave an error unobserved

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
                items = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                self._reconnect()
                continue
            while True:  # everything queued meanwhile runs now; results go out together
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _STOP:
                    batch.flush()
                    self._close_session()
                    return
                self._run_one(*item, batch)
            batch.flush()

    def _run_one(self, fn: Callable[[Any], Any], sink: Sink, batch: Batch) -> None:
        if not claim(sink):
            return
        if self._broken is not None:
            if time.monotonic() >= self._next_retry:
                self._reconnect()
            if self._broken is not None:
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

    def _mark_broken(self, exc: BaseException) -> None:
        self._broken = type(exc).__name__
        self._attempt = 0
        self._next_retry = time.monotonic()  # the first retry is immediate
        self._event("hsm.error", error=self._broken, action="reconnecting")

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
        self.reconnects += 1
        self._broken = None

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
            token = self._lib.get_token(token_label=cfg.token)
        except pkcs11.exceptions.NoSuchToken:
            labels = sorted({s.get_token().label for s in self._lib.get_slots(token_present=True)})
            raise HSMError(f"no token labelled {cfg.token!r} in {cfg.module} (tokens present: "
                           f"{', '.join(labels) or 'none'})") from None
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
        if self._broken is not None:
            wait = self._next_retry - time.monotonic()
            if wait > max_wait:
                raise HSMUnavailable(f"HSM unavailable: {self._broken}")
            if wait > 0:
                await asyncio.sleep(wait)

        def check(_s: Any) -> None:
            # Reached only with a working session: a broken one is retried (when due)
            # or refused by _run_one before any job runs.
            for handle in self._handles.values():
                handle[pkcs11.Attribute.LABEL]
                return
            self._lib.get_token(token_label=self.config.token)

        await self.run(check)

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
        self._queue.put((fn, sink))
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
                   also: Callable[[T], Awaitable[Any]] | None = None) -> T:
        """The only way to sign: intent durable, then `build(key)` on the HSM thread
        (cryptography's builder calls key.sign()), then check the signature, then the
        outcome durable. Returns what `build` returned.

        `also(result)` (e.g. the inventory insert) runs concurrently with the outcome
        write; both are done when this returns.

        Raises AuditUnavailable (nothing was signed) if the intent cannot be written,
        HSMUnavailable if the session is broken.
        """
        # The operation runs as a task of its own and the caller awaits it shielded:
        # a caller that is cancelled (client gone, shutdown) must not leave an intent
        # without its outcome, nor a signature without its record.
        task = asyncio.ensure_future(self._sign(key, build, purpose, actor, request_id,
                                                details, hash_name, describe, also))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _sign(self, key: HSMKey, build: Callable[[HSMKey], T], purpose: str, actor: str,
                    request_id: str | None, details: Mapping[str, Any] | None, hash_name: str,
                    describe: Callable[[T], Mapping[str, Any]] | None,
                    also: Callable[[T], Awaitable[Any]] | None) -> T:
        op_id = self._op_ids.next()
        intent = {"phase": "intent", "op_id": op_id, "key": key.uri,
                  "mechanism": key.mechanism_name(hash_name), "purpose": purpose,
                  "actor": actor, "request_id": request_id, **(details or {})}
        await self._oplog.record_async("hsm.sign", intent)
        outcome: dict[str, Any] = {"phase": "outcome", "op_id": op_id}
        try:
            out, sigs = await self.run(lambda _s: self._build(key, build))
            if len(sigs) != 1:
                raise HSMError(f"expected one signature per operation, got {len(sigs)}")
            try:
                sigs[0].check()
            except InvalidSignature:
                raise SignatureCheckFailed(f"the HSM returned a signature that does not "
                                           f"verify with the public key of {key.uri}") from None
        except BaseException as exc:
            outcome["result"] = type(exc).__name__
            if self.on_sign is not None:
                self.on_sign(purpose, outcome["result"])
            try:
                await self._oplog.record_async("hsm.sign", outcome)
            except AuditUnavailable:
                pass  # the original error is the one to report
            raise
        outcome.update(result="ok", digest=sigs[0].digest,
                       signature_digest=sigs[0].signature_digest)
        if describe is not None:
            outcome.update(describe(out))
        if self.on_sign is not None:
            self.on_sign(purpose, "ok")
        written = self._oplog.record_async("hsm.sign", outcome)
        if also is None:
            await written
        else:
            await asyncio.gather(written, also(out))
        return out

    async def drain(self) -> None:
        """Wait for every signing operation under way (before closing at shutdown)."""
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


def _describe_source(source: str) -> str:
    return f"environment variable {source[4:]}" if source.startswith("env:") else (
        f"file {source.removeprefix('file:')}")


def _spki_sha256(pub: Any) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()
