"""C2SP signed notes and checkpoints: the Go reference vector byte for byte, round
trips, and strict refusal of every malformation an auditor could be handed."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca.audit.cosignature import cosign, cosigner_key, valid_cosignatures
from ca.audit.note import (
    Checkpoint,
    NoteError,
    checkpoint_body,
    key_id,
    parse_checkpoint,
    parse_note,
    sign_checkpoint,
    sign_note,
    verifier_key,
    verify_checkpoint,
    verify_note,
)

# golang.org/x/mod/sumdb/note note_test.go: the PeterNeumann key and note.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_SIG = ("— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXg"
          "KvqfqdngotpRZb6KE6RyyBwJnAM=\n")
GO_NOTE = GO_TEXT + "\n" + GO_SIG

ORIGIN = "hsmca.example/audit"
ROOT = bytes(range(32))


def go_key() -> Ed25519PrivateKey:
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])  # the base64 may hold "+" too
    assert seed[0] == 1  # algorithm byte: Ed25519
    return Ed25519PrivateKey.from_private_bytes(seed[1:])


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def checkpoint(key: Ed25519PrivateKey, size: int = 42, root: bytes = ROOT,
               origin: str = ORIGIN, name: str = ORIGIN) -> str:
    return sign_checkpoint(origin, size, root, name, key.public_key(), key.sign)


# ---- the reference vector -------------------------------------------------------------------


def test_key_id_and_verifier_key_match_the_go_reference() -> None:
    pub = go_key().public_key()
    assert key_id("PeterNeumann", pub) == bytes.fromhex("c74f20a3")
    assert verifier_key("PeterNeumann", pub) == GO_VKEY


def test_signing_reproduces_the_go_reference_note_byte_for_byte() -> None:
    # Ed25519 is deterministic, so any conforming signer must produce exactly this.
    k = go_key()
    assert sign_note(GO_TEXT, "PeterNeumann", k.public_key(), k.sign) == GO_NOTE
    note = verify_note(GO_NOTE, "PeterNeumann", k.public_key())
    assert note.body == GO_TEXT
    assert note.signatures[0].key_id == bytes.fromhex("c74f20a3")


def test_the_reference_note_fails_when_altered() -> None:
    pub = go_key().public_key()
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(GO_NOTE.replace("cryptography", "cryptographY"), "PeterNeumann", pub)
    corrupted = GO_TEXT + "\n" + GO_SIG[:60] + "ABCD" + GO_SIG[60:]
    with pytest.raises(NoteError):
        verify_note(corrupted, "PeterNeumann", pub)


def test_a_blank_line_after_the_signatures_is_named_as_such() -> None:
    """An auditor trial added a blank line at the end of a checkpoint file: "a note
    needs at least one signature line", of a note that has one."""
    pub = go_key().public_key()
    with pytest.raises(NoteError, match="this one has a blank line after its signatures"):
        verify_note(GO_NOTE + "\n", "PeterNeumann", pub)
    with pytest.raises(NoteError, match="needs at least one signature line"):
        verify_note(GO_TEXT + "\n", "PeterNeumann", pub)


# ---- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_body_is_three_lines() -> None:
    assert checkpoint_body(ORIGIN, 20852163, ROOT) == (
        f"{ORIGIN}\n20852163\n{base64.b64encode(ROOT).decode()}\n")
    assert checkpoint_body(ORIGIN, 0, ROOT).split("\n")[1] == "0"


def test_checkpoint_round_trip(key: Ed25519PrivateKey) -> None:
    text = checkpoint(key)
    body = checkpoint_body(ORIGIN, 42, ROOT)
    assert text.startswith(body + "\n\u2014 " + ORIGIN + " ")
    assert text.endswith("\n")
    cp = verify_checkpoint(text, ORIGIN, key.public_key(), ORIGIN)
    assert isinstance(cp, Checkpoint)
    assert (cp.origin, cp.size, cp.root, cp.body) == (ORIGIN, 42, ROOT, body)
    assert [(s.name, s.key_id) for s in cp.signatures] == [
        (ORIGIN, key_id(ORIGIN, key.public_key()))]
    assert parse_checkpoint(text) == cp


