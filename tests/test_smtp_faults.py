"""An SMTP server that answers 4xx, 421 or 5xx, or is down: replies wait (the server as a
whole: the pass stops and sending backs off; some recipients: that reply waits for them),
nothing is dropped that is not refused for good, and every reply is delivered exactly once
afterwards. Real Dovecot IMAP, a real SMTP server (aiosmtpd) on loopback, the real service.
"""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import collections
import json
import logging
import signal

import yaml

from dispatcher import health
from tests import servers
from tests.messages import status_of
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    ADMIN,
    REQUESTER,
    SMTP_PASSWORD,
    USER,
    assert_no_secret,
    athome,
    command_email,
    replies,
    site,
    smtp,
    smtp_submission,
    start_service,
)
from tests.test_mail_limits import mailer  # noqa: F401 - fixture


def flush_until(d, condition, what: str, timeout: float = 60.0) -> None:
    """Flush the outbox (as the service's passes do) until `condition` holds."""
    servers.wait_for(lambda: (d.flush_outbox(), condition())[1], what, timeout=timeout)


def delivered_once(smtp) -> collections.Counter:
    """(Message-ID, recipient) -> how many times the SMTP server took it."""
    return collections.Counter((m["Message-ID"], r) for _, rcpt, m in smtp.messages for r in rcpt)


def test_451_and_421_stop_the_pass_and_each_reply_is_delivered_once_afterwards(mailer, smtp, caplog):
    caplog.set_level(logging.INFO, logger="dispatcher")
    d = mailer(
        retry_first_seconds=0.2, retry_max_seconds=1, max_recipients_per_hour=0, max_recipients_per_day=0
    )
    smtp.data_script = ["451 4.3.0 busy (test)", "421 4.7.0 try again later (test)", "451 4.3.0 busy (test)"]
    for n in (1, 2, 3):
        mailer.send(f"[{mailer.token}] HELP", f"<r{n}@example.test>")
    d.poll_once()
    assert smtp.messages == [] and smtp.tries == 1, "the first refusal stopped the pass"
    [head] = [j for j in d.outbox.list("pending") if j.attempts]
    assert head.not_before > 0 and d.outbox.count("pending") == 3
    assert d.flush_outbox() == 0 and smtp.tries == 1, "nothing is tried before the backoff"
    flush_until(d, lambda: len(smtp.messages) == 3, "every reply delivered")
    assert smtp.tries == 6, "3 refusals, then each reply once"
    assert [m["In-Reply-To"] for _, _, m in smtp.messages] == [f"<r{n}@example.test>" for n in (1, 2, 3)]
    assert set(delivered_once(smtp).values()) == {1}
    done = {j.payload["kind"]: j for j in d.outbox.list("done")}
    assert len(d.outbox.list("done")) == 3 and d.outbox.count("pending") == 0
    retries = [j for j in d.outbox.list("done") if any(h["event"] == "retry" for h in j.history)]
    assert len(retries) == 1 and retries[0].attempts == 4, "the same reply waited each time, in order"
    assert "help" in done
    waits = [r.getMessage() for r in caplog.records if "sending waits" in r.getMessage()]
    assert len(waits) == 3 and "421" in waits[1], waits
    assert any("sending again after 3 failure(s)" in r.getMessage() for r in caplog.records)


def test_recipients_deferred_get_the_reply_later_and_the_others_at_once(mailer, smtp):
    d = mailer(retry_first_seconds=0.2, retry_max_seconds=1, max_recipients_per_hour=10)
    smtp.rcpt_script = {ADMIN: ["450 4.2.1 mailbox busy (test)", "452 4.5.3 too many recipients (test)"]}
    mailer.send("[DEADBEEF] HELP", "<bad@example.test>")  # to the admin, the requester in copy
    mailer.send(f"[{mailer.token}] HELP", "<fine@example.test>")
    d.poll_once()
    # The requester got both (its HELP reply first: requesters before alerts); the admin none yet.
    assert [(sorted(rcpt), m["In-Reply-To"]) for _, rcpt, m in smtp.messages] == [
        ([REQUESTER], "<fine@example.test>"),
        ([REQUESTER], "<bad@example.test>"),
    ]
    [waiting] = d.outbox.list("pending")
    assert waiting.payload["rcpt"] == [ADMIN] and waiting.payload["delivered"] == [REQUESTER]
    flush_until(d, lambda: d.outbox.count("pending") == 0, "the deferred recipient served")
    counts = delivered_once(smtp)
    assert set(counts.values()) == {1} and len(counts) == 3, counts
    alert_id = smtp.messages[1][2]["Message-ID"]
    assert counts[(alert_id, REQUESTER)] == 1 and counts[(alert_id, ADMIN)] == 1, "one message, each once"
    [done] = [j for j in d.outbox.list("done") if j.attempts > 1]
    assert done.attempts == 3 and smtp.rcpt_script[ADMIN] == [], "deferred twice, then taken"
    assert d.mail_ledger.usage().sent(3600) == 3, "the ledger counted who got it, not the deferrals"


