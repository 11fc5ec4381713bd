"""Keeping credentials fresh without a person: when to renew, how to back off, the hook.

Used by `hsmca renew --daemon` (an X.509 credential) and `hsmca ssh host --renew` (the
host certificate, the trusted user CA and the KRL). Each credential is a `Job`; each job
runs in its own task that sleeps until the job is due, runs it, retries with back-off
while the CA is away, and logs every step as one JSON line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ca.client import ClientError
from ca.errors import GaveUp
from ca.ra import BACKDATE

RENEW_AT = 2 / 3   # of the lifetime, as step-ca and cert-manager do
JITTER = 1 / 20    # +- of the lifetime, so that a fleet enrolled together spreads out
MAX_BACKOFF_S = 300.0
EXPIRED_MAX_BACKOFF_S = 60.0  # an expired credential's retries: what it serves is refused
# Sleeps are cut into slices this long and the wall clock read again after each:
# monotonic time stands still while a machine is suspended, a certificate's does not.
# The credential's files are looked at then too (a stat and a small read), so that one
# replaced by other means gets the hook within seconds, before the old one expires.
SLICE_S = 5.0

_rng = random.SystemRandom()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)




def renew_time(not_before: dt.datetime, not_after: dt.datetime,
               rng: random.Random | None = _rng) -> dt.datetime:
    """Two thirds into the validity period, give or take a twentieth of it (the period
    counted from the issue, not from the start hsmca backdates for hosts whose clocks
    lag: counted from there, a life of a minute or less was due at once, and a client
    trial's 30 s certificate was renewed five times in five seconds). `rng` None: no
    give or take (one command, not a fleet renewing at once)."""
    if not_after - not_before > BACKDATE:
        not_before += BACKDATE
    life = not_after - not_before
    return not_before + life * RENEW_AT + (life * rng.uniform(-JITTER, JITTER)
                                           if rng is not None else dt.timedelta(0))


def backoff_s(attempt: int, remaining_s: float | None, rng: random.Random = _rng) -> float:
    """Seconds before retry number `attempt` + 1: doubling from 1 s up to 5 min, never
    more than a quarter of the time the credential has left, while it has some (so
    there are still a few tries before it expires), nor than a minute once it has
    expired, and randomised down to half so that clients that lost the CA together do
    not come back together."""
    delay = min(MAX_BACKOFF_S, 2.0 ** attempt)
    if remaining_s is not None and remaining_s > 0:
        delay = min(delay, max(1.0, remaining_s / 4))
    elif remaining_s is not None:
        # Expired: doubling to a minute, where the cap above held at 1 s and an SSH
        # host retried every second while the CA was away (an SSH trial); not to 5 min,
        # since what it keeps serving meanwhile is refused (a review).
        delay = min(delay, EXPIRED_MAX_BACKOFF_S)
    return delay * rng.uniform(0.5, 1.0)


async def sleep_until(when: dt.datetime | Callable[[], dt.datetime],
                      wake: asyncio.Event | None = None,
                      unless: Callable[[], bool] | None = None) -> bool:
    """Until `when`, or until the time it gives, asked again after each slice and
    whenever `wake` is set (a job's due time moves: a credential replaced by other
    means, a host certificate found revoked); False at once, without waiting for the
    time, if `unless()` says so after a slice."""
    while True:
        if unless is not None and unless():
            return False
        at = when() if callable(when) else when
        left = (at - now()).total_seconds()
        if left <= 0:
            return True
        if wake is None:
            await asyncio.sleep(min(left, SLICE_S))
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), min(left, SLICE_S))
        wake.clear()


@dataclass
class Job:
    """One credential to keep fresh. `due` and `remaining_s` read the current files
    every time, so a credential replaced by other means is picked up."""

    event: str                                   # log event prefix, e.g. "renew"
    due: Callable[[], dt.datetime]
    run: Callable[[], Awaitable[dict[str, Any]]]  # raises ClientError; fields to log
    remaining_s: Callable[[], float | None]
    hook: str | None = None                       # shell command after each success
    hook_env: Callable[[], dict[str, str]] | None = None
    hook_timeout_s: float = 300.0                 # a hook that hangs must not stop renewals
    # A failure retrying cannot fix ends the process, unless the other jobs must go on
    # without this one (an SSH host's KRL while its X.509 credential is expired): then it
    # is said every STUCK_RETRY_S, and tried again then, in case a person fixed it.
    keeps_going: bool = False
    # What is said when the credential expires while it cannot be renewed (None: that
    # only a new enrollment helps, true of a client certificate, not of an SSH host's)
    expired: str | None = None
    # Retries never wait longer than this (a refresh asked every minute must not wait
    # five after an outage)
    max_backoff_s: float | None = None
    # The credential was written just before (ssh host --renew certifies the host key
    # when it starts): the hook runs for it too, as for any new one.
    hook_at_start: bool = False
    # A file that stands while the hook has not succeeded for the credential in place:
    # a renewer stopped during its hook runs it at its next start (a docs trial's stop
    # cut a reload short, and the service kept the old certificate until the next one).
    hook_pending: Path | None = None
    # Set when the job may be due sooner than it said: its due time is asked again.
    wake: asyncio.Event | None = None
    # What tells one credential on disk from another (a serial; None while unreadable):
    # one written by other means (a one-shot `renew --rekey`, an `enroll --force`) gets
    # the hook too, else the service keeps the old one in memory until it expires.
    identity: Callable[[], object] | None = None
    # Set by SIGHUP: due now, whatever the schedule says (after a CA key rotation, to
    # take a certificate from the new issuer; to try a changed --exec at once).
    forced: bool = False

    def force(self) -> None:
        self.forced = True
        if self.wake is not None:
            self.wake.set()


STUCK_RETRY_S = 600.0


async def run_hook(command: str, env: dict[str, str], log: Any = None,
                   event: str = "renew", timeout_s: float | None = None) -> int:
    """Run `command` with /bin/sh (so that `a && b` works as an operator expects) and log
    its exit status; its own output goes where ours goes (the journal, under systemd).
    One still running after `timeout_s` is killed, with whatever it started (its own
    process group), and counts as failed (status -9)."""
    if log is not None:
        log.info(f"{event}.hook", command=command)
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        status = await asyncio.wait_for(proc.wait(), timeout_s)
    except asyncio.CancelledError:
        # The renewer stops (SIGTERM): the hook and what it started go with it, not on
        # as orphans (a client trial found a hung reload's children reparented to 1).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if log is not None:
            log.warning(f"{event}.hook.interrupted", command=command,
                        detail="the renewer stops: ended with it")
        raise
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        status = await proc.wait()
        if log is not None:
            log.error(f"{event}.hook.timeout", command=command, after_s=timeout_s)
        return status
    if log is None:
        pass
    elif status == 0:
        log.info(f"{event}.hook.done", command=command, status=status)
    else:
        log.error(f"{event}.hook.failed", command=command, status=status)
    return status


async def keep(job: Job, log: Any) -> None:
    """Run `job` whenever it is due, forever; raise ClientError on a failure that
    retrying cannot fix (a refusal, an expired or foreign certificate)."""
    if job.hook and (job.hook_at_start or (job.hook_pending and _marked(job.hook_pending))):
        if not job.hook_at_start:
            log.warning(f"{job.event}.hook.pending", detail="its last run did not finish "
                        "(the renewer stopped meanwhile): run now")
        await _hook_until_done(job, log)
    seen = job.identity() if job.identity else None

    def replaced() -> bool:
        nonlocal seen
        if job.identity is None:
            return False
        current = job.identity()
        if current is None or current == seen:
            return False
        seen = current
        return True

    if job.wake is None:  # for SIGHUP's
        job.wake = asyncio.Event()

    def due() -> dt.datetime:
        return now() if job.forced else job.due()

    while True:
        at = due()
        log.info(f"{job.event}.scheduled", at=at.isoformat(),
                 in_s=round(max(0.0, (at - now()).total_seconds()), 1))
        if not await sleep_until(due, job.wake, replaced):
            log.info(f"{job.event}.replaced", credential=str(seen),
                     detail="written by other means (another renew, an enroll)"
                     + (": the hook runs for it" if job.hook else ""))
            if job.hook:
                await _hook_until_done(job, log)
            continue
        if job.forced:
            log.info(f"{job.event}.forced", detail="SIGHUP: due now")
        attempt, expired_said = 0, False
        while True:
            job.forced = False  # a SIGHUP during a back-off is this attempt's
            log.info(f"{job.event}.start", attempt=attempt + 1)
            try:
                fields = await job.run()
                break
            except ClientError as exc:
                if not exc.retryable:
                    log.error(f"{job.event}.failed", error=str(exc))
                    if not job.keeps_going:
                        raise
                    log.error(f"{job.event}.stuck", retry_in_s=STUCK_RETRY_S,
                              detail="the other jobs go on; this one is tried again then")
                    await _pause(job, STUCK_RETRY_S)  # periodic: a person may fix it
                    continue
                left = job.remaining_s()
                if left is not None and left <= 0 and not expired_said:
                    expired_said = True  # once: the retries say the rest
                    # (not "until a renewal works": an expired credential never renews,
                    # and an enrollment trial waited on it; only an answer the CA gave
                    # before, held for room to write it, still installs)
                    ends = ("is stuck until a person acts" if job.keeps_going
                            else "ends this renewer (exit 3)")
                    log.error(f"{job.event}.expired", detail=job.expired or (
                              "the credential has expired while it could not be renewed: "
                              "the next try installs an answer the CA gave before if one "
                              f"is held, and otherwise {ends}: enroll again with a new "
                              "token"))
                delay = backoff_s(attempt, left)
                if job.max_backoff_s is not None:
                    delay = min(delay, job.max_backoff_s)
                attempt += 1
                log.warning(f"{job.event}.retry", attempt=attempt, retry_in_s=round(delay, 1),
                            error=str(exc))
                await _pause(job, delay)
            except Exception as exc:  # a local failure (unwritable file, bad cert file)
                log.error(f"{job.event}.failed", error=str(exc))
                raise
        log.info(f"{job.event}.done", **fields)
        if job.identity is not None:
            seen = job.identity()
        if job.hook:
            await _hook_until_done(job, log)


async def _pause(job: Job, seconds: float) -> None:
    """A back-off that a SIGHUP cuts short (the operator asked for it now), and so does
    the job's wake: it may be due sooner (a host enrolled again after its host
    certificate was revoked waited out the 10 minutes of a stuck job: an SSH trial)."""
    assert job.wake is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await job.wake.wait()
    job.wake.clear()


def hold_sighup() -> None:
    """SIGHUP ignored until `run_forever` takes it: its default ends the process, and a
    `systemctl reload` during the start's checks would have (systemd counts that a
    clean exit, and does not restart it)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _hook_until_done(job: Job, log: Any) -> None:
    """Run the job's hook until it succeeds, with a back-off (4 s doubling to 5 min),
    or until the next renewal, which runs it again. A reload that failed once used to
    wait for the next renewal: the service kept its old certificate in memory past its
    expiry, though the files held the new one (a client trial)."""
    assert job.hook
    if job.hook_pending is not None:
        _mark(job.hook_pending)
    attempt = 0
    while await run_hook(job.hook, job.hook_env() if job.hook_env else {}, log, job.event,
                         job.hook_timeout_s) != 0:
        delay = backoff_s(attempt + 2, job.remaining_s())
        attempt += 1
        if now() + dt.timedelta(seconds=delay) >= job.due():
            return
        log.warning(f"{job.event}.hook.retry", attempt=attempt, retry_in_s=round(delay, 1))
        await asyncio.sleep(delay)  # a back-off, not synchronisation
    if job.hook_pending is not None:
        _unmark(job.hook_pending)


