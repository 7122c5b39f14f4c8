"""What every command definition provides; see docs/ARCHITECTURE.md, "Adding a command"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.grammar import ParseContext
    from dispatcher.runner import PlaybookResult


@dataclass(frozen=True)
class Command:
    """A parsed, validated command. `params` is JSON-serialisable and goes into the queue."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # canonical form, echoed back to the requester


class CommandSpec:
    """One command's whole definition: grammar, who may run it, playbook, extravars, replies.

    Subclasses set the class attributes and implement `parse`; commands that
    run a playbook implement `extravars` (and `limit` when they target one host).
    """

    name: str = ""
    summary: str = ""  # one line, pt-BR, for HELP
    syntax: str = ""  # the grammar as users type it
    example: str = ""  # a correct subject after the token
    playbook: str | None = None  # None: answered by the dispatcher itself (HELP, STATUS)
    template: str = "result"  # replies: templates/<template>.txt.j2 and .html.j2
    admin_only: bool = False
    # Hosts of controller-side plays (input checks on localhost) that are not
    # part of the answer; a command whose work runs on the controller clears it.
    ignore_hosts: tuple[str, ...] = ("localhost",)

    def relevant(self, result: PlaybookResult) -> PlaybookResult:
        """The result without the hosts that are not part of the answer."""
        return result.without(self.ignore_hosts)

    def parse(self, text: str, ctx: ParseContext) -> Command:
        raise NotImplementedError

    def extravars(self, cmd: Command, request_id: str, requester: str) -> dict[str, Any]:
        return {"request_id": request_id}

    def limit(self, cmd: Command) -> str | None:
        return None

    def outcome(self, cmd: Command, result: PlaybookResult) -> str:
        """'success', 'partial' or 'failed' for the reply's headline."""
        if result.succeeded:
            return "success"
        if any(h.succeeded for h in result.hosts.values()):
            return "partial"
        return "failed"

    def transient(self, cmd: Command, result: PlaybookResult) -> bool:
        """Worth another attempt later: timed out, or nothing succeeded and a host was unreachable."""
        if result.status == "timeout":
            return True
        nothing_done = not any(h.succeeded for h in result.hosts.values())
        return nothing_done and bool(result.unreachable)
