"""Only the real sender, with a token meant for them, once: through real Dovecot IMAP, a real
SMTP server, sshd and fail2ban-server on loopback, with the `athome` command line.

The receiving mail server's verdicts are the `Authentication-Results` header it
prepends (tests/messages.py writes them as mx.example.test would).
"""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import json
import os
import time

import yaml

from tests.messages import AUTHSERV, passing_results, status_of
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    ADMIN,
    REQUESTER,
    USER,
    assert_no_secret,
    athome,
    body,
    command_email,
    replies,
    site,
    smtp,
    smtp_submission,
)

BOB = "bob@example.test"


def configure(site, **auth) -> None:
    """Change the auth section of the site's config (a restart reads it: each CLI call)."""
    cfg = yaml.safe_load(site["cfg"].read_text())
    for key, value in auth.items():
        cfg["auth"][key] = value
    site["cfg"].write_text(yaml.safe_dump(cfg))


def pending_jobs(site) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((site["state"] / "queue" / "pending").iterdir())]


def actions(site) -> dict[str, str]:
    """What fail2ban did on each host so far (bans by the test included)."""
    logs = {h: f.dir / "actions.log" for h, f in site["f2b"].items()}
    return {h: p.read_text() if p.exists() else "" for h, p in logs.items()}


def by_status(smtp, text: str) -> list:
    return [m for m in replies(smtp) if text in status_of(m)]


# ------------------------------------------------------------ Authentication-Results

FORGED = {
    "spf only": f"{AUTHSERV}; spf=pass smtp.mailfrom={REQUESTER}",
    "dkim of another domain": f"{AUTHSERV}; dkim=pass header.d=evil.test; spf=pass smtp.mailfrom=evil.test",
    "dmarc fail": f"{AUTHSERV}; dkim=fail header.d=example.test; dmarc=fail header.from=example.test",
    "no header": None,
    "untrusted authserv-id": passing_results(REQUESTER, authserv="mx.evil.test"),
    # The sender wrote a passing header; the real receiver put its failing one on top.
    "forged below a genuine top": [
        f"{AUTHSERV}; dmarc=fail (p=REJECT) header.from=example.test",
        passing_results(REQUESTER),
    ],
}


def test_unauthenticated_commands_run_nothing_and_alert_the_admins_once(site, dovecot, smtp):
    site["f2b"]["gv3p"].ban("asterisk", "3.3.3.3")
    before = actions(site)
    for i, results in enumerate(FORGED.values()):
        raw = command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid=f"<forged-{i}@x>", results=results)
        dovecot.deliver(USER, raw)
    athome(site["cfg"], "poll", "--once")
    athome(site["cfg"], "work", "--once")
    assert pending_jobs(site) == [] and actions(site) == before
    assert site["f2b"]["gv3p"].banned_jails("3.3.3.3") == ["asterisk"], "still banned: nothing ran"
    [alert] = by_status(smtp, "Alerta de segurança")
    assert alert["To"] == ADMIN and REQUESTER in body(alert) and "não autenticada" in status_of(alert)
    refusals = [m for m in replies(smtp) if m["To"] == REQUESTER]
    assert len(refusals) == 5, "one refusal per message, at most 5 an hour (no flood back)"
    assert all("mensagem não autenticada" in status_of(m) for m in refusals)
    assert "não foi possível confirmar" in body(refusals[0])
    log = (site["cfg"].parent / "cli.log").read_text()
    assert "SPF alone does not authenticate From" in log and "untrusted authserv-id" in log
    assert_no_secret(site, smtp)


def test_an_authenticated_command_still_runs(site, dovecot, smtp):
    raw = command_email(f"[{site['token']}] CHECKIP=3.3.3.3", results=passing_results(REQUESTER))
    dovecot.deliver(USER, raw)
    athome(site["cfg"], "poll", "--once")
    [job] = pending_jobs(site)
    assert job["payload"]["requester"] == REQUESTER


# -------------------------------------------------------------------- bound tokens


def test_a_token_bound_to_another_sender_is_refused_like_an_unknown_one(site, dovecot, smtp):
    configure(site, senders=[REQUESTER, BOB])
    _, bob_token = site["tokens"].add("bob", senders=[BOB])
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", sender=BOB, msgid="<b1@x>"))
    dovecot.deliver(USER, command_email("[0123456789ABCDEF] CHECKIP=3.3.3.3", sender=BOB, msgid="<b2@x>"))
    athome(site["cfg"], "poll", "--once")
    assert pending_jobs(site) == []
    [misuse] = by_status(smtp, "token de outra pessoa")
    assert misuse["To"] == ADMIN and not misuse["Cc"] and "athome token rotate t1" in body(misuse)
    stolen, unknown = by_status(smtp, "Token Invalido")
    for m in (stolen, unknown):
        assert m["Subject"].endswith("Erro - Token Invalido") and m["Cc"] == BOB
    assert body(stolen).split("Problema:")[1] == body(unknown).split("Problema:")[1], (
        "no hint the token exists"
    )
    assert "não autorizado para este remetente" in body(stolen)
    assert "not-bound (t1)" in (site["cfg"].parent / "cli.log").read_text(), "the log names it for the admins"
    assert_no_secret(site, smtp, bob_token)


