"""The audit key rotates: a checkpoint signed by the key in force and by the new key,
naming the new one, hands over; a verifier pinned to the first key follows it, and a
hand-over the first key did not sign is refused (docs/keys.md, "The audit key")."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca.audit.note import NEXT_KEY, checkpoint_body, key_id, signed_note, verifier_key
from ca.audit.verify import verify_log
from tests.test_verify import KEY, ORIGIN, LogBuilder

NEW = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def note_by(log: LogBuilder, signers: list[Ed25519PrivateKey],
            names: Ed25519PrivateKey | None = None) -> str:
    """A checkpoint of every line so far signed by `signers`, naming `names` (a
    hand-over) if given."""
    ext = (f"{NEXT_KEY}{verifier_key(ORIGIN, names.public_key())}",) if names else ()
    body = checkpoint_body(ORIGIN, log.size, log._tree.root(), ext)
    return signed_note(body, [(ORIGIN, k.public_key(), k.sign(body.encode()))
                              for k in signers])


def log_checkpoint(log: LogBuilder, note: str) -> int:
    op = log.new_op()
    log.intent(op, purpose="checkpoint", size=log.size,
               root=base64.b64encode(log._tree.root()).decode())
    return log.outcome(op, checkpoint=note)


def issuance(log: LogBuilder, n: int = 3) -> None:
    for _ in range(n):
        op = log.new_op()
        log.intent(op)
        log.outcome(op)


def rotated_log(handover_signers: list[Ed25519PrivateKey], after: list[Ed25519PrivateKey]
                ) -> tuple[LogBuilder, int]:
    log = LogBuilder()
    log.add("daemon.start")
    issuance(log)
    log.checkpoint()
    issuance(log)
    at = log_checkpoint(log, note_by(log, handover_signers, names=NEW))
    issuance(log)
    log_checkpoint(log, note_by(log, after))  # the old key retired: the new one alone
    issuance(log)
    log.checkpoint(NEW)
    return log, at


def test_a_verifier_pinned_to_the_old_key_follows_the_hand_over() -> None:
    log, at = rotated_log([KEY, NEW], [NEW])
    result = verify_log(log.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert result.ok, result.reason
    assert result.new_state is not None
    assert result.new_state["successors"] == [
        {"seq": at, "key": verifier_key(ORIGIN, NEW.public_key())}]
    # The state remembers the new key: the next run needs no hand-over in view to trust
    # a checkpoint of the new key alone.
    again = verify_log(log.data(), KEY.public_key(), ORIGIN, ORIGIN, state=result.new_state)
    assert again.ok, again.reason
    # A verifier pinned to the new key alone cannot vouch for what the old key signed.
    assert not verify_log(log.data(), NEW.public_key(), ORIGIN, ORIGIN).ok


def test_each_hand_over_is_said_with_where_its_key_was_made() -> None:
    """An auditor trial: one signature of the HSM's audit key handed the log over to a
    key made in software, and every verifier followed without a word. Each hand-over is
    said, and whether the log shows its key made in the HSM (an hsm.keygen outcome)."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    spki = hashlib.sha256(NEW.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    log, at = rotated_log([KEY, NEW], [NEW])
    result = verify_log(log.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert result.ok and result.note is not None and result.note.startswith(
        f"the audit key was handed over at seq {at} to key id ") and \
        "no hsm.keygen line among these lines shows it made in the HSM" in result.note, \
        result.note
    made = LogBuilder()
    made.add("daemon.start")
    issuance(made)
    made.checkpoint()
    op = made.new_op()
    made.add("hsm.keygen", phase="intent", op_id=op, label="audit-2", type="ed25519")
    keygen = made.add("hsm.keygen", phase="outcome", op_id=op, result="ok",
                      public_key_sha256=spki)
    at = log_checkpoint(made, note_by(made, [KEY, NEW], names=NEW))
    issuance(made)
    made.checkpoint(NEW)
    result = verify_log(made.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert result.ok, result.reason
    assert result.note == (f"the audit key was handed over at seq {at} to key id "
                           f"{key_id(ORIGIN, NEW.public_key()).hex()}, made in the HSM at "
                           f"seq {keygen} (its hsm.keygen line)"), result.note


@pytest.mark.parametrize("signers, words", [
    ([NEW], "no signature by"),  # the old key did not sign the hand-over: a forgery
    ([KEY], "no signature by"),  # the new key did not sign its own arrival
    ([OTHER, NEW], "no signature by"),
])
def test_a_hand_over_the_old_key_did_not_sign_is_refused(signers: list[Ed25519PrivateKey],
                                                          words: str) -> None:
    log, at = rotated_log(signers, [NEW])
    result = verify_log(log.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert not result.ok and result.bad_seq == at and words in (result.reason or ""), (
        result.bad_seq, at, result.reason)


def test_the_new_key_is_not_trusted_before_its_hand_over() -> None:
    log = LogBuilder()
    log.add("daemon.start")
    issuance(log)
    early = log_checkpoint(log, note_by(log, [NEW]))  # before any hand-over
    issuance(log)
    log_checkpoint(log, note_by(log, [KEY, NEW], names=NEW))
    issuance(log)
    log.checkpoint(NEW)
    result = verify_log(log.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert not result.ok and result.bad_seq == early, (result.bad_seq, result.reason)


def test_a_log_cut_before_the_hand_over_is_called_truncated() -> None:
    """The latest checkpoint is the new key's; a copy cut before the hand-over cannot
    check its signature, and used to be blamed on the pinned key or on an open intent
    (auditor trial). It is said to be shorter than the checkpoint."""
    log, at = rotated_log([KEY, NEW], [NEW])
    body = checkpoint_body(ORIGIN, log.size, log._tree.root())
    latest = signed_note(body, [(ORIGIN, NEW.public_key(), NEW.sign(body.encode()))])
    data = log.data()
    for keep in (at - 3, at - 4):  # ending on an outcome, then on an intent
        cut = b"".join(line + b"\n" for line in data.split(b"\n")[:keep])
        result = verify_log(cut, KEY.public_key(), ORIGIN, ORIGIN, latest_checkpoint=latest)
        assert not result.ok and result.bad_seq == keep, result.reason
        assert result.reason is not None and result.reason.startswith(
            f"log is shorter than the checkpoint (truncated?): the latest checkpoint claims "
            f"{log.size} lines, the log has {keep}"), result.reason
