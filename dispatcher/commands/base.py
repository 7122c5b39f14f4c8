"""What every command definition provides; see docs/ARCHITECTURE.md, "Adding a command"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.audit import AuditLog
    from dispatcher.auth import SenderWhitelist, TokenStore
    from dispatcher.grammar import ParseContext
    from dispatcher.inventory import Inventory
    from dispatcher.jobqueue import DirQueue
    from dispatcher.runner import PlaybookResult

# Who may run a command (CommandSpec.permission).
ALWAYS = "always"  # any valid token (HELP, STATUS)
TOKEN = "token"  # noqa: S105 - a token whose scope carries the command (or has no scope)
ADMIN = "admin"  # an admin token only
# The lock name of work done on the controller itself (plays on localhost).
CONTROLLER = "localhost"


@dataclass(frozen=True)
class AnswerContext:
    """What a dispatcher-side command may read or change while answering (no playbook)."""

    sender: str
    admin: bool
    request_id: str
    specs: Sequence[CommandSpec]
    jobs: DirQueue
    whitelist: SenderWhitelist
    store: TokenStore  # the tokens
    audit: AuditLog


@dataclass(frozen=True)
class Answer:
    """A dispatcher-side command's reply: templates/<template>.*.j2 with these values."""

    template: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """A parsed, validated command. `params` is JSON-serialisable and goes into the queue."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # canonical form, echoed back to the requester


class CommandSpec:
    """One command's whole definition: head words, grammar, who may run it, its playbook
    (with extravars and reply template) or its dispatcher-side `answer`.

    Subclasses set the class attributes and implement `parse`; commands that run a
    playbook implement `extravars` (and `limit` when they target one host); commands
    without one implement `answer`.
    """

    name: str = ""
    order: int = 50  # its place in HELP (and in the registry): lower first
    aliases: tuple[str, ...] = ()  # other head words (AJUDA for HELP)
    # 'keywords': HEAD=value KEY=value ...; 'words': HEAD arg arg (HELP, STATUS <id>, ...)
    form: str = "keywords"
    extra_chars: str = ""  # characters beyond grammar's base set that the command needs ('@')
    permission: str = TOKEN
    summary: str = ""  # one line, pt-BR, for HELP
    syntax: str = ""  # the grammar as users type it
    example: str = ""  # a correct subject after the token
    playbook: str | None = None  # None: answered by the dispatcher itself (`answer`)
    template: str = "result"  # replies: templates/<template>.txt.j2 and .html.j2
    # Its playbook reports per host `changed` in check mode, so it can be confirmed by
    # reply (commands.<NAME>.confirm in the config): a check run first, the real one on CONFIRMAR.
    confirmable: bool = False
    # Seconds its playbook may run before it is stopped (None: worker.playbook_timeout).
    run_timeout: int | None = None
    # Hosts of controller-side plays (input checks on localhost) that are not
    # part of the answer; a command whose work runs on the controller clears it.
    ignore_hosts: tuple[str, ...] = ("localhost",)

    @property
    def heads(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def admin_only(self) -> bool:
        return self.permission == ADMIN

    def answer(self, cmd: Command, ctx: AnswerContext) -> Answer:
        """The reply of a command the dispatcher answers itself (playbook None)."""
        raise NotImplementedError

    def relevant(self, result: PlaybookResult) -> PlaybookResult:
        """The result without the hosts that are not part of the answer."""
        return result.without(self.ignore_hosts)

    def parse(self, text: str, ctx: ParseContext) -> Command:
        raise NotImplementedError

    def extravars(self, cmd: Command, request_id: str, requester: str) -> dict[str, Any]:
        return {"request_id": request_id}

    def limit(self, cmd: Command) -> str | None:
        return None

    def hosts(self, cmd: Command, inventory: Inventory) -> frozenset[str]:
        """The hosts its playbook touches, as the current inventory resolves them: the
        worker holds a lock on each while it runs, so two jobs never touch one host at
        once. A playbook command that does not say locks every host (safe, not parallel);
        dispatcher-side commands never reach the worker."""
        return frozenset(inventory.hosts) | {CONTROLLER}

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
