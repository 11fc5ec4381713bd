"""Certificates signed and never released, revoked.

A certificate's inventory row commits while its outcome line is written (one group
commit for both, ca/issuance/pipeline.py), so a kill between the two, or an outcome
that could not be written (a full disk: it is owed, and written later with `released:
false`), leaves a row nobody received, which the inventory called valid and OCSP signed
good (a fault trial). Such a certificate is revoked (cessationOfOperation, its lineage
left alone) after a `sign.unreleased` line that says why: at the next start for a kill
(ca/daemon/primary.py, from the log's last lines), and in the worker once its log is back
for an outcome that could not be written. The bootstrap token spent on it is usable
again, so that the service whose enrollment failed can retry with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import structlog

from ca import ra
from ca.revocation import Revocations, unless_revoked_meanwhile
from ca.store import Store

# (purpose as the intent writes it, the serial as the intent writes it, the intent's seq)
Unreleased = tuple[str, str, int]

log = structlog.get_logger("hsmca.issue")

DETAIL = ("signed, and never released: its outcome line was never written or says "
          "released: false; revoked so that no relying party takes it")


async def revoke_unreleased(items: Iterable[Unreleased], store: Store, audit: object,
                            revocations: Revocations,
                            context: Callable[[], Awaitable[ra.Context]],
                            node: str | None) -> list[str]:
    """Revoke each certificate of `items` that the inventory holds and still takes, and
    only the very row its intent made: an X.509 row names its intent's seq and log (an
    OCSP response's intent names a certificate released long before, which a review
    found revoked by a first draft); an SSH serial is random and names one certificate.
    The serials revoked."""
    append = audit.append  # type: ignore[attr-defined]
    done: list[str] = []
    for purpose, text, seq in items:
        try:
            serial = int(text, 10 if purpose.startswith("ssh-") else 16)
        except ValueError:
            continue
        if purpose.startswith("ssh-"):
            matching = await revocations.count_ssh(serial, None, None)
            if not matching:
                continue
            await append("sign.unreleased", purpose=purpose, serial=text, intent_seq=seq,
                         detail=DETAIL)
            ssh_order = ra.order(await context(), ra.Local(), ra.SSHRevokeRequest(
                serial, None, None, matching))
            await unless_revoked_meanwhile(revocations.revoke_ssh(ssh_order, matching, None))
        else:
            # The read that has its audit line, once a commit given up on has landed
            issued = await store.settled_cert(serial)
            record = issued.record if issued is not None else None
            if (record is None or record.revoked_at is not None or record.audit_seq != seq
                    or record.audit_log != node):
                continue
            await append("sign.unreleased", purpose=purpose, serial=text, intent_seq=seq,
                         detail=DETAIL)
            # What it was issued for is offered again before it is revoked, so that a
            # crash between the two leaves nothing stuck: the next pass still finds the
            # row live and revokes it (a review: the other order left a token spent).
            if record.acme_order is not None:
                # Its order said valid, and offered this certificate for download: ready
                # again, for its client to finalize anew (a review found the revoked one
                # served as the order's certificate).
                await store.reopen_acme_order_of(serial)
            # Its enrollment was answered with an error (or never answered): the token
            # spent on it enrolls again, as for a signature that failed outright (a
            # left-over finding: the retry was told the token was used).
            if (token := await store.release_token_spent_on(serial)) is not None:
                log.info("bootstrap token usable again: the certificate it enrolled was "
                         "never released", token_id=token, serial=text)
            order = ra.order(await context(), ra.Local(), ra.RevokeRequest(
                serial, "cessationOfOperation"))
            await unless_revoked_meanwhile(revocations.revoke(order, None))
        done.append(text)
    return done

