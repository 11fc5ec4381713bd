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


class ClientError(Exception):
    """The daemon refused or could not be reached, or a local check failed; the
    message says which and why. `retryable`: trying again later may succeed (the CA
    is away or overloaded), as opposed to a refusal or a local mistake."""

    def __init__(self, message: str, *, status: int | None = None,
                 retryable: bool = False, unanswered: bool = False,
                 detail: str | None = None, full: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.full = full  # a local disk full (or over quota): room may come by itself
        self.detail = detail  # the daemon's own words for a refusal, without the request
        self.retryable = retryable
        # The request may have reached the daemon, which may have carried it out, but no
        # answer came back (the connection closed, or none within the time): a caller of
        # a request that is not idempotent says to look before trying again.
        self.unanswered = unanswered


class NotDone(Exception):
    """The daemon could not carry out an operator's request for a reason of its host (a
    file it must write, the HSM's own storage), with nothing of it recorded: answered
    503 with these words, which say what to free or fix, then to try again."""


class PrimaryUnavailable(Exception):
    """A worker's question to the daemon's primary process went unanswered within its
    bound (the primary stopped or stuck): answered 503, with these words."""