def test_an_expired_legacy_token_is_refused_with_a_reply_that_says_so(site, dovecot, smtp):
    legacy = site["workdir"] / "legacy.json"
    legacy.write_text(json.dumps({"tokens": [{"token": "5E7A9C1B", "description": "Token Master 1"}]}))
    site["tokens"].import_legacy(legacy, senders=[REQUESTER], expires_days=-1)
    dovecot.deliver(USER, command_email("[5E7A9C1B] CHECKIP=3.3.3.3"))
    athome(site["cfg"], "poll", "--once")
    assert pending_jobs(site) == []
    [reply] = replies(smtp)
    assert "token expirado" in body(reply)
    assert_no_secret(site, smtp, "5E7A9C1B")


def test_a_malformed_token_is_named_as_such_and_never_echoed(site, dovecot, smtp):
    dovecot.deliver(USER, command_email("[A1B2C3DX] CHECKIP=3.3.3.3", msgid="<m1@x>"))
    dovecot.deliver(USER, command_email("(A1B2C3D4) CHECKIP=3.3.3.3", msgid="<m2@x>"))
    athome(site["cfg"], "poll", "--once")
    got = replies(smtp)
    assert len(got) == 2
    for m in got:
        assert "não está no formato [SEU TOKEN]" in body(m)
        assert "A1B2C3D" not in m.as_string()
    assert_no_secret(site, smtp, "A1B2C3D")


# ---------------------------------------------------------------------- brute force


def test_bad_tokens_lock_the_sender_out_and_others_are_still_served(site, dovecot, smtp):
    configure(site, senders=[REQUESTER, BOB])
    _, bob_token = site["tokens"].add("bob", senders=[BOB])
    for i in range(5):
        dovecot.deliver(USER, command_email(f"[{i:016X}] CHECKIP=9.9.9.9", msgid=f"<guess{i}@x>"))
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<right@x>"))
    dovecot.deliver(USER, command_email(f"[{bob_token}] CHECKIP=4.4.4.4", sender=BOB, msgid="<bob@x>"))
    athome(site["cfg"], "poll", "--once")
    [job] = pending_jobs(site)
    assert job["payload"]["requester"] == BOB, "the right token during the lock-out does not run"
    [notice] = by_status(smtp, "bloqueado por tokens inválidos")
    assert notice["To"] == ADMIN and "athome token unlock" in body(notice)
    [refused] = by_status(smtp, "remetente bloqueado")
    assert refused["To"] == REQUESTER and "bloqueado temporariamente" in body(refused)
    [ack] = [m for m in replies(smtp) if m["To"] == BOB]
    assert "recebido" in status_of(ack)
    log = (site["cfg"].parent / "cli.log").read_text()
    assert "locked out after bad tokens (token not checked)" in log
    # Still locked on the next pass: one notice per lock-out, never one per message.
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<again@x>"))
    athome(site["cfg"], "poll", "--once")
    assert len(pending_jobs(site)) == 1 and len(by_status(smtp, "bloqueado por tokens")) == 1
    # An operator ends it.
    athome(site["cfg"], "token", "unlock", REQUESTER)
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<after@x>"))
    athome(site["cfg"], "poll", "--once")
    assert [j["payload"]["requester"] for j in pending_jobs(site)].count(REQUESTER) == 1
    assert_no_secret(site, smtp, bob_token)


# ---------------------------------------------------------------------------- replay


def test_the_same_message_delivered_twice_runs_once_across_restarts_and_pruning(site, dovecot, smtp):
    raw = command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<once@x>", date=time.time() - 3600)
    dovecot.deliver(USER, raw)
    dovecot.deliver(USER, raw)
    athome(site["cfg"], "poll", "--once")
    assert len(pending_jobs(site)) == 1 and len(replies(smtp)) == 1
    athome(site["cfg"], "work", "--once")  # done, result sent
    dovecot.deliver(USER, raw)  # a replay after a restart
    athome(site["cfg"], "poll", "--once")
    assert len(replies(smtp)) == 2, "the ack and the result; nothing for the copy"
    assert "copy of request" in (site["cfg"].parent / "cli.log").read_text()
    # Months later the ledger entry is pruned; the replay is then too old to run.
    seen = site["state"] / "seen"
    old = time.time() - 91 * 86400
    for marker in seen.iterdir():
        os.utime(marker, (old, old))
    athome(site["cfg"], "work", "--once")
    assert list(seen.iterdir()) == [], "pruned"
    configure(site, freshness={"max_age_hours": 0.5})  # as if the message were now months old
    dovecot.deliver(USER, raw)
    athome(site["cfg"], "poll", "--once")
    assert [j for j in pending_jobs(site)] == [] and len(
        list((site["state"] / "queue" / "done").iterdir())
    ) == 1
    [stale] = by_status(smtp, "fora do prazo")
    assert "há mais de 0.5 horas" in body(stale) and stale["To"] == REQUESTER