# The hook's marker beside the certificate, in a directory others may write (a service's
# group): made, read and removed through the directory's descriptor, never following a
# link (a review had a renewer running as root create a file a planted link named).
# Best effort: it only says "run the hook again".

def hook_pending_path(cert: Path) -> Path:
    """The marker of a hook that has not succeeded since `cert` was renewed."""
    return cert.parent / f".{cert.name}.hsmca-hook-pending"


def _mark(path: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.close(os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dfd))
        finally:
            os.close(dfd)


def _marked(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _unmark(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # (removes a link, never what it names)


def run_forever(jobs: list[Job], **context: Any) -> int:
    """Run the jobs until SIGTERM/SIGINT (exit 0) or a failure retrying cannot fix
    (GaveUp: exit 3, after logging it; the one-line error is printed by the CLI): a
    refusal, or its own certificate or key missing or unreadable. SIGHUP makes every
    job due now (`systemctl reload`: it used to end the process, as SIGHUP's default
    does)."""
    from ca.logs import configure
    configure()
    log = structlog.get_logger().bind(**context)

    async def main() -> None:
        log.info("start", jobs=[job.event for job in jobs])
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(keep(job, log)) for job in jobs]
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: [job.force() for job in jobs])
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper],
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [*tasks, stopper]:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        for t in done:
            if t is not stopper:
                t.result()  # re-raises the job's ClientError
        log.info("stop", reason="signal")

    try:
        asyncio.run(main())
    except ClientError as exc:  # keep() retries every other one
        raise GaveUp(str(exc)) from None
    return 0


mark_hook_pending, hook_is_pending, unmark_hook_pending = _mark, _marked, _unmark
