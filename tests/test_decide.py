"""`decide(message, context)` as a table: every way a message is ignored, refused,
rejected, denied, answered, queued or confirmed, with no server and no file behind it.
The integration tests (test_sender_authenticity, test_service, test_whitelist) prove the
executor carries each decision out over real IMAP/SMTP."""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from dispatcher import decide
from dispatcher.auth import TokenStore
from dispatcher.decide import Action, Context, Policy, Waiting
from dispatcher.grammar import HostFacts, ParseContext
from dispatcher.mail import incoming_from_headers
from tests.messages import AUTHSERV, command_message, passing_results

ANA, BOB, EVE, ADMIN = "ana@example.test", "bob@example.test", "eve@example.test", "root@example.test"
NOW = datetime(2025, 11, 4, 12, 0, tzinfo=timezone.utc)
HOSTS = ParseContext(
    hosts={
        "voip1": HostFacts("voip1", frozenset({"sip_servers", "fail2ban_servers", "recordings"})),
        "gv2p": HostFacts("gv2p", frozenset({"sip_servers", "fail2ban_servers", "mac_servers"})),
    }
)
RAMAIS = "RAMAIS=1121 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=02/11/2025 23:59"
MAC = "MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p"
CODE = "7K3QX9MZ"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokens made the real way (hashed, bound), then only their snapshot is used."""
    store = TokenStore(tmp_path_factory.mktemp("tokens") / "tokens.json")
    store.key.get(create=True)
    tokens = {}
    for name, kwargs in {
        "ana": {"senders": [ANA]},
        "bob": {"senders": [BOB]},
        "ana-ramais": {"senders": [ANA], "commands": ["RAMAIS"]},
        "admin": {"senders": [ADMIN], "admin": True},
        "off": {"senders": [ANA]},
        "old": {"senders": [ANA]},
    }.items():
        entry, tokens[name] = store.add(name, **kwargs)
        if name == "off":
            store.set_enabled(entry.id, False)
        if name == "old":
            store._update(entry.id, lambda e: setattr(e, "expires", NOW.timestamp() - 60))
    ctx = Context(
        now=NOW,
        policy=Policy(
            ar_required=True,
            trusted_authserv_ids=(AUTHSERV,),
            max_age=timedelta(hours=24),
            max_future=timedelta(minutes=10),
            confirm=frozenset({"MACCHANGE"}),
        ),
        senders=frozenset({ANA, BOB, ADMIN}),
        tokens=tuple(store.entries()),
        token_lookup=store.lookup,
        parse_context=HOSTS,
        waiting=(
            Waiting("R-ANA", CODE, ANA, NOW.timestamp() + 600, MAC),
            Waiting("R-OLD", "QQQQ2222", ANA, NOW.timestamp() - 1, MAC),
            Waiting("R-BOB", "BBBB3333", BOB, NOW.timestamp() + 600, MAC),
        ),
    )
    return tokens, ctx


def message(subject: str, sender: str = ANA, **kw):
    kw.setdefault("date", NOW.timestamp() - 60)
    return incoming_from_headers("1", command_message(subject, sender, "<m1@example.test>", **kw))


# (case, subject with {name} for a token, message kwargs, context changes, action, reason part)
TABLE = [
    # screening: ignored, no reply
    ("automatic mail", "[{ana}] HELP", {"Auto_Submitted": "auto-replied"}, {}, Action.IGNORE, "automatic"),
    ("bounce", "[{ana}] HELP", {"sender": "MAILER-DAEMON@example.test"}, {}, Action.IGNORE, "automatic"),
    (
        "a reply to our mail without a token",
        "Re: ✅ CHECKIP concluído",
        {"References": "<1.2.athome-ops@example.test>"},
        {},
        Action.IGNORE,
        "reply to our own",
    ),
    ("not on the whitelist", "[{ana}] HELP", {"sender": EVE}, {}, Action.IGNORE, "not on the whitelist"),
    (
        "whitelist is exact",
        "[{ana}] HELP",
        {"sender": "ana@example.test.evil"},
        {},
        Action.IGNORE,
        "whitelist",
    ),
    # provenance
    ("no Authentication-Results", "[{ana}] HELP", {"results": None}, {}, Action.UNAUTHENTICATED, ""),
    (
        "spf=pass alone",
        "[{ana}] HELP",
        {"results": f"{AUTHSERV}; spf=pass smtp.mailfrom={ANA}"},
        {},
        Action.UNAUTHENTICATED,
        "spf",
    ),
    (
        "results from an untrusted server",
        "[{ana}] HELP",
        {"results": passing_results(ANA, "mx.evil.test")},
        {},
        Action.UNAUTHENTICATED,
        "",
    ),
    ("results not required", "[{ana}] HELP", {"results": None}, {"ar_required": False}, Action.ANSWER, ""),
    # freshness
    ("Date a day old", "[{ana}] HELP", {"date": NOW.timestamp() - 86400 - 60}, {}, Action.REFUSE, "Date"),
    ("Date in the future", "[{ana}] HELP", {"date": NOW.timestamp() + 3600}, {}, Action.REFUSE, "Date"),
    ("no Date", "[{ana}] HELP", {"date": "not a date"}, {}, Action.REFUSE, "Date"),
    # lock-out: refused before the token is checked, even the right one
    ("locked out", "[{ana}] HELP", {}, {"locked_until": 1}, Action.REFUSE, "locked out"),
    ("lock-out over", "[{ana}] HELP", {}, {"locked_until": -1}, Action.ANSWER, ""),
    # tokens
    ("no token", "CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token missing"),
    ("malformed token", "[12-34] CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token malformed"),
    ("unknown token", "[0123456789ABCDEF] CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token unknown"),
    ("another sender's token", "[{bob}] CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token not-bound"),
    ("disabled token", "[{off}] CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token disabled"),
    ("expired token", "[{old}] CHECKIP=3.3.3.3", {}, {}, Action.BAD_TOKEN, "token expired"),
    # grammar
    ("unknown command", "[{ana}] REBOOT=gv2p", {}, {}, Action.REJECT, ""),
    ("bad IP", "[{ana}] CHECKIP=3.3.3", {}, {}, Action.REJECT, "IP inválido"),
    ("unknown server", "[{ana}] " + MAC.replace("gv2p", "gv9x"), {}, {}, Action.REJECT, "gv9x"),
    # permission
    ("outside the token's scope", "[{ana-ramais}] CHECKIP=3.3.3.3", {}, {}, Action.DENY, "CHECKIP"),
    ("within the token's scope", "[{ana-ramais}] " + RAMAIS, {}, {}, Action.QUEUE, ""),
    ("admin command, plain token", "[{ana}] WHITELIST LIST", {}, {}, Action.DENY, "WHITELIST"),
    ("admin command, admin token", "[{admin}] WHITELIST LIST", {"sender": ADMIN}, {}, Action.ANSWER, ""),
    # answered by the dispatcher, or queued
    ("HELP", "[{ana}] HELP", {}, {}, Action.ANSWER, ""),
    ("AJUDA", "[{ana}] AJUDA", {}, {}, Action.ANSWER, ""),
    ("STATUS", "[{ana}] STATUS 20251111_171215_482913_a1", {}, {}, Action.ANSWER, ""),
    ("CHECKIP", "[{ana}] CHECKIP=3.3.3.3", {}, {}, Action.QUEUE, ""),
    ("CHECKIP in a reply", "RE: [{ana}] CHECKIP=3.3.3.3", {}, {}, Action.QUEUE, ""),
    # confirmation by reply: no token, the same authentication
    ("right code", f"CONFIRMAR {CODE}", {}, {}, Action.CONFIRM, "confirmed"),
    (
        "right code, replying to our mail",
        f"Re: ✋ Confirme o MACCHANGE — CONFIRMAR {CODE}",
        {"References": "<1.2.athome-ops@example.test>"},
        {},
        Action.CONFIRM,
        "confirmed",
    ),
    ("code in lower case", f"confirmar {CODE.lower()}", {}, {}, Action.CONFIRM, "confirmed"),
    ("wrong code", "CONFIRMAR 7K3QX9MA", {}, {}, Action.BAD_CODE, "code"),
    ("expired code", "CONFIRMAR QQQQ2222", {}, {}, Action.BAD_CODE, "code"),
    ("another sender's code", "CONFIRMAR BBBB3333", {}, {}, Action.BAD_CODE, "code"),
    ("a code, sender locked out", f"CONFIRMAR {CODE}", {}, {"locked_until": 1}, Action.REFUSE, "locked"),
    ("a code, not authenticated", f"CONFIRMAR {CODE}", {"results": None}, {}, Action.UNAUTHENTICATED, ""),
]


def context_for(ctx: Context, changes: dict) -> Context:
    changes = dict(changes)
    if "ar_required" in changes:
        ctx = replace(ctx, policy=replace(ctx.policy, ar_required=changes.pop("ar_required")))
    if "locked_until" in changes:  # +1: locked for another hour; -1: the lock-out ended a minute ago
        changes["locked_until"] = NOW.timestamp() + 3600 * changes["locked_until"]
    return replace(ctx, **changes)


@pytest.mark.parametrize(
    ("case", "subject", "kwargs", "changes", "action", "reason"), TABLE, ids=[r[0] for r in TABLE]
)
def test_decide(world, case, subject, kwargs, changes, action, reason):
    tokens, ctx = world
    kwargs = dict(kwargs)
    sender = kwargs.pop("sender", ANA)
    d = decide.decide(message(subject.format(**tokens), sender, **kwargs), context_for(ctx, changes))
    assert d.action is action, d
    assert reason in d.reason
    for token in tokens.values():  # nothing a decision keeps (and the audit record) holds a token
        assert token not in repr(d) and token not in repr(d.audit())


def test_queued_commands_carry_what_the_job_needs(world):
    tokens, ctx = world
    d = decide.decide(message(f"[{tokens['ana']}] {MAC}"), ctx)
    assert d.action is Action.QUEUE and d.check_first, "MACCHANGE is confirmed by reply in this policy"
    assert d.command.name == "MACCHANGE" and d.command.params["server"] == "gv2p"
    assert d.identity.sender == ANA and d.identity.token_id
    assert d.masked == f"[********] {MAC}"
    no_confirm = replace(ctx, policy=replace(ctx.policy, confirm=frozenset()))
    assert not decide.decide(message(f"[{tokens['ana']}] {MAC}"), no_confirm).check_first
    audit = d.audit()
    assert audit["command_name"] == "MACCHANGE" and audit["token_id"] == d.identity.token_id
    assert audit["verdict"] == "dkim=pass d=example.test aligned with example.test (mx.example.test)"


def test_a_confirmation_names_the_waiting_request(world):
    _, ctx = world
    d = decide.decide(message(f"CONFIRMAR {CODE}"), ctx)
    assert d.job_id == "R-ANA" and d.audit()["confirms"] == "R-ANA" and CODE not in repr(d.audit())
    late = decide.bad_code(d)
    assert late.action is Action.BAD_CODE and late.sender == ANA and late.reply["headline"]


def test_refusals_say_what_was_wrong_in_portuguese(world):
    tokens, ctx = world
    stale = decide.decide(message("[{ana}] HELP".format(**tokens), date=NOW.timestamp() - 90000), ctx)
    assert "fora do prazo" in stale.reply["headline"] and stale.reply["advice"]
    unknown = decide.decide(message("[0123456789ABCDEF] HELP"), ctx)
    assert "token desconhecido" in unknown.reply["problem"]
    rejected = decide.decide(message("[{ana}] CHECKIP=3.3.3".format(**tokens)), ctx)
    assert rejected.reply["example"] and "CHECKIP=" in rejected.reply["example"]
    locked = decide.decide(message("[{ana}] HELP".format(**tokens)), context_for(ctx, {"locked_until": 1}))
    assert "bloqueado" in locked.reply["problem"]


def test_decide_is_pure(world):
    """No file, socket or process is touched while deciding (after the first call has
    loaded what modules cache at first use, such as the Public Suffix List), and the same
    message in the same context gets the same decision."""
    tokens, ctx = world
    subjects = [row[1].format(**tokens) for row in TABLE]
    for subject in subjects:
        decide.decide(message(subject), ctx)
    messages = [message(s) for s in subjects]
    touched: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event.split(".")[0] in ("open", "os", "socket", "subprocess", "shutil"):
            touched.append(f"{event} {args[:1]}")

    sys.addaudithook(hook)  # cannot be removed: `watching` turns it off
    try:
        first = [decide.decide(m, ctx) for m in messages]
        second = [decide.decide(m, ctx) for m in messages]
    finally:
        watching[0] = False
    assert touched == []
    assert [(d.action, d.reason, d.job_id) for d in first] == [(d.action, d.reason, d.job_id) for d in second]


def test_the_context_is_read_at_decision_time(world):
    """A sender added to the whitelist, or a token disabled, counts from the next message:
    decide keeps nothing between calls."""
    tokens, ctx = world
    eve = message("[{ana}] HELP".format(**tokens), EVE)
    assert decide.decide(eve, ctx).action is Action.IGNORE
    assert decide.decide(eve, replace(ctx, senders=ctx.senders | {EVE})).reason == "token not-bound"
    ana = message("[{ana}] HELP".format(**tokens))
    assert decide.decide(ana, ctx).action is Action.ANSWER
    disabled = tuple(replace(e, enabled=False) if e.description == "ana" else e for e in ctx.tokens)
    assert decide.decide(ana, replace(ctx, tokens=disabled)).reason == "token disabled"
    assert decide.decide(ana, ctx).action is Action.ANSWER