def test_an_old_or_future_date_is_refused_with_a_reply_that_says_why(site, dovecot, smtp):
    dovecot.deliver(
        USER, command_email(f"[{site['token']}] HELP", msgid="<o@x>", date="Mon, 03 Jan 2022 10:00:00 +0000")
    )
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<f@x>", date=time.time() + 3600))
    athome(site["cfg"], "poll", "--once")
    old, future = sorted(replies(smtp), key=lambda m: "03/01/2022" not in body(m))
    assert "fora do prazo" in status_of(old) and "03/01/2022" in body(old)
    assert "no futuro" in body(future)


def test_a_reused_message_id_with_another_command_is_a_new_message(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<same@x>"))
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=4.4.4.4", msgid="<same@x>"))
    athome(site["cfg"], "poll", "--once")
    assert sorted(j["payload"]["params"]["ip"] for j in pending_jobs(site)) == ["3.3.3.3", "4.4.4.4"]
    assert len(replies(smtp)) == 2


# ------------------------------------------------------------- headers as clients write


def raw_message(from_lines: bytes, subject: str, msgid: str) -> bytes:
    from email.utils import formatdate

    return (
        f"Authentication-Results: {passing_results(REQUESTER)}\r\n".encode()
        + b"From: "
        + from_lines
        + b"\r\n"
        + f"To: {USER}\r\nSubject: {subject}\r\nDate: {formatdate(localtime=True)}\r\n".encode()
        + f"Message-ID: {msgid}\r\nMIME-Version: 1.0\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\nok\r\n"
    )


FROMS = {
    "folded Q": b"=?utf-8?q?Ana_Jos=C3=A9_da_Silva_Sauro?=\r\n <ana@example.test>",
    "folded B": b"=?UTF-8?B?QW5hIEpvc8OpIGRhIFNpbHZh?=\r\n\t<ana@example.test>",
    "Outlook quoted": b'"Silva, Ana" <ana@example.test>',
    "Outlook encoded": b"=?utf-8?Q?Silva=2C_Ana_Jos=C3=A9?=\r\n <ana@example.test>",
}


def test_folded_and_encoded_from_headers_reach_the_queue_and_get_a_reply(site, dovecot, smtp):
    for i, from_lines in enumerate(FROMS.values()):
        dovecot.deliver(USER, raw_message(from_lines, f"[{site['token']}] CHECKIP=3.3.{i}.1", f"<from{i}@x>"))
    athome(site["cfg"], "poll", "--once")
    assert len(pending_jobs(site)) == len(FROMS)
    acks = replies(smtp)
    assert len(acks) == len(FROMS) and all(m["To"] == REQUESTER for m in acks)


# --------------------------------------------------------------------------- audit


def test_every_decision_is_in_an_intact_audit_trail_without_secrets(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<a1@x>"))
    dovecot.deliver(USER, command_email("[0123456789ABCDEF] CHECKIP=3.3.3.3", msgid="<a2@x>"))
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<a3@x>", results=None))
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", sender="eve@example.test", msgid="<a4@x>"))
    athome(site["cfg"], "poll", "--once")
    athome(site["cfg"], "token", "rotate", "t1")
    records = [json.loads(line) for line in athome(site["cfg"], "audit", "--json").stdout.splitlines()]
    by_outcome = {(r["event"], r.get("outcome"), r.get("reason", "")): r for r in records}
    queued = by_outcome[("message", "queued", "")]
    assert queued["command"] == "CHECKIP=3.3.3.3" and queued["token_id"] == "t1"
    assert "dmarc=pass" in queued["verdict"] or "dkim=pass" in queued["verdict"]
    assert ("message", "replied", "token unknown") in by_outcome
    refused = [r for r in records if "no Authentication-Results" in r.get("verdict", "")]
    assert len(refused) == 1 and refused[0]["outcome"] == "replied"
    assert ("message", "ignored", "not on the whitelist") in by_outcome
    rotated = [r for r in records if r["event"] == "token"]
    assert rotated and rotated[0]["action"] == "rotate" and rotated[0]["token_id"] == "t1"
    table = athome(site["cfg"], "audit", "--sender", REQUESTER, "--command", "CHECKIP").stdout
    assert "CHECKIP=3.3.3.3" in table and "eve@" not in table
    assert "chain intact" in athome(site["cfg"], "audit", "verify").stdout
    [path] = (site["state"] / "audit").glob("audit-*.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + lines[2:]))  # someone removes a line
    broken = athome(site["cfg"], "audit", "verify", check=False)
    assert broken.returncode == 1 and "chain broken" in broken.stdout
    assert_no_secret(site, smtp)  # the audit files are under the state dir it scans