def test_sign_is_called_with_exactly_the_body_bytes(key: Ed25519PrivateKey) -> None:
    seen: list[bytes] = []

    def hsm(message: bytes) -> bytes:
        seen.append(message)
        return key.sign(message)

    checkpoint_text = sign_checkpoint(ORIGIN, 7, ROOT, "audit-key", key.public_key(), hsm)
    assert seen == [checkpoint_body(ORIGIN, 7, ROOT).encode("utf-8")]
    verify_checkpoint(checkpoint_text, "audit-key", key.public_key())


def test_a_faulty_signer_is_caught_before_the_note_leaves(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(NoteError, match="does not verify"):
        sign_checkpoint(ORIGIN, 1, ROOT, ORIGIN, key.public_key(), other.sign)
    with pytest.raises(NoteError, match="63 bytes"):
        sign_checkpoint(ORIGIN, 1, ROOT, ORIGIN, key.public_key(), lambda m: key.sign(m)[:63])


def test_wrong_key_wrong_name_or_wrong_origin_is_refused(key: Ed25519PrivateKey) -> None:
    text = checkpoint(key)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(NoteError, match="no signature by"):
        verify_checkpoint(text, ORIGIN, other.public_key())
    with pytest.raises(NoteError, match="no signature by"):
        verify_checkpoint(text, "someone.else/log", key.public_key())
    with pytest.raises(NoteError, match="origin"):
        verify_checkpoint(text, ORIGIN, key.public_key(), origin="other.example/log")


def test_other_signatures_are_ignored_but_a_bad_one_by_our_key_is_not(
        key: Ed25519PrivateKey) -> None:
    text = checkpoint(key)
    witness = Ed25519PrivateKey.generate()
    body = checkpoint_body(ORIGIN, 42, ROOT)
    witness_line = sign_note(body, "witness.example", witness.public_key(),
                             witness.sign).split("\n\n")[1]
    cosigned = text + witness_line
    assert verify_checkpoint(cosigned, ORIGIN, key.public_key()).size == 42
    assert verify_note(cosigned, "witness.example", witness.public_key()).body == body
    # A second line naming our key and id whose signature is wrong poisons the note.
    ours = text.split("\n\n")[1]
    blob = base64.b64decode(ours.split(" ")[2])
    forged = ours.split(" ")[0] + " " + ORIGIN + " " + base64.b64encode(
        blob[:4] + bytes(64)).decode() + "\n"
    with pytest.raises(NoteError, match="does not verify"):
        verify_checkpoint(text + forged, ORIGIN, key.public_key())


def test_up_to_100_signatures_are_accepted_and_101_refused(key: Ed25519PrivateKey) -> None:
    text = checkpoint(key)
    sig_line = text.split("\n\n")[1]
    assert verify_checkpoint(text + sig_line * 99, ORIGIN, key.public_key()).size == 42
    with pytest.raises(NoteError, match="more than 100"):
        parse_checkpoint(text + sig_line * 100)


def _malformed(key: Ed25519PrivateKey) -> dict[str, str]:
    good = checkpoint(key)
    body, sigs = good.split("\n\n")
    sig_blob = sigs.split(" ")[2].strip()
    b64root = base64.b64encode(ROOT).decode()

    def with_body(new_body: str) -> str:
        return new_body + "\n" + sigs

    return {
        "no trailing newline": good[:-1],
        "no blank line": body + "\n" + sigs,
        "no signature": body + "\n\n",
        "hyphen instead of em dash": good.replace("\u2014", "-"),
        "control character": good.replace(ORIGIN, ORIGIN + "\t", 1),
        "carriage return": good.replace("\n", "\r\n", 1),
        "name with a space": good.replace(f"\u2014 {ORIGIN}", "\u2014 a b"),
        "name with a plus": good.replace(f"\u2014 {ORIGIN}", "\u2014 a+b"),
        "extra field on the signature line": good[:-1] + " extra\n",
        "bad base64 signature": good.replace(sig_blob, "!!!!"),
        "non-canonical base64": good.replace(sig_blob, sig_blob[:-2] + "N="),
        "too short signature": good.replace(sig_blob, "AAAA"),
        "size with leading zero": with_body(f"{ORIGIN}\n042\n{b64root}\n"),
        "negative size": with_body(f"{ORIGIN}\n-42\n{b64root}\n"),
        "non-ASCII digits": with_body(f"{ORIGIN}\n\u0664\u0662\n{b64root}\n"),
        "root of 31 bytes": with_body(
            f"{ORIGIN}\n42\n{base64.b64encode(ROOT[:31]).decode()}\n"),
        "extension line": with_body(f"{ORIGIN}\n42\n{b64root}\nextension\n"),
        "two lines": with_body(f"{ORIGIN}\n42\n"),
        "empty origin": with_body(f"\n42\n{b64root}\n"),
        "not text": 42,  # type: ignore[dict-item]
    }


@pytest.mark.parametrize("case", sorted(_malformed(Ed25519PrivateKey.generate())))
def test_malformed_checkpoints_are_refused_with_a_reason(case: str,
                                                         key: Ed25519PrivateKey) -> None:
    text = _malformed(key)[case]
    with pytest.raises(NoteError) as err:
        verify_checkpoint(text, ORIGIN, key.public_key())
    assert str(err.value)  # a message an operator can act on
    assert isinstance(err.value, ValueError)


def test_parse_note_keeps_blank_lines_in_the_text() -> None:
    # C2SP: the text ends at the last blank line, earlier blank lines belong to it.
    k = go_key()
    sig = sign_note(GO_TEXT, "PeterNeumann", k.public_key(), k.sign).split("\n\n")[1]
    note = parse_note("a\n\nb\n\n" + sig)
    assert note.body == "a\n\nb\n"


def test_checkpoint_arguments_are_checked() -> None:
    with pytest.raises(NoteError):
        checkpoint_body("", 1, ROOT)
    with pytest.raises(NoteError):
        checkpoint_body("a\nb", 1, ROOT)
    with pytest.raises(NoteError):
        checkpoint_body(ORIGIN, -1, ROOT)
    with pytest.raises(NoteError):
        checkpoint_body(ORIGIN, True, ROOT)
    with pytest.raises(NoteError):
        checkpoint_body(ORIGIN, 1, ROOT[:31])
    with pytest.raises(NoteError):
        key_id("bad name", go_key().public_key())


def test_a_witness_counts_once_and_only_at_a_time_it_could_have_signed(
        key: Ed25519PrivateKey) -> None:
    """tlog-cosignature: one statement per (name, key); a timestamp is below 2^63, and
    one from the future says nothing yet."""
    text = checkpoint(key)
    body = checkpoint_body(ORIGIN, 42, ROOT)
    witness = Ed25519PrivateKey.generate()
    vkey = cosigner_key("witness.example", witness.public_key())

    def line(ts: int) -> str:  # as a witness (or a hostile one) writes it
        sig = witness.sign(f"cosignature/v1\ntime {ts}\n{body}".encode())
        blob = base64.b64encode(vkey.key_id + ts.to_bytes(8, "big") + sig).decode()
        return f"\u2014 witness.example {blob}\n"

    assert line(1_700_000_000) == cosign(body, "witness.example", witness, 1_700_000_000)
    twice = text + line(1_700_000_000) + line(1_700_000_000) + line(1_700_000_001)
    assert valid_cosignatures(twice, [vkey]) == [line(1_700_000_000)]
    assert valid_cosignatures(text + line(2**63), [vkey]) == []
    assert valid_cosignatures(text + line(2**63 - 1), [vkey]) == [line(2**63 - 1)]
    assert valid_cosignatures(text + line(2**63 - 1), [vkey], not_after=1_800_000_000) == []


def test_an_origin_other_than_the_checkpoints_is_said_as_such(key: Ed25519PrivateKey) -> None:
    """A web view trial gave `--origin other.example/log`: the refusal said the note had
    no signature "with a trusted key", and the key was right. It names the origin."""
    from ca.audit.verify.checkpoint import PinnedKey
    pinned = PinnedKey(key.public_key(), "other.example/log", "other.example/log")
    with pytest.raises(NoteError) as said:
        pinned.verify(checkpoint(key))
    assert str(said.value) == (f"this checkpoint's origin is {ORIGIN!r}, not "
                               f"'other.example/log' (--origin, or the state's): give "
                               f"--origin {ORIGIN} if "
                               "that is the log you mean to verify (of a cluster's node, the "
                               "part before its name: --origin is the CA's [audit] origin)"
                               ), said.value
    assert PinnedKey(key.public_key(), ORIGIN, ORIGIN).verify(checkpoint(key)).size == 42
