"""docs/audit-log.md's worked example must stay true: auditors copy from it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca.audit.merkle import MerkleTree, leaf_hash
from ca.audit.note import verify_checkpoint
from ca.audit.verify import verify_log

DOC = (Path(__file__).resolve().parent.parent / "docs" / "audit-log.md").read_text()


def test_worked_example_verifies() -> None:
    example = DOC[DOC.index("## Worked example"):]
    blocks = re.findall(r"```\n(.*?)```", example, re.S)
    lines_text, pem, note, signing_text = blocks[0], blocks[1], blocks[2], blocks[3]
    lines = lines_text.encode().splitlines()
    assert len(lines) == 3
    key = load_pem_public_key(pem.encode())
    signing = signing_text.encode().splitlines()
    for seq, line in enumerate(lines + signing):
        assert f"| {seq} | `{hashlib.sha256(line).hexdigest()}` | `{leaf_hash(line).hex()}` |" \
            in example
    root = MerkleTree([leaf_hash(line) for line in lines]).root()
    assert f"`{root.hex()}`" in example
    cp = verify_checkpoint(note, "ca.example/hsmca-audit", key)  # type: ignore[arg-type]
    assert cp.size == 3 and cp.root == root
    # The checkpoint's own signing follows the lines it covers; a log without it was cut.
    cut = verify_log(lines_text.encode(), key, "ca.example/hsmca-audit",  # type: ignore[arg-type]
                     latest_checkpoint=note)
    assert (cut.ok, cut.bad_seq) == (False, 3) and (cut.reason or "").startswith(
        "cut: the latest checkpoint covers 3 lines"), cut
    assert "`FAILED at seq 3 (line 4 of the file): cut: the latest checkpoint covers 3\nlines" \
        in example
    result = verify_log((lines_text + signing_text).encode(), key,  # type: ignore[arg-type]
                        "ca.example/hsmca-audit", latest_checkpoint=note)
    assert result.ok, result.reason
    assert (result.lines, result.checkpoints, result.closing) == (5, 2, 2)
    assert "`OK: 5 lines, 2\ncheckpoints verified; the last 2 lines" in example
