"""An observer for the processes of a daemon under test, loaded by Python at start-up
when this directory is on PYTHONPATH and HSMCA_TEST_TRACE names a file
(tests/test_audit_durable.py). It changes nothing the daemon does; it writes down,
in that one file shared by the primary and its workers:

    flush <pid> <bytes> <path>     after os.fsync/os.fdatasync of a file returned
                                   (<bytes>: the file's size when it was asked)
    sign-for <pid> <intent seq>    when hsm.session.HSM.sign is asked to sign
    C_Sign <pid>                   just before python-pkcs11 calls C_SignInit/C_Sign

Each record is one write(2) to a file opened with O_APPEND, so the order of the
records is the order of the events, across processes: a flush is recorded after it
happened, a C_Sign before it happens, and whatever one process learns from another
(an intent's seq, over the recorder's channel) it learns after the other wrote.
"""

from __future__ import annotations

import os
from typing import Any

_TRACE = os.environ.get("HSMCA_TEST_TRACE")


def _install(trace: str) -> None:
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def note(*fields: object) -> None:
        os.write(fd, (" ".join(map(str, fields)) + "\n").encode())

    def observed(real: Any) -> Any:
        def flush(f: Any) -> None:
            fileno = f if isinstance(f, int) else f.fileno()
            size = os.fstat(fileno).st_size
            path = os.readlink(f"/proc/self/fd/{fileno}")
            real(f)
            note("flush", os.getpid(), size, path)
        return flush

    os.fsync = observed(os.fsync)
    os.fdatasync = observed(os.fdatasync)

    import pkcs11._pkcs11 as p11

    from hsm.session import HSM

    real_c_sign = p11.SignMixin._sign

    def c_sign(self: Any, *args: Any, **kw: Any) -> Any:
        note("C_Sign", os.getpid())
        return real_c_sign(self, *args, **kw)

    p11.SignMixin._sign = c_sign
    real_sign = HSM.sign

    def sign(self: Any, label: str, scheme: Any, message: bytes, intent_seq: int) -> bytes:
        note("sign-for", os.getpid(), intent_seq)
        return real_sign(self, label, scheme, message, intent_seq)

    HSM.sign = sign  # type: ignore[method-assign]


if _TRACE:
    _install(_TRACE)
