"""One root exception for the package; errors carry the data a reply or log needs."""

from __future__ import annotations


class AthomeError(Exception):
    """Root of every error athome-ops raises on purpose."""


class ConfigError(AthomeError):
    """The configuration or the inventory is unusable; `problems` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) or "invalid configuration")


class GrammarError(AthomeError):
    """A command subject that does not follow the grammar.

    `message` is for the requester (Brazilian Portuguese), `example` is a
    correct command of the same kind, `command` the command name when known.
    """

    def __init__(self, message: str, example: str = "", command: str | None = None):
        self.message = message
        self.example = example
        self.command = command
        super().__init__(message)


class AuthError(AthomeError):
    """The sender or the token is not accepted. `reason` ('sender' or 'token') and `detail`
    (for tokens, a code of auth.TOKEN_PROBLEMS) are stable codes; `token_id` names the
    entry when one was found (for the log only, never for the requester)."""

    def __init__(self, reason: str, detail: str = "", token_id: str = ""):
        self.reason = reason
        self.detail = detail
        self.token_id = token_id
        super().__init__(f"{reason}: {detail}" if detail else reason)


class QueueError(AthomeError):
    """The durable queue refused an operation (unknown id, corrupt record...)."""


class TransportError(AthomeError):
    """Mail could not be read or sent right now (retry later)."""


class PermanentTransportError(TransportError):
    """The mail server refused for good (5xx): retrying would not help."""
