"""Errors shared across the CLI and the library."""

from __future__ import annotations


class CLIError(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""

    exit_status = 1


class GaveUp(CLIError):
    """What retrying cannot fix, in a command that runs for good and retries the rest
    (`renew --daemon`, `ssh host --renew`): a refusal, a revoked, expired or foreign
    certificate. Exit status 3, which the documented systemd units name in
    RestartPreventExitStatus: started again every minute, it would only ask the CA the
    same question, and `systemctl --failed` would never show it."""

    exit_status = 3