def test_a_5xx_fails_that_reply_only_and_a_refused_account_or_quota_drops_nothing(mailer, smtp):
    d = mailer(retry_first_seconds=0.2, retry_max_seconds=1, max_recipients_per_hour=10)
    smtp.data_script = ["554 5.6.0 content rejected (test)"]
    mailer.send(f"[{mailer.token}] HELP", "<x1@example.test>")
    mailer.send(f"[{mailer.token}] HELP", "<x2@example.test>")
    d.poll_once()
    [failed] = d.outbox.list("failed")
    assert "554" in failed.history[-1]["reason"]
    assert [m["In-Reply-To"] for _, _, m in smtp.messages] == ["<x2@example.test>"], "the next went on"
    assert "refused for good" in health.Health(d.cfg.state_dir / "health.json").read()["last_error"]
    # The account refused (a bad From for this login), or its sending quota spent: the
    # same for every reply, so none is failed for it; they go once the server takes them.
    smtp.mail_script = ["553 5.7.1 sender not allowed (test)"]
    smtp.data_script = ["550 5.4.5 Daily user sending quota exceeded (test)"]
    mailer.send(f"[{mailer.token}] HELP", "<x3@example.test>")
    d.poll_once()
    assert d.outbox.count("pending") == 1 and len(d.outbox.list("failed")) == 1
    flush_until(d, lambda: d.outbox.count("pending") == 0, "the reply sent once the server takes it")
    assert [m["In-Reply-To"] for _, _, m in smtp.messages] == ["<x2@example.test>", "<x3@example.test>"]
    [x3] = [j for j in d.outbox.list("done") if j.attempts > 1]
    assert x3.attempts == 3, "refused at MAIL FROM, then at DATA, then sent"


def outbox_records(site, state: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((site["state"] / "outbox" / state).glob("*.json"))]


def test_smtp_down_while_replies_are_due_loses_none_and_sends_none_twice(site, dovecot, smtp):
    """The SMTP server stops while commands are in flight (their confirmations and results
    fall due while it is down), stays down across several retries, and comes back on the
    same port: every reply is delivered after, exactly once, by the running service."""
    cfg = yaml.safe_load(site["cfg"].read_text())
    cfg["mail"]["smtp"].update(retry_first_seconds=0.3, retry_max_seconds=1.5)
    site["cfg"].write_text(yaml.safe_dump(cfg))
    proc = start_service(site["cfg"])
    try:
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<up@example.test>"))
        assert len(smtp.wait_for(1, timeout=60)) == 1, "the service is up"
        smtp.stop()
        commands = {f"<c{n}@example.test>": f"CHECKIP=10.0.0.{n}" for n in (1, 2, 3)}
        for msgid, command in commands.items():
            dovecot.deliver(USER, command_email(f"[{site['token']}] {command}", msgid=msgid))
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<h@example.test>"))

        def down_long_enough() -> bool:
            pending = outbox_records(site, "pending")
            kinds = collections.Counter(r["payload"]["kind"] for r in pending)
            retries = max((r["attempts"] for r in pending), default=0)
            return kinds["ack"] == 3 and kinds["checkip"] == 3 and kinds["help"] == 1 and retries >= 4

        servers.wait_for(down_long_enough, "every reply due and several retries while down", 300, proc)
        report = json.loads(athome(site["cfg"], "status", "--json", check=False).stdout)
        assert report["outgoing_mail"]["smtp_failures"] >= 3
        assert any("SMTP server failed" in r for r in report["reasons"]), report["reasons"]
        assert report["replies_unsent"] == 7
        smtp.start()  # the same port
        servers.wait_for(lambda: len(smtp.messages) == 8, "every reply delivered", 120, proc)
        servers.wait_for(
            lambda: not outbox_records(site, "pending") and not outbox_records(site, "processing"),
            "the outbox empty",
            60,
            proc,
        )
        # More passes of both loops: still nothing sent twice.
        worked = health.Health(site["state"] / "health.json").read()["work_ok"]
        servers.wait_for(
            lambda: health.Health(site["state"] / "health.json").read()["work_ok"] > worked + 1,
            "two more work passes",
            60,
            proc,
        )
        assert len(smtp.messages) == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    got = replies(smtp)
    ids = [m["Message-ID"] for m in got]
    assert len(set(ids)) == len(ids) == 8, "nothing twice"
    per_command = collections.Counter((m["In-Reply-To"], _kind(m)) for m in got)
    for msgid in commands:
        assert per_command[(msgid, "ack")] == 1 and per_command[(msgid, "result")] == 1, per_command
    assert per_command[("<h@example.test>", "help")] == 1
    assert "sending waits" in output and "sending again after" in output
    assert SMTP_PASSWORD not in output and site["token"] not in output
    assert_no_secret(site, smtp)
    assert not outbox_records(site, "failed"), "nothing dropped"
    whitelisted = " ".join(ip for f in site["f2b"].values() for ip in f.ignore_list("sshd"))
    assert all(f"10.0.0.{n}" in whitelisted for n in (1, 2, 3)), "every command ran"


def _kind(msg) -> str:
    subject = status_of(msg)  # the status line: the subject is the request's own
    if "recebido" in subject:
        return "ack"
    if "concluído" in subject or "falhou" in subject:
        return "result"
    return "help" if "Comandos" in subject else subject
