"""`hsmca renew --daemon`: renewal without a person, against a real daemon that goes
away and comes back. No sleeps: the test waits on the renewer's JSON log lines."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import glob
import os
import random
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ca.commands.renewal import MAX_BACKOFF_S, Job, backoff_s, keep, renew_time
from ca.errors import ClientError
from tests.conftest import Daemon, InitialisedCA, init_ca, require, start_daemon
from tests.helpers import HSMCA, Running, cert_serial, enroll, gone
from tests.ports import free_port


@contextlib.contextmanager
def renewing(tmp_path: Path) -> Iterator[tuple[InitialisedCA, Daemon,
                                               Callable[..., Running]]]:
    """A CA of the test's own, served, and a way to start renewers that end with it."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    started: list[Running] = []

    def start(*args: str | Path, **kw: Any) -> Running:
        started.append(Running.start(*args, **kw))
        return started[-1]
    try:
        yield ca, d, start
    finally:
        for renewer in started:
            renewer.stop()
        d.stop()


def test_renew_time_is_two_thirds_of_the_lifetime_with_jitter() -> None:
    issued = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    nb = issued - dt.timedelta(minutes=1)  # as the CA backdates it
    na = issued + dt.timedelta(hours=24)
    rng = random.Random(7)
    times = [renew_time(nb, na, rng) for _ in range(200)]
    assert all(issued + dt.timedelta(hours=16 - 1.2) <= t <=
               issued + dt.timedelta(hours=16 + 1.2) for t in times)
    assert len(set(times)) > 100  # spread, not one instant for a whole fleet
    # A 30 s certificate: 20 s on, not at once (counted from its backdated start, two
    # thirds of its 90 s were over before it was issued).
    short = [renew_time(issued - dt.timedelta(minutes=1), issued + dt.timedelta(seconds=30),
                        rng) for _ in range(50)]
    assert all(issued + dt.timedelta(seconds=18) <= t <= issued + dt.timedelta(seconds=22)
               for t in short), short


