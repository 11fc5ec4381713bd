"""The signing thread: the process's one HSM thread, and the signing transaction.

Every signature of the process is made here, in groups: the intents of every job
that arrived together are made durable in one group commit, then each is signed
(cryptography's builder calls the HSM signer's `sign()`, on this thread, which
owns the process's `HSM`), then the inventory writes start, the outcomes are made
durable in one more group commit, the inventory commits are awaited, and the
results go back to the event loop in one wake-up. Nothing leaves before its
outcome and its inventory row are durable. On a VM a thread wake-up costs tens of
microseconds of CPU; passing each signature through the event loop between these
steps cost about eight of them per certificate.

The HSM executes plain signatures and keeps its own rules (a durable intent before
C_Sign, one signature per intent, every signature verified); this module writes
the intent and outcome lines around them and decides nothing: a `SigningJob` says
what to sign, with which key, for whom, and what to record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog

from ca.handoff import (
    STOP,
    Batch,
    Coalescer,
    Settled,
    Sink,
    async_sink,
    claim,
    drain_queue,
    stop_thread,
)
from ca.logs import Recurring, logging_thread
from hsm.errors import AuditUnavailable, HSMError, HSMUnavailable
from hsm.ids import IdSource
from hsm.session import HSM, HSMConfig, KeyInfo
from hsm.signers import HSMKey, mechanism_name, signer
from hsm.uri import key_uri

T = TypeVar("T")
RECORDER_STUCK_S = 5.0  # an append unanswered this long: the recorder is stopped or stuck
log = structlog.get_logger("hsmca.hsm")
Entry = tuple[str, Mapping[str, Any]]


class AuditSink(Protocol):
    """What the pipeline needs of the audit log: the log itself in the primary
    process, a link to it in a worker (both also satisfy hsm.oplog.OpLog)."""

    def append_durable(self, entries: Sequence[Entry]) -> list[Settled[int]]:
        """Append lines on the calling thread; return once they are durable, each
        future settled with the line's seq or why it was not written."""
        ...

    def record(self, event: str, fields: Mapping[str, Any]) -> cf.Future[int]:
        """Queue a line without waiting for it."""
        ...

    def durable_size(self) -> int:
        ...


PROBE_EVERY_S = 1.0  # see SigningPipeline.probe


@dataclass(frozen=True, slots=True)
class SigningJob(Generic[T]):
    """One signature to make: `sign(key)` is called with an HSM signer for `key` (a
    label) once the intent line (the fields below and `details`) is durable;
    `describe(result)` adds fields to the outcome line; `record(result)` starts the
    inventory write (a future), committed before the result is released."""

    key: str
    purpose: str
    actor: str
    sign: Callable[[HSMKey], T]
    details: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    hash_name: str | None = "sha256"
    describe: Callable[[T], Mapping[str, Any]] | None = None
    record: Callable[[T], cf.Future[Any]] | None = None


@dataclass(frozen=True, slots=True)
class SignResult(Generic[T]):
    value: T
    intent_seq: int
    outcome_seq: int
    op_id: str = ""
    purpose: str = ""


@dataclass(slots=True)
class _Op:
    job: SigningJob[Any]
    sink: Sink
    intent: dict[str, Any] = field(default_factory=dict)


def _withheld(op_id: str, error: BaseException) -> Entry:
    """The line that says an "ok" outcome's result never reached its client."""
    return ("sign.withheld", {"op_id": op_id, "released": False,
                              "reason": f"{type(error).__name__}: {error}"[:500]})


