"""What to do with one incoming message: `decide(message, context) -> Decision`.

Pure: everything it reads is in the message and the `Context` (a snapshot the service
builds for that message: the time, the policy from the config, the whitelist, the
tokens, the sender's lock-out, the inventory as the grammar sees it, the codes of the
requests waiting for confirmation), and it changes nothing. The service's executor
(`Dispatcher._execute`) does every write: the job, the reply, the lock-out count, the
admin alerts, the audit record. So the whole policy is tested as a table
(tests/test_decide.py), and deciding a message twice (after a crash) is harmless.

Order, cheapest refusal first:
  screening      automatic mail, duplicated identity headers, a reply to our own mail
                 without a token or code, an unreadable From, a sender not on the
                 whitelist: ignored, no reply (no backscatter)
  provenance     Authentication-Results (DMARC/aligned DKIM) when required
  freshness      the Date header within the window
  lock-out       a sender locked out after bad tokens: refused without a token check
  confirmation   `CONFIRMAR <code>` (no token: the code is the capability)
  token          bound to this sender, enabled, not expired
  grammar        the command as the registry parses it against the inventory
  permission     the token's scope / admin
then a dispatcher-side answer (HELP, STATUS, WHITELIST) or a job (check run first when
the command must be confirmed).
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dispatcher import commands, grammar, mailauth
from dispatcher.auth import (
    TOKEN_PROBLEMS,
    Identity,
    TokenEntry,
    check_token,
    domain_of,
    may_run,
    sender_address,
)
from dispatcher.commands import Command
from dispatcher.errors import AuthError, GrammarError
from dispatcher.mail import MAX_RAW_SUBJECT, Incoming, answers_us


class Action(enum.Enum):
    IGNORE = "ignore"  # screened out: an audit record, no reply
    REFUSE = "refuse"  # a refusal to the requester (stale Date, locked out)
    UNAUTHENTICATED = "unauthenticated"  # a forged or unauthenticated whitelisted From
    BAD_TOKEN = "bad-token"  # noqa: S105 - an action, not a secret. Counts towards the lock-out; admins alerted
    BAD_CODE = "bad-code"  # a confirmation code not accepted; counts like a bad token
    REJECT = "reject"  # the command does not parse: what was wrong and the correct form
    DENY = "deny"  # the token may not run this command
    ANSWER = "answer"  # a dispatcher-side command answers (no playbook)
    QUEUE = "queue"  # a job for the worker
    CONFIRM = "confirm"  # a waiting job confirmed: it runs


@dataclass(frozen=True)
class Policy:
    """The part of the configuration that decides."""

    ar_required: bool = True
    trusted_authserv_ids: tuple[str, ...] = ()
    max_age: timedelta = timedelta(hours=24)
    max_future: timedelta = timedelta(minutes=10)
    confirm: frozenset[str] = frozenset()  # commands confirmed by reply
    local_time: Callable[[float], str] = str  # a time as requesters read it


@dataclass(frozen=True)
class Waiting:
    """A request waiting for `CONFIRMAR <code>`."""

    job_id: str
    code: str
    requester: str
    expires: float  # epoch seconds
    command: str = ""


@dataclass(frozen=True)
class Context:
    now: datetime  # aware
    policy: Policy
    senders: frozenset[str]  # the whitelist, lower case
    tokens: Sequence[TokenEntry] = ()
    token_lookup: Callable[[str], str] = str  # a token's HMAC under the server key
    parse_context: grammar.ParseContext = field(default_factory=grammar.ParseContext)
    locked_until: float = 0.0  # the From address's lock-out (epoch seconds; 0: none)
    waiting: Sequence[Waiting] = ()  # filled only when the subject carries a code


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # English, for the log and the audit trail
    sender: str = ""
    masked: str = ""  # the subject with the token masked (what replies echo)
    verdict: str = ""  # the provenance check's reason, when it ran
    identity: Identity | None = None
    command: Command | None = None
    command_name: str = ""  # also for a rejection: which command's form to show
    reply: dict[str, Any] = field(default_factory=dict)  # template values (pt-BR)
    token_error: AuthError | None = None  # BAD_TOKEN
    job_id: str = ""  # CONFIRM: the waiting request
    check_first: bool = False  # QUEUE: a check run, the real one after CONFIRMAR

    def audit(self) -> dict[str, Any]:
        """Its fields for the audit trail (never a token or a code)."""
        out: dict[str, Any] = {}
        if self.reason:
            out["reason"] = self.reason
        if self.verdict:
            out["verdict"] = self.verdict
        token_id = (
            self.identity.token_id
            if self.identity
            else (self.token_error.token_id if self.token_error else "")
        )
        if token_id:
            out["token_id"] = token_id
        if self.command is not None:
            out["command"] = self.command.text
        if self.command_name:
            out["command_name"] = self.command_name
        if self.job_id:
            out["confirms"] = self.job_id
        return out


def screen(msg: Incoming, senders: frozenset[str]) -> tuple[str, str]:
    """(sender, '') for a message worth deciding on, ('', why) for one ignored without
    a reply: automatic mail, a duplicated identity header, a reply to our own mail without
    a token or code, an unreadable From, a sender not on the whitelist."""
    if msg.automated:
        return "", f"automatic mail ({msg.automated})"
    if msg.duplicated:
        # DKIM verifies the bottom-most copy of a header, we would read the topmost: a
        # copy added above a signed one could change the command or its date.
        return "", f"more than one {'/'.join(msg.duplicated)} header"
    no_token = grammar.lenient_token(msg.subject).token is None
    if no_token and answers_us(msg) and grammar.find_confirmation(msg.subject) is None:
        return "", "a reply to our own mail without a token"  # a person said thanks: no alarm
    try:
        sender = sender_address(msg.from_header)
    except AuthError as exc:
        return "", exc.detail
    if sender not in senders:
        return "", "not on the whitelist"
    return sender, ""


def decide(msg: Incoming, ctx: Context) -> Decision:
    sender, why = screen(msg, ctx.senders)
    if not sender:
        return Decision(Action.IGNORE, why)
    policy = ctx.policy
    subject_error = None
    try:
        if msg.subject_cut:  # only its beginning was read (mail.MAX_RAW_SUBJECT)
            too_long = f"O assunto tem mais de {MAX_RAW_SUBJECT} caracteres"
            raise GrammarError(f"{too_long}; o máximo aceito é {grammar.MAX_SUBJECT_CHARS}.")
        found = grammar.find_token(msg.subject)
    except GrammarError as exc:
        found, subject_error = grammar.lenient_token(msg.subject), exc
    masked = grammar.mask_subject(msg.subject, found.token)
    verdict = ""
    if policy.ar_required:
        checked = mailauth.verify_sender_cached(
            tuple(msg.auth_results[:1]), domain_of(sender), tuple(policy.trusted_authserv_ids)
        )
        verdict = checked.reason
        if not checked.ok:
            return Decision(Action.UNAUTHENTICATED, f"not authenticated ({verdict})", sender, masked, verdict)
    fresh = mailauth.check_date(msg.date, ctx.now, policy.max_age, policy.max_future)
    if not fresh.ok:
        return Decision(
            Action.REFUSE,
            f"Date {msg.date!r} outside the freshness window",
            sender,
            masked,
            verdict,
            reply={
                "headline": "Comando recusado: mensagem fora do prazo",
                "problem": fresh.reason,
                "advice": "Envie o comando de novo em um e-mail novo (não reenvie nem encaminhe o antigo).",
            },
        )
    if ctx.locked_until > ctx.now.timestamp():
        return Decision(
            Action.REFUSE,
            "sender locked out after bad tokens (token not checked)",
            sender,
            masked,
            verdict,
            reply={
                "headline": "Comando recusado: remetente bloqueado",
                "problem": f"{TOKEN_PROBLEMS['locked']}, até {policy.local_time(ctx.locked_until)}",
                "advice": "Os administradores foram avisados. Se não foi você quem enviou os comandos com "
                "token inválido, avise-os: alguém pode estar tentando usar o seu endereço.",
            },
        )
    if found.token is None:
        code = grammar.find_confirmation(msg.subject)
        if code is not None:  # the code is the capability: no token, the same authentication
            return _confirmation(code, sender, masked, verdict, ctx)
    try:
        if found.problem == "malformed":
            raise AuthError("token", "malformed")
        entry = check_token(ctx.tokens, ctx.token_lookup, found.token, sender, ctx.now.timestamp())
    except AuthError as exc:
        if exc.detail == "malformed" and found.problem == "malformed":
            problem = found.hint
        else:
            problem = TOKEN_PROBLEMS.get(exc.detail, TOKEN_PROBLEMS["unknown"])
        return Decision(
            Action.BAD_TOKEN,
            f"token {exc.detail}",
            sender,
            masked,
            verdict,
            token_error=exc,
            reply={"problem": problem},
        )
    identity = Identity.of(sender, entry)
    try:
        if subject_error is not None:
            subject_error.example = subject_error.example or commands.examples()
            raise subject_error
        cmd = commands.parse(found.text, ctx.parse_context)
    except GrammarError as exc:
        # The message may quote what was typed (a token in the wrong place): masked too.
        problem = grammar.mask_text(exc.message, found.token)
        return Decision(
            Action.REJECT,
            problem,
            sender,
            masked,
            verdict,
            identity,
            command_name=exc.command or "",
            reply={"problem": problem, "example": exc.example},
        )
    spec = commands.spec_for(cmd.name)
    if not may_run(identity, cmd.name, spec.permission):
        return Decision(
            Action.DENY, f"the token may not run {cmd.name}", sender, masked, verdict, identity, cmd, cmd.name
        )
    if spec.playbook is None:
        return Decision(Action.ANSWER, "", sender, masked, verdict, identity, cmd, cmd.name)
    return Decision(
        Action.QUEUE,
        "",
        sender,
        masked,
        verdict,
        identity,
        cmd,
        cmd.name,
        check_first=cmd.name in policy.confirm,
    )


def _confirmation(code: str, sender: str, masked: str, verdict: str, ctx: Context) -> Decision:
    """`CONFIRMAR <code>`: the sender's own waiting request with that code, in time. A
    wrong, expired, reused or foreign code gets one answer that does not say which."""
    match = next((w for w in ctx.waiting if code and hmac.compare_digest(w.code, code)), None)
    if match is not None and match.requester == sender and match.expires > ctx.now.timestamp():
        return Decision(
            Action.CONFIRM,
            "confirmed",
            sender,
            masked,
            verdict,
            command=Command("", text=match.command) if match.command else None,
            job_id=match.job_id,
        )
    return _bad_code(sender, masked, verdict)


def bad_code(confirmation: Decision) -> Decision:
    """A CONFIRM whose request stopped waiting before it could run (expired or confirmed
    by another message meanwhile): refused like any code not accepted."""
    return _bad_code(confirmation.sender, confirmation.masked, confirmation.verdict)


def _bad_code(sender: str, masked: str, verdict: str) -> Decision:
    return Decision(
        Action.BAD_CODE,
        "confirmation code wrong, expired, used or another sender's",
        sender,
        masked,
        verdict,
        reply={
            "headline": "Confirmação não aceita",
            "problem": "o código de confirmação está errado, expirou, já foi usado ou não é de um pedido seu",
            "advice": "Nada foi executado. Confira o código no e-mail de confirmação, ou envie o comando de "
            "novo para receber um código novo.",
        },
    )