def test_backoff_doubles_up_to_a_cap_and_leaves_time_before_expiry() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    rng = random.Random(3)
    upper = [backoff_s(a, None, Top()) for a in range(12)]
    assert upper[:5] == [1, 2, 4, 8, 16] and max(upper) == MAX_BACKOFF_S
    assert all(0.5 <= backoff_s(0, None, rng) <= 1 for _ in range(50))
    # With 40 s left, no wait longer than 10 s: a few more tries before the expiry.
    assert all(backoff_s(a, 40, rng) <= 10 for a in range(12))
    # Expired, it doubles again, to a minute (an SSH trial's host retried every second,
    # for as long as the CA was away: about 170,000 log lines a day).
    assert [backoff_s(a, -5, Top()) for a in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


class _Log:
    """A structlog-like logger that keeps the events, and says when one comes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.came = asyncio.Event()

    def _add(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))
        self.came.set()

    info = warning = error = _add

    async def until(self, event: str) -> dict[str, object]:
        async with asyncio.timeout(60):  # a bound, not a synchronisation
            while not (found := [f for e, f in self.events if e == event]):
                self.came.clear()
                await self.came.wait()
        return found[0]


def test_a_stuck_job_is_tried_again_when_its_wake_says_it_may_be_due() -> None:
    """An SSH trial: a host enrolled again after its host certificate was revoked kept
    the revoked one for 10 minutes, as its renewal sat out the pause of a refusal
    (`.stuck`) while its refresh said it was due. The wake now ends any pause."""
    tries: list[int] = []

    async def run() -> dict[str, object]:
        tries.append(1)
        if len(tries) == 1:
            raise ClientError("the CA no longer takes this credential", status=403)
        return {"serial": "2a"}

    async def scenario() -> None:
        log = _Log()
        def due() -> dt.datetime:  # due now, then in a day once renewed
            return dt.datetime.now(dt.UTC) + dt.timedelta(days=len(tries) // 2)

        job = Job("ssh.host.renew", due, run, lambda: 3600.0, keeps_going=True,
                  wake=asyncio.Event())
        task = asyncio.create_task(keep(job, log))
        try:
            stuck = await log.until("ssh.host.renew.stuck")
            assert stuck["retry_in_s"] == 600.0
            assert job.wake is not None
            job.wake.set()  # the refresh: enrolled again, due now
            assert await log.until("ssh.host.renew.done") == {"serial": "2a"}
            assert len(tries) == 2
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_an_expiry_while_the_ca_is_away_is_said_once() -> None:
    """The same trial: its host certificate expired while the CA was away, and nothing
    said so but clients refusing the host."""
    async def run() -> dict[str, object]:
        raise ClientError("cannot connect", retryable=True)

    async def scenario() -> None:
        log = _Log()
        job = Job("ssh.host.renew", lambda: dt.datetime.now(dt.UTC), run, lambda: -1.0,
                  wake=asyncio.Event())
        task = asyncio.create_task(keep(job, log))
        try:
            said = await log.until("ssh.host.renew.expired")
            assert "has expired while it could not be renewed" in str(said["detail"])
            assert job.wake is not None
            for _ in range(2):  # two more retries, cut short as a SIGHUP would
                before = len(log.events)
                job.force()
                async with asyncio.timeout(60):  # a bound, not a synchronisation
                    while len(log.events) < before + 2:
                        log.came.clear()
                        await log.came.wait()
            assert [e for e, _ in log.events].count("ssh.host.renew.expired") == 1
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_a_job_says_its_own_expiry_and_waits_no_longer_than_its_bound() -> None:
    """An SSH trial: a host certificate that expired while the CA was down was said
    with "enroll again with a new token", though the host's credential was good and the
    next try renewed it by itself; and the KRL refresh, asked for every 20 s, waited
    40 s after the CA was back. A job says its own words, and a bound caps its waits."""
    async def run() -> dict[str, object]:
        raise ClientError("cannot connect", retryable=True)

    async def scenario() -> None:
        log = _Log()
        job = Job("ssh.host.renew", lambda: dt.datetime.now(dt.UTC), run, lambda: -1.0,
                  wake=asyncio.Event(), keeps_going=True, max_backoff_s=3.0,
                  expired="the host certificate has expired: the next try renews it")
        task = asyncio.create_task(keep(job, log))
        try:
            said = await log.until("ssh.host.renew.expired")
            assert said["detail"] == "the host certificate has expired: the next try " \
                "renews it" and "enroll" not in str(said["detail"])
            waits = []
            for _ in range(6):  # past 2 ** 2: the bound holds every one
                retry = await log.until("ssh.host.renew.retry")
                waits.append(float(retry["retry_in_s"]))
                log.events.clear()
                job.force()
            assert max(waits) <= 3.0, waits
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_daemon_renews_short_certificates_twice_retrying_while_the_ca_is_away(
        tmp_path: Path) -> None:
    openssl = require("openssl")
    port = free_port()
    ca = init_ca(tmp_path)
    listen = ("--listen", f"127.0.0.1:{port}")
    d = start_daemon(ca.state, *listen)
    renewer = None
    try:
        cert, key = enroll(d, tmp_path, "service", ["renewed.internal.example"], [],
                           "--ttl", "30s")
        first = cert_serial(cert)
        hook_log = tmp_path / "hook.log"
        renewer = Running.start(
            # Its renewals are 45 s: the second has most of that left when the CA comes
            # back, whatever a cold start under load takes (expired is not retried).
            "renew", "--daemon", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
            "--ttl", "45s", "--exec", f'echo "$HSMCA_SERIAL $HSMCA_CERT" >> {hook_log}')

        done = renewer.wait("renew.done")
        assert done["old_serial"] == first and done["serial"] == cert_serial(cert) != first
        renewer.wait("renew.hook.done")
        assert hook_log.read_text().split() == [done["serial"], str(cert)]
        proc = subprocess.run([openssl, "verify", "-CAfile", d.root, "-untrusted",
                               cert.parent / "chain.pem", cert], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

        # The CA goes away, and an operator asks for a renewal now (SIGHUP, as
        # `systemctl reload` sends it): the renewer retries with back-off until it is back.
        assert d.stop() == 0
        renewer.proc.send_signal(signal.SIGHUP)
        assert renewer.wait("renew.forced")["detail"] == "SIGHUP: due now"
        renewer.wait("renew.retry")
        renewer.proc.send_signal(signal.SIGHUP)  # asked again: cuts the back-off short
        retry = renewer.wait("renew.retry", count=2)
        assert retry["attempt"] == 2 and "cannot connect" in retry["error"]
        d = start_daemon(ca.state, *listen)

        second = renewer.wait("renew.done", count=2)
        # Both asks were for this renewal: the next is scheduled, not forced again.
        assert renewer.wait("renew.scheduled", count=3)["in_s"] > 10
        assert second["old_serial"] == done["serial"] and second["serial"] == cert_serial(cert)
        renewer.wait("renew.hook.done", count=2)
        assert hook_log.read_text().split()[::2] == [done["serial"], second["serial"]]
        assert renewer.events("renew.scheduled")[0]["in_s"] <= 60
        # Revoked, its next renewal (asked now) is refused: it gives up with exit 3,
        # which the docs' unit does not restart (RestartPreventExitStatus=3), instead of
        # asking the CA the same question every minute.
        subprocess.run([*HSMCA, "revoke", "--config", ca.state / "hsmca.toml",
                        cert_serial(cert)], check=True, capture_output=True)
        renewer.proc.send_signal(signal.SIGHUP)
        failed = renewer.wait("renew.failed")
        assert "revoked" in failed["error"], failed
        assert renewer.exit_code() == 3
        assert renewer.raw[-1].startswith("hsmca: error: ") and "revoked" in renewer.raw[-1]
    finally:
        if renewer is not None:
            renewer.stop()
        d.stop()
    # Nothing secret in what the renewer logged, and no traceback.
    text = "".join(renewer.raw)
    assert "PRIVATE KEY" not in text and "Traceback" not in text


def test_a_credential_renewed_by_other_means_gets_the_hook(tmp_path: Path) -> None:
    """A service team's trial: a one-shot `renew --rekey` beside `renew --daemon` moved
    the daemon's schedule to the new certificate, but nothing reloaded nginx, which
    served the old certificate past its expiry. The daemon runs its hook for a
    credential written by other means, without renewing it again."""
    with renewing(tmp_path) as (_ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["replaced.internal.example"], [],
                           "--ttl", "1h")  # not due for 40 minutes
        seen = tmp_path / "reloaded-with"
        renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root,
                                "--cert", cert, "--key", key,
                                "--exec", f'echo "$HSMCA_SERIAL" >> {seen}')
        renewer.wait("renew.scheduled")
        subprocess.run([*HSMCA, "renew", "--url", d.url, "--ca", str(d.root), "--cert",
                        str(cert), "--key", str(key), "--rekey"], check=True,
                       capture_output=True)
        new = cert_serial(cert)
        replaced = renewer.wait("renew.replaced")
        assert replaced["credential"] == f"serial {new}"
        renewer.wait("renew.hook.done")
        assert seen.read_text().split() == [new]  # the hook ran for the new certificate
        assert renewer.events("renew.done") == []  # and the daemon renewed nothing itself
        assert renewer.wait("renew.scheduled", count=2)  # for the new one


def test_a_hook_that_fails_is_run_again_before_the_next_renewal(tmp_path: Path) -> None:
    """A client trial: a reload that failed once waited for the next renewal, while the
    service served its old certificate from memory past its expiry. The hook is run
    again, with a back-off, until it succeeds (here: at its second run)."""
    with renewing(tmp_path) as (_ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["hooked.internal.example"], [],
                           "--ttl", "15s")  # renewed ~10 s after its issue
        runs, ok = tmp_path / "runs", tmp_path / "reloaded"
        hook = (f'echo run >> {runs}; if [ "$(wc -l < {runs})" -lt 2 ]; then exit 3; fi; '
                f'touch {ok}')
        renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root,
                                "--cert", cert, "--key", key, "--ttl", "10m", "--exec", hook)
        renewer.wait("renew.done")
        failed = renewer.wait("renew.hook.failed")
        assert failed["status"] == 3
        retry = renewer.wait("renew.hook.retry")
        assert retry["attempt"] == 1 and retry["retry_in_s"] <= 4
        renewer.wait("renew.hook.done")
        assert ok.exists() and runs.read_text().count("run") == 2
        assert len(renewer.events("renew.done")) == 1  # run again, not renewed again


def test_a_certificate_file_unreadable_for_a_moment_keeps_the_schedule(
        tmp_path: Path) -> None:
    """A client trial: cert.pem emptied for a moment (configuration management's copy, a
    plain cp) or removed ended the agent for good (exit 3, which its unit does not
    restart), 42 minutes before its renewal; the certificate then expired. The schedule
    stands, the file is said unreadable once per error, and the renewal works once the
    file is back."""
    with renewing(tmp_path) as (_ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["blink.internal.example"], [],
                           "--ttl", "1h")  # not due for 40 minutes
        first, saved = cert_serial(cert), cert.read_bytes()
        renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root,
                                "--cert", cert, "--key", key)
        renewer.wait("renew.scheduled")
        cert.write_bytes(b"")
        assert "holds no PEM certificate" in renewer.wait("renew.unreadable")["error"]
        cert.unlink()
        said = renewer.wait("renew.unreadable", count=2)
        assert "no such file" in said["error"] and said["cert"] == str(cert.absolute())
        # Due while it is missing: tried again, not the end (a docs trial's agent exited 3)
        renewer.proc.send_signal(signal.SIGHUP)
        assert "no such file" in renewer.wait("renew.retry")["error"]
        cert.write_bytes(saved)
        renewer.proc.send_signal(signal.SIGHUP)  # cuts the back-off short: renews now
        done = renewer.wait("renew.done")
        assert done["old_serial"] == first and cert_serial(cert) == done["serial"] != first
        assert renewer.proc.poll() is None


def test_a_renewer_started_before_the_clock_is_set_waits_for_it(tmp_path: Path) -> None:
    """A host booted without a clock (no RTC; NTP not synced yet) starts `renew --daemon`
    two days in the past: its certificate is not valid yet by that clock. It exited 3
    (what retrying cannot fix), which the documented unit does not restart: the host's
    certificate then expired with nobody renewing it. It says so and keeps its schedule
    now; once the clock is put right (libfaketime's offset file changed, as NTP would
    move the clock), it renews."""
    [lib] = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    offset = tmp_path / "clock-offset"
    offset.write_text("-2d\n")
    clock = {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset),
             "FAKETIME_NO_CACHE": "1"}
    with renewing(tmp_path) as (_ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["boot.internal.example"], [],
                           "--ttl", "1h")
        first = cert_serial(cert)
        renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root, "--cert", cert,
                        "--key", key, env={**os.environ, **clock})
        renewer.wait("renew.scheduled")
        said = "".join(renewer.raw)
        assert f"--cert {cert} is not valid before " in said and "is this host's clock " \
            "right?; renewing when due all the same" in said, said
        assert renewer.proc.poll() is None
        offset.write_text("+0\n")  # the clock put right
        renewer.proc.send_signal(signal.SIGHUP)  # due now, rather than in 40 minutes
        done = renewer.wait("renew.done")
        assert done["old_serial"] == first and cert_serial(cert) == done["serial"] != first


def test_an_answer_held_through_a_full_disk_is_installed_after_the_old_one_expired(
        tmp_path: Path) -> None:
    """A client trial: the disk full at renewal, the agent kept the CA's answer to
    install later (asking again would have the HSM sign again); the disk stayed full
    past the old certificate's end, and once there was room the agent judged the expired
    file first, threw the valid certificate it held away and exited 3 ("enroll again").
    The held answer is installed first."""
    def small_files() -> None:  # a disk filling up: files stop at 600 bytes, for now
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, resource.RLIM_INFINITY))

    with renewing(tmp_path) as (ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["full.internal.example"], [],
                           "--ttl", "15s")  # due ~10 s after its issue
        first = cert_serial(cert)
        renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root,
                                "--cert", cert, "--key", key, "--ttl", "10m",
                                preexec_fn=small_files)
        assert "File too large" in renewer.wait("renew.retry")["error"]
        renewer.wait("renew.expired")  # still held, the file behind it expired
        resource.prlimit(renewer.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # room again
        # Its next try, after the back-off (half a minute or so: not cut short, so that
        # the file is well past its end, not in its last second)
        done = renewer.wait("renew.done")
        assert done["old_serial"] == first and cert_serial(cert) == done["serial"]
        listed = subprocess.run([*HSMCA, "cert", "list", "--config", ca.state / "hsmca.toml",
                                 "--search", "full.internal.example"], check=True,
                                capture_output=True, text=True).stdout
        assert len(listed.splitlines()) == 3, listed  # a header, the first, one renewal
        assert renewer.proc.poll() is None


def test_a_directory_the_renewer_cannot_write_fails_at_its_start(tmp_path: Path) -> None:
    """A client trial: `renew --daemon` on a read-only directory (a read-only mount, a
    unit without ReadWritePaths) scheduled its renewal 15 h ahead, and failed then. It
    fails at once, as a one-shot renew does."""
    chattr = require("chattr")
    with renewing(tmp_path) as (_, d, start):
        cert, key = enroll(d, tmp_path, "service", ["ro.internal.example"], [], "--ttl", "1h")
        locked = subprocess.run([chattr, "+i", cert.parent], capture_output=True, text=True)
        assert locked.returncode == 0, f"needs a filesystem with chattr +i: {locked.stderr}"
        try:
            renewer = start("renew", "--daemon", "--url", d.url, "--ca", d.root,
                            "--cert", cert, "--key", key)
            assert renewer.exit_code() == 3
        finally:
            subprocess.run([chattr, "-i", cert.parent], check=True)
        said = renewer.raw[-1]
        assert said.startswith(f"hsmca: error: cannot write to {cert.parent}") and \
            "nothing was spent" in said, renewer.raw
        assert renewer.events("renew.scheduled") == []


def test_a_hook_running_when_the_renewer_stops_goes_with_it_and_runs_at_its_next_start(
        tmp_path: Path) -> None:
    """A client trial: SIGTERM to `renew --daemon` while its --exec hung left the hook
    and what it started running, reparented to init. They are ended with it; and, a
    docs trial: nothing was said, and the next start never ran the hook again, so the
    service kept the old certificate until the next renewal. It is said, and run then."""
    flag = tmp_path / "ran-once"
    hook = (f"if [ -e {flag} ]; then echo hook-again; else touch {flag}; "
            "sleep 600 & echo hook-child $!; wait; fi")
    with renewing(tmp_path) as (_ca, d, start):
        cert, key = enroll(d, tmp_path, "service", ["stop.internal.example"], [],
                           "--ttl", "1h")
        args = ("renew", "--daemon", "--url", d.url, "--ca", d.root, "--cert", cert,
                "--key", key, "--exec", hook)
        renewer = start(*args)
        renewer.wait("renew.scheduled")
        renewer.proc.send_signal(signal.SIGHUP)
        renewer.wait("renew.hook")
        with renewer.cond:
            assert renewer.cond.wait_for(lambda: any(
                line.startswith("hook-child ") for line in renewer.stdout), timeout=60)
            child = next(line.split()[1] for line in renewer.stdout
                         if line.startswith("hook-child "))
        assert renewer.stop() == 0
        assert renewer.events("renew.hook.interrupted"), renewer.raw
        assert gone(child)
        again = start(*args)
        again.wait("renew.hook.pending")
        again.wait("renew.hook.done")
        with again.cond:  # (its stdout is read apart from its log: in any order)
            assert again.cond.wait_for(lambda: any(
                line.startswith("hook-again") for line in again.stdout), timeout=60), \
                again.stdout
        # The marker goes after hook.done is logged: read it once the renewer has gone
        # on (a CI run read it between the two).
        again.wait("renew.scheduled")  # and on as before, without renewing again
        assert not (cert.parent / f".{cert.name}.hsmca-hook-pending").exists()
        assert again.events("renew.done") == []


def test_the_hook_marker_never_follows_a_link(tmp_path: Path) -> None:
    """A review: a link planted where the renewer marks a pending hook (a directory a
    service's group may write) had the renewer, running as root, create the file it
    named."""
    from ca.commands.renewal import _mark, _marked, _unmark
    marker, victim = tmp_path / ".cert.pem.hsmca-hook-pending", tmp_path / "victim"
    marker.symlink_to(victim)
    _mark(marker)
    assert not victim.exists() and not _marked(marker)
    _unmark(marker)
    assert not marker.is_symlink()
    _mark(marker)
    assert _marked(marker) and marker.stat().st_mode & 0o777 == 0o600
    _unmark(marker)
    assert not _marked(marker)
