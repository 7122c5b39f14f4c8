"""Replies thread under the request in a Gmail-like mail client.

Gmail groups a message into a conversation when it refers to it (In-Reply-To /
References) and its subject is the same once the Re:/Fwd: prefixes are removed:
"test" and "Re: test" share a conversation, "test" and "test 123" do not (Gmail Help,
"a conversation will break off into a new thread if the subject line of the
conversation is changed"). `conversations` models that rule; the test runs a confirmed
MACCHANGE through the real service and a real host and groups the requester's mailbox.

One limit is by design: the requester's own command carries the token in its subject
and no reply repeats it, so the command itself stays a conversation of its own; every
reply about it is one conversation. The confirmation request carries its code in the
subject (a plain reply confirms), so it and the requester's answer form a second one.
"""

from __future__ import annotations

import email
import re
import time
from email.policy import default as default_policy

from dispatcher.replies import Replies
from tests.messages import command_message, status_of
from tests.test_dispatch_commands import REQUESTER, confirm_site  # noqa: F401 - fixture

_PREFIXES = re.compile(r"^\s*(?:(?:re|res|fwd?|enc|r)\s*:\s*)+", re.IGNORECASE)
_IDS = re.compile(r"<[^<>\s]+>")


def normal_subject(subject: str) -> str:
    return " ".join(_PREFIXES.sub("", subject or "").split()).lower()


def conversations(mailbox: list) -> list[list]:
    """Group messages (in arrival order) as Gmail does: a message joins a conversation
    that shares a Message-ID with its In-Reply-To/References (the conversation's messages
    and the ones they refer to) and has the same subject without prefixes."""
    found: list[dict] = []
    for msg in mailbox:
        ids = set(_IDS.findall(f"{msg['In-Reply-To'] or ''} {msg['References'] or ''}"))
        own = set(_IDS.findall(msg["Message-ID"] or ""))
        subject = normal_subject(str(msg["Subject"]))
        home = next((c for c in found if c["subject"] == subject and c["ids"] & ids), None)
        if home is None:
            home = {"subject": subject, "ids": set(), "messages": []}
            found.append(home)
        home["ids"] |= ids | own
        home["messages"].append(msg)
    return [c["messages"] for c in found]


def _msg(subject: str, msgid: str, refs: str = "") -> email.message.EmailMessage:
    m = email.message.EmailMessage()
    m["Subject"], m["Message-ID"] = subject, msgid
    if refs:
        m["In-Reply-To"], m["References"] = refs.split()[-1], refs
    return m


def test_the_model_follows_the_documented_rule():
    assert len(conversations([_msg("test", "<a@x>"), _msg("Re: test", "<b@x>", "<a@x>")])) == 1
    assert len(conversations([_msg("test", "<a@x>"), _msg("RES: Fwd: test", "<b@x>", "<a@x>")])) == 1
    assert len(conversations([_msg("test", "<a@x>"), _msg("test 123", "<b@x>", "<a@x>")])) == 2
    assert len(conversations([_msg("test", "<a@x>"), _msg("Re: test", "<b@x>")])) == 2
    # two replies to one message (which the mailbox may not hold) share a conversation
    assert len(conversations([_msg("Re: t", "<b@x>", "<a@x>"), _msg("Re: t", "<c@x>", "<a@x>")])) == 1


def test_status_subjects_would_split_the_conversation():
    """Why the status is not in the subject: an acknowledgement and a result whose
    subjects say what happened land in two conversations."""
    r = Replies()
    THREAD = "[********] CHECKIP=3.3.3.3"  # noqa: N806
    values = dict(request_id="R1", command="CHECKIP=3.3.3.3", command_name="CHECKIP")
    ack = r.render("ack", position=1, confirm=False, confirmed=False, **values)
    res = r.render("bare", outcome="success", **values)
    assert ack.subject != res.subject
    split = [_msg(ack.subject, "<a@x>", "<cmd@x>"), _msg(res.subject, "<b@x>", "<cmd@x>")]
    assert len(conversations(split)) == 2
    threaded = [
        r.render("ack", thread=THREAD, position=1, confirm=False, confirmed=False, **values),
        r.render("bare", thread=THREAD, outcome="success", **values),
    ]
    assert {t.subject for t in threaded} == {"Re: [********] CHECKIP=3.3.3.3"}
    assert [t.text.splitlines()[0] for t in threaded] == [ack.status, res.status]
    assert len(conversations([_msg(t.subject, f"<{n}@x>", "<cmd@x>") for n, t in enumerate(threaded)])) == 1


def test_every_reply_about_a_request_is_one_conversation(confirm_site):  # noqa: F811 - fixture
    site, gv2p = confirm_site
    d = site.dispatcher
    mailbox = []  # the requester's: what they sent and what they got, in order
    seen: set[str] = set()

    def send(subject: str, **headers) -> None:
        msg = command_message(subject, REQUESTER, f"<s{len(mailbox)}.{time.time()}@example.test>", **headers)
        d._inbox_factory().box.add(msg)
        mailbox.append(email.message_from_bytes(msg.as_bytes(), policy=default_policy))

    def receive() -> list:
        new = [m for m in site.replies() if m["Message-ID"] not in seen]
        seen.update(m["Message-ID"] for m in new)
        mailbox.extend(new)
        return new

    mac = "MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p"
    send(f"[{site.token}] {mac}")
    d.poll_once()
    [ack] = receive()
    d.work_once()  # the check run
    [request] = receive()
    code = str(request["Subject"]).rsplit("CONFIRMAR ", 1)[1]
    # A plain reply, as a mail client writes it: its References are the request's and its id.
    chain = f"{request['References']} {request['Message-ID']}"
    send(f"Re: {request['Subject']}", In_Reply_To=request["Message-ID"], References=chain)
    d.poll_once()
    [confirmed] = receive()
    d.work_once()
    [result] = receive()
    assert b"3010;MAC:010203040599;" in gv2p.files()[1]

    statuses = [status_of(m) for m in (ack, request, confirmed, result)]
    assert "recebido" in statuses[0] and "Confirme" in statuses[1] and "✅" in statuses[3], statuses
    for reply in (ack, confirmed, result):
        assert reply["Subject"] == f"Re: [********] {mac}"
    assert request["Subject"] == f"Re: [********] {mac} — CONFIRMAR {code}"
    for msg in mailbox[1:]:
        assert site.token not in str(msg["Subject"]) and site.token.lower() not in str(msg["Subject"])

    groups = conversations(mailbox)
    ids = [[m["Message-ID"] for m in g] for g in groups]
    assert ids == [
        [mailbox[0]["Message-ID"]],  # the command: its subject holds the token, no reply repeats it
        [ack["Message-ID"], confirmed["Message-ID"], result["Message-ID"]],
        [request["Message-ID"], mailbox[3]["Message-ID"]],  # the code's own: request and answer
    ], [[status_of(m) if m in seen else m["Subject"] for m in g] for g in groups]


def test_a_refusal_threads_like_any_reply(confirm_site):  # noqa: F811 - fixture
    site, _ = confirm_site
    site.send("CHECKIP=3.3.3")
    site.send("HELP")
    site.dispatcher.poll_once()
    rejected, helped = site.replies()
    assert rejected["Subject"] == "Re: [********] CHECKIP=3.3.3" and "não aceito" in status_of(rejected)
    assert helped["Subject"] == "Re: [********] HELP" and "Comandos" in status_of(helped)