class SigningPipeline:
    """The signing thread of one process; `await submit(job)` or `await sign(...)`."""

    def __init__(self, config: HSMConfig, audit: AuditSink) -> None:
        self.hsm = HSM(config, audit)
        self._audit = audit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._thread = logging_thread(self._loop, "hsm")
        self._keys: dict[str, KeyInfo] = {}
        self._keys_seen = 0  # the session's reconnects when _keys was last trusted
        self._op_ids = IdSource()
        self._probed_at = float("-inf")  # monotonic time of the last probe that passed
        self._probing: asyncio.Future[None] | None = None
        # Called on this thread: after each signature with its duration in seconds,
        # and with (purpose, result) for each signing job.
        self.on_call: Callable[[float], None] | None = None
        self.on_sign: Callable[[str, str], None] | None = None
        # Called on this thread with (purpose, serial, intent seq) when a signature's
        # inventory row committed and its outcome line could not be written (owed, and
        # written later with released: false): a row nobody received, to be revoked
        # once the log is back (ca/revocation/unreleased.py).
        self.on_unreleased: Callable[[str, str, int], None] | None = None
        # Called on the caller's loop with (purpose, serial, intent seq) for a result that
        # went out "ok" and never reached its client: its caller gave up meanwhile (a
        # stop cancels the requests it waited 10 s for), or did not send it (`withhold`).
        # It notes the certificate for the next start and has it revoked; True if it
        # makes a certificate (an OCSP response's does not: nothing is said then).
        self.on_withheld: Callable[[str, str, int], bool] | None = None
        # Called on this thread when the session breaks (False) or is back (True).
        self.on_health: Callable[[bool], None] | None = None
        # Called on this thread with the jobs waiting for it: what one round found
        # queued, and what is left once it is done (0 unless more came), so that the
        # metric is this worker's own whichever worker a scrape reaches.
        self.on_backlog: Callable[[int], None] | None = None
        self._was_healthy = True
        self._signed_at_break = 0  # signatures the session had made when it last broke
        self._end_owed = False  # back, its end not said yet: the loop wakes to say it
        # The operator's log says each problem of an outage once, and its end: the
        # audit log has every attempt, the operator only what changed.
        self._outage = Recurring(
            log, "the HSM session is not usable; nothing is signed in this process until "
            "it is re-opened (tried again with a back-off up to 5 s)",
            "the HSM session works again", then="the HSM session cannot be re-opened",
            level="error")

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread, open the session and log in; raise HSMError if that fails."""
        self._thread.start()
        fut: cf.Future[None] = cf.Future()
        self._queue.put((lambda hsm: hsm.open(), fut))
        try:
            fut.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the thread (jobs queued before still run) and log out."""
        stop_thread(self._thread, self._queue)

    @property
    def healthy(self) -> bool:
        return self.hsm.healthy and self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        return self.hsm.broken

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ---- calls -----------------------------------------------------------------------

    async def submit(self, job: SigningJob[T]) -> SignResult[T]:
        """Sign as `job` says; AuditUnavailable (nothing was signed) if the intent
        cannot be written, HSMUnavailable if the session is broken.

        The whole transaction runs on the signing thread, for every job that arrived
        together, so a caller that is cancelled (client gone, shutdown) after its
        intent was written cannot leave it without an outcome."""
        await self._await_retry()
        self._recorder_answers()
        return await self._enqueue(job)  # type: ignore[no-any-return]

    async def submit_all(self, jobs: Sequence[SigningJob[T]]
                         ) -> list[SignResult[T] | BaseException]:
        """`submit` for many jobs at once (a refresher's batch): signed as one group,
        each job's result or why it failed, in order. One future per job and no task:
        a batch of hundreds would otherwise cost a task and its steps for each."""
        try:
            await self._await_retry()
            self._recorder_answers()
        except (HSMUnavailable, AuditUnavailable) as exc:
            return [exc for _ in jobs]
        return await asyncio.gather(*(self._enqueue(job) for job in jobs),
                                    return_exceptions=True)

    def _enqueue(self, job: SigningJob[T]) -> asyncio.Future[Any]:
        """Hand `job` to the signing thread; the future settles with its SignResult."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], _Op(job, sink))
        return fut

    async def sign(self, key: str, build: Callable[[HSMKey], T], *, purpose: str,
                   actor: str, request_id: str | None = None,
                   details: Mapping[str, Any] | None = None, hash_name: str | None = "sha256",
                   describe: Callable[[T], Mapping[str, Any]] | None = None) -> T:
        """`submit` for a one-off signature that records nothing in the inventory."""
        job = SigningJob(key, purpose, actor, build, details or {}, request_id, hash_name,
                         describe)
        return (await self.submit(job)).value

    async def call(self, fn: Callable[[HSM], T]) -> T:
        """Run `fn(hsm)` on the signing thread (key look-up, generation, probes)."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (fn, sink))
        return await fut  # type: ignore[no-any-return]

    async def load_key(self, label: str) -> KeyInfo:
        """Find a key and check it cannot be exported."""
        return await self.call(lambda hsm: self._key(hsm, label))

    def expect_keys(self, labels: Iterable[str]) -> None:
        """The keys the CA uses now: the session takes one the token no longer shows
        for the HSM unavailable (503, /health), not for a missing key (HSM.expected)."""
        self.hsm.expected = frozenset(labels)

    async def generate_key(self, label: str, key_type: str) -> KeyInfo:
        """A new key pair in the token, recorded like a signature: an `hsm.keygen` intent
        durable before C_GenerateKeyPair, its outcome durable before the key is used or
        this returns. (The outcome alone, written whenever, let a kill leave a key the
        log never mentioned, and signatures by a new root come before its keygen line:
        a key lifecycle trial.)"""
        def gen(hsm: HSM) -> KeyInfo:
            op_id = self._op_ids.next()
            intent = {"phase": "intent", "op_id": op_id, "label": label,
                      "key": str(key_uri(hsm.config.token, label)), "type": key_type}
            [written] = self._append([("hsm.keygen", intent)])
            seq = written.result()  # raises AuditUnavailable: nothing generated
            try:
                info = hsm.generate(label, key_type, seq, op_id)
            finally:
                for line in self._audit.append_durable(hsm.take_events()):
                    line.result()
            self._keys[label] = info
            return info
        return await self.call(gen)

    async def destroy_key(self, label: str, actor: str, request_id: str | None = None
                          ) -> tuple[int, str | None] | None:
        """Destroy a key pair in the token, recorded like a signature: an `hsm.destroy`
        intent durable before C_DestroyObject, an outcome after it; the outcome's seq,
        and which half alone the token still held ("public", "private"), if only one.
        None when the token holds no such key (a destroy cut short after
        C_DestroyObject, before the inventory said so): nothing to do in the HSM."""
        def destroy(hsm: HSM) -> tuple[int, str | None] | None:
            private, public = hsm.remnants(label)  # the token's word, not a memory of it
            if not private and not public:
                self._keys.pop(label, None)
                return None
            # A destroy cut short between the two halves leaves one: it goes too.
            info = self._keys.get(label) or (hsm.key(label) if private and public else None)
            op_id = self._op_ids.next()
            intent = {"phase": "intent", "op_id": op_id, "label": label,
                      "key": info.uri if info else str(key_uri(hsm.config.token, label)),
                      "operation": "destroy", "actor": actor, "request_id": request_id,
                      "public_key_sha256": info.spki_sha256 if info else None,
                      **({} if private and public else
                         {"remaining": "private" if private else "public"})}
            [written] = self._append([("hsm.destroy", intent)])
            seq = written.result()  # raises AuditUnavailable: nothing destroyed
            outcome: dict[str, Any] = {"phase": "outcome", "op_id": op_id, "label": label}
            try:
                hsm.destroy(label, seq)
                outcome["result"] = "ok"
            except Exception as exc:
                outcome["result"] = type(exc).__name__
                self._append([("hsm.destroy", outcome)])[0].result()
                raise
            self._keys.pop(label, None)
            return (self._append([("hsm.destroy", outcome)])[0].result(),
                    intent.get("remaining"))
        return await self.call(destroy)

    async def probe(self, max_wait: float = 1.0) -> None:
        """Ask the token whether it is still there. With the session broken, wait for
        the next reconnect attempt if that is due within `max_wait` and let it run,
        so a health check sees a recovery at once but never makes the thread retry
        faster than its back-off allows.

        At most one probe a second goes to the HSM thread, which signatures queue on
        too: /health is anonymous, and each of its requests was a PKCS#11 call on it
        (a security trial: harmless on SoftHSM, a stall on a network HSM). Callers
        meanwhile share the one under way, or the last one that passed."""
        if time.monotonic() - self._probed_at < PROBE_EVERY_S:
            return
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe(max_wait))
            # Its outcome is read even when every caller stopped waiting (a health
            # check's timeout): no "exception was never retrieved" in the log.
            self._probing.add_done_callback(
                lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._probing)

    async def _probe(self, max_wait: float) -> None:
        await self._await_retry(max_wait)
        await self.call(lambda hsm: hsm.probe())
        self._probed_at = time.monotonic()

    async def drain(self) -> None:
        """Wait for every job under way (before closing at shutdown): the thread
        finishes a group before it takes the next job from its queue."""
        if not self._thread.is_alive():
            return
        try:
            await self.call(lambda _hsm: None)
        except HSMError:
            pass

    def _recorder_answers(self) -> None:
        """Refuse at once (AuditUnavailable) while the audit log's writer has left an
        append unanswered for RECORDER_STUCK_S: a chaos trial stopped the primary, and
        every signature waited until it came back, or for the worker to give up on it a
        minute later, taking them all with it."""
        stuck = getattr(self._audit, "stuck_for", None)
        waited = stuck() if stuck is not None else 0.0
        if waited > RECORDER_STUCK_S:
            raise AuditUnavailable(f"the audit log's writer (the primary process) has not "
                                   f"answered for {waited:.0f} s")

    async def _await_retry(self, max_wait: float = 1.0) -> None:
        """With the session broken: refuse at once (HSMUnavailable) if the next
        reconnect attempt is more than `max_wait` away, else wait for it to be due,
        so a request sees a recovery at once without the thread retrying faster than
        its back-off allows (and an outage still answers within a second)."""
        wait = self.hsm.retry_in()
        if wait is None:
            return
        if wait > max_wait:
            raise HSMUnavailable(f"HSM unavailable: {self.hsm.broken}")
        if wait > 0:
            await asyncio.sleep(wait)  # a back-off the HSM set, not synchronisation

    # ---- the thread ------------------------------------------------------------------

    def _key(self, hsm: HSM, label: str) -> KeyInfo:
        if self._keys_seen != hsm.reconnects:
            # A reconnect since: the token may no longer hold what this cache says, so
            # ask it before an intent is written (a chaos trial's key files moved away
            # made an intent and an outcome for every retry).
            self._keys.clear()
            self._keys_seen = hsm.reconnects
        info = self._keys.get(label)
        if info is None:
            info = self._keys[label] = hsm.key(label)
        return info

    def _loop(self) -> None:
        batch = Batch()
        items: list[Any] = []
        while True:
            if not items:
                try:
                    first = self._queue.get(timeout=self._wake_in())
                except queue.Empty:
                    self._tick()
                    continue
                # Everything queued meanwhile runs now and the results go out together;
                # signing jobs next to each other in the queue are signed as one group.
                items = drain_queue(self._queue, first)
                self._backlog(len(items))
            item = items.pop(0)
            if isinstance(item, _Op):
                group = [item]
                while items and isinstance(items[0], _Op):
                    group.append(items.pop(0))
                items = self._sign_groups(group, batch, items)
            elif item is STOP:
                batch.flush()
                try:
                    self.hsm.close()
                except HSMError:
                    pass  # never opened: nothing to close
                self._flush_events()
                return
            else:
                self._run_one(*item, batch)
            if not items:
                self._backlog(self._queue.qsize())  # before the results wake anyone
                self._flush_events()
                batch.flush()

    def _wake_in(self) -> float | None:
        """How long the loop may wait for work: until a reconnect is due, or, back but
        its end not said, until the session has held past the flapping window."""
        retry = self.hsm.retry_in()
        if retry is None and self._end_owed:
            return max(0.0, self.hsm.flap_window_s - self.hsm.since_reconnect()) + 0.01
        return retry

    def _backlog(self, jobs: int) -> None:
        if self.on_backlog is not None:
            self.on_backlog(jobs)

    def _tick(self) -> None:
        try:
            self.hsm.tick()
        except Exception as exc:
            # Nothing a reconnect raises may end this thread: every later signature would
            # wait on it for good while the process looked alive (a review: a diagnosis
            # of the token directory raised PermissionError here). The next tick tries
            # again.
            log.error("the HSM reconnect failed unexpectedly; trying again",
                      error=f"{type(exc).__name__}: {exc}")
        finally:
            self._flush_events()

    def _observe(self) -> None:
        problem = self.hsm.broken
        healthy = problem is None
        if healthy:
            # Its end said once the session has signed again, or held past the flapping
            # window: a reconnect that the next signature broke again (a key's files
            # moved away) said "works again", then the outage, every 5 s (an SRE trial),
            # which closed an alert on the log at each turn.
            self._end_owed = self.hsm.flapping and self.hsm.signatures == self._signed_at_break
            if not self._end_owed:
                self._outage.ok()
        else:
            self._outage.failed(problem)
            self._signed_at_break = self.hsm.signatures
        if healthy != self._was_healthy:
            self._was_healthy = healthy
            if self.on_health is not None:
                self.on_health(healthy)

    def _run_one(self, fn: Callable[[HSM], Any], sink: Sink, batch: Batch) -> None:
        if not claim(sink):
            return
        try:
            result = fn(self.hsm)
        except BaseException as exc:
            batch.fail(sink, exc)
            return
        batch.ok(sink, result)

    def _flush_events(self) -> None:
        self._observe()
        for event, fields in self.hsm.take_events():
            fut = self._audit.record(event, fields)
            fut.add_done_callback(lambda f: f.exception())  # never leave it unobserved

    def _append(self, entries: list[Entry]) -> list[Settled[int]]:
        """The audit group commit, with the HSM's pending events in front."""
        events = self.hsm.take_events()
        written = self._audit.append_durable([*events, *entries])
        return written[len(events):]

    def _start(self, ops: list[_Op], batch: Batch) -> list[tuple[_Op, KeyInfo]]:
        """The jobs of a group that can be signed, each with its intent line made; the
        others failed (a caller gone, the HSM away: nothing recorded, nothing to log)."""
        live = [op for op in ops if claim(op.sink)]
        if not live:
            return []
        try:
            self.hsm.tick()
            if self.hsm.broken is not None:
                raise HSMUnavailable(f"HSM unavailable: {self.hsm.broken}")
            infos = [self._key(self.hsm, op.job.key) for op in live]
        except HSMError as exc:
            for op in live:
                batch.fail(op.sink, exc)
            return []
        for op, info in zip(live, infos, strict=True):
            job = op.job
            op.intent = {"phase": "intent", "op_id": self._op_ids.next(), "key": info.uri,
                         "mechanism": mechanism_name(info, job.hash_name),
                         "purpose": job.purpose, "actor": job.actor,
                         "request_id": job.request_id, **job.details}
        return list(zip(live, infos, strict=True))

    def _durable(self, started: list[tuple[_Op, KeyInfo]], written: list[Settled[int]],
                 batch: Batch) -> list[tuple[_Op, KeyInfo, int]]:
        """The jobs whose intent is on disk; the others failed (fail closed)."""
        ready = []
        for (op, info), fut in zip(started, written, strict=True):
            exc = fut.exception()
            if exc is None:
                ready.append((op, info, fut.result()))
            else:
                batch.fail(op.sink, exc)
        return ready

    def _sign_groups(self, ops: list[_Op], batch: Batch, rest: list[Any]) -> list[Any]:
        """Sign a group, and the groups that queued up meanwhile, pipelined: the
        outcomes of one group and the intents of the next are made durable by one
        group commit. Returns the items taken from the queue that are not signing
        jobs (they run next, in their order)."""
        started = self._start(ops, batch)
        ready = self._durable(started, self._append(
            [("hsm.sign", op.intent) for op, _ in started]), batch) if started else []
        while ready:
            signed = [(op, seq, *self._sign_one(op, info, seq)) for op, info, seq in ready]
            # The inventory writes start together (one transaction for the group, which
            # commits while the outcomes are written), after the signing: between
            # signatures, the GIL released in C_Sign would let the store commit each alone.
            done: list[tuple[_Op, int, Any, BaseException | None, cf.Future[Any] | None]] = []
            outcomes: list[Entry] = []
            for op, seq, out, error, outcome in signed:
                extra: cf.Future[Any] | None = None
                if error is None and op.job.record is not None:
                    try:
                        extra = op.job.record(out)
                    except Exception as exc:
                        error = exc
                done.append((op, seq, out, error, extra))
                outcomes.append(("hsm.sign", outcome))
            # The next group, if jobs queued up while this one was signed: its intents
            # go into the same group commit as these outcomes.
            if not rest:
                rest = drain_queue(self._queue, []) if not self._queue.empty() else []
            following: list[_Op] = []
            while rest and isinstance(rest[0], _Op):
                following.append(rest.pop(0))
            started = self._start(following, batch) if following else []
            written = self._append(outcomes + [("hsm.sign", op.intent) for op, _ in started])
            withheld: list[Entry] = []
            for (op, seq, out, error, extra), fut in zip(done, written[:len(outcomes)],
                                                          strict=True):
                if error is None:
                    error = fut.exception()
                    if (error is not None and extra is not None
                            and self.on_unreleased is not None
                            and isinstance(op.intent.get("serial"), str)):
                        # Its row may be there, or land later: the inventory's commit is
                        # waited for (SQLite's ends here), and one given up on as well,
                        # since it may still land (PostgreSQL: a trial lost a synchronous
                        # standby, and rows nobody received landed live and unrevoked).
                        extra.exception()
                        self.on_unreleased(op.job.purpose, op.intent["serial"], seq)
                if error is None and extra is not None:
                    # Waits for the inventory's commit, which the store gives up on after
                    # its answer timeout (a database that stopped answering).
                    error = extra.exception()
                    if error is not None:  # signed and logged "ok", but never released
                        withheld.append(_withheld(op.intent["op_id"], error))
                        # A commit given up on may still have landed: its row is revoked
                        # once the store answers (nothing, if there is none).
                        self._unreleased(op.job.purpose, op.intent.get("serial"), seq)
                if self.on_sign is not None:
                    self.on_sign(op.job.purpose, "ok" if error is None
                                 else type(error).__name__)
                if error is None:
                    batch.ok(op.sink, SignResult(out, seq, fut.result(), op.intent["op_id"],
                                                 op.job.purpose),
                             lambda op=op, seq=seq: self._dropped(op, seq))
                else:
                    batch.fail(op.sink, error)
            if withheld:  # said before the callers hear; its own failure fails nothing
                self._append(withheld)
            self._backlog(len(rest) + self._queue.qsize())  # the next group is under way
            batch.flush()  # released before the next group is signed
            ready = self._durable(started, written[len(outcomes):], batch)
        return rest

    def _dropped(self, op: _Op, seq: int) -> None:
        """On the caller's loop: `op` signed, and its caller gone (Batch.ok). Never
        raises: the results settled after it in the same round must still go out."""
        serial = op.intent.get("serial")
        if not isinstance(serial, str):
            return
        try:
            self._withhold(op.job.purpose, serial, seq, op.intent["op_id"],
                           asyncio.CancelledError("its request was cancelled while it "
                                                  "was signed"))
        except Exception:
            log.exception("a certificate signed for a cancelled request could not be "
                          "handed over: revoke it by hand if it stays valid", serial=serial)

    def _unreleased(self, purpose: str, serial: object, seq: int) -> None:
        if self.on_unreleased is not None and isinstance(serial, str):
            self.on_unreleased(purpose, serial, seq)

    def withhold(self, result: SignResult[Any], serial: str, error: BaseException) -> None:
        """`result` was released to its caller, and its caller does not send it on: a
        check after the signing failed (a renewal's revocation check met the inventory
        away: a trial saw the 503, and the certificate left valid and OCSP good with
        nobody holding it). On the caller's loop, before it answers."""
        self._withhold(result.purpose, serial, result.intent_seq, result.op_id, error)

    def _withhold(self, purpose: str, serial: str, seq: int, op_id: str,
                  error: BaseException) -> None:
        """`on_withheld` notes it durably (what a start after a stop reads: the line
        below may be owed, in memory, in the outage that failed the check), then a
        `sign.withheld` line says so, written on the signing thread, which owns the
        audit sink (a stop's STOP may be queued first: the note is what counts then)."""
        if self.on_withheld is None or not self.on_withheld(purpose, serial, seq):
            return
        self._queue.put((lambda _hsm: self._append([_withheld(op_id, error)]), cf.Future()))

    def _sign_one(self, op: _Op, info: KeyInfo, seq: int
                  ) -> tuple[Any, BaseException | None, dict[str, Any]]:
        """Build and sign one job: (result, error, outcome fields). An error here is
        written into the outcome line and raised to the caller; the result is never
        released."""
        outcome: dict[str, Any] = {"phase": "outcome", "op_id": op.intent["op_id"]}
        started = time.perf_counter()
        key = signer(self.hsm, info, seq)
        try:
            out = op.job.sign(key)
            if len(key.signed) != 1:
                raise HSMError(f"expected one signature per operation, got {len(key.signed)}")
            outcome.update(result="ok", digest=key.signed[0].digest,
                           signature_digest=key.signed[0].signature_digest)
            if op.job.describe is not None:
                outcome.update(op.job.describe(out))
        except Exception as exc:
            outcome["result"] = type(exc).__name__
            return None, exc, outcome
        if self.on_call is not None:
            self.on_call(time.perf_counter() - started)
        return out, None, outcome
