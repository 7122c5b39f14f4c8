"""The outgoing mail limit: recipients counted over sliding windows that survive a restart;
replies over it wait in the outbox, in order, and go as the window allows; nothing is
dropped. Real Dovecot IMAP and a real SMTP server (aiosmtpd) on loopback; real processes
sharing the ledger file.

"Time passes" in these tests by moving the ledger's entries into the past, never by
sleeping: the windows are an hour and a day.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import subprocess

import pytest

from dispatcher import config, health
from dispatcher.auth import TokenStore
from dispatcher.errors import ConfigError
from dispatcher.mail import DAY, HOUR, SendLedger, Usage
from dispatcher.service import Dispatcher
from tests.messages import AUTH, command_message

USER = "service@example.test"
IMAP_PASSWORD = "imap-test-password"
REQUESTER = "ana@example.test"
ADMIN = "admin@example.test"


# ------------------------------------------------------------------ the windows


@pytest.mark.parametrize(
    "entries, limits, count, ready",
    [
        ((), ((HOUR, 2),), 1, 1000.0),  # nothing sent: at once
        (((990.0, 1),), ((HOUR, 2),), 1, 1000.0),  # 1 + 1 <= 2
        (((990.0, 1), (995.0, 1)), ((HOUR, 2),), 1, 990.0 + HOUR),  # when the oldest leaves
        (((990.0, 1), (995.0, 1)), ((HOUR, 2),), 2, 995.0 + HOUR),  # when both have left
        (((990.0, 2),), ((HOUR, 1),), 5, 990.0 + HOUR),  # bigger than the limit: an empty window
        ((), ((HOUR, 1),), 5, 1000.0),  # ... takes it at once
        (((1000.0 - HOUR, 2),), ((HOUR, 2),), 1, 1000.0),  # exactly an hour old: out of the window
        (((10.0, 3), (900.0, 1)), ((HOUR, 10), (DAY, 4)), 1, 10.0 + DAY),  # the day binds
        (((10.0, 3), (900.0, 1)), ((HOUR, 1), (DAY, 40)), 1, 900.0 + HOUR),  # the hour binds
        (((10.0, 3),), (), 100, 1000.0),  # no limit in force
    ],
)
def test_when_the_next_recipients_may_go(entries, limits, count, ready):
    usage = Usage(entries, limits, now=1000.0)
    assert usage.next_at(count) == ready
    assert usage.fits(count) == (ready <= 1000.0)


def _reserve_until_refused(path: str, per_hour: int, out) -> None:
    ledger = SendLedger(path, per_hour, 0)
    got = 0
    for n in range(per_hour):
        if ledger.reserve(f"{multiprocessing.current_process().pid}-{n}", 1) == 0.0:
            got += 1
    out.put(got)


def test_processes_sending_at_once_never_pass_the_limit_together(tmp_path):
    """The poll and work commands (or the service and an operator) are separate processes
    sharing one ledger: the flock makes reserving the last place a one-winner race."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_reserve_until_refused, args=(str(tmp_path / "ledger.json"), 25, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sum(got) == 25, got
    assert SendLedger(tmp_path / "ledger.json", 25, 0).usage().sent(HOUR) == 25
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith("ledger.json.lock")] == ["ledger.json"]


def test_a_failed_send_gives_its_place_back_and_the_count_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = SendLedger(path, 3, 0)
    assert ledger.reserve("a#1", 2) == 0.0
    assert ledger.reserve("b#1", 2) > 0, "2 + 2 > 3: refused, nothing counted"
    ledger.settle("a#1", 0)  # the send failed
    assert ledger.reserve("b#1", 2) == 0.0 and ledger.reserve("c#1", 1) == 0.0
    again = SendLedger(path, 3, 0)  # a new process
    assert again.usage().sent(HOUR) == 3 and not again.usage().fits(1)
    assert again.alert_due() and not SendLedger(path, 3, 0).alert_due(), "once a day, across restarts"


# ---------------------------------------------------------------- the config


def smtp_config(**smtp) -> dict:
    return {
        "state_dir": "/nonexistent-athome-state",
        "mail": {
            "transport": "imap",
            "from_address": USER,
            "admin_addresses": [ADMIN],
            "imap": {"host": "127.0.0.1", "security": "plain", "user": USER},
            "smtp": {"host": "127.0.0.1", "security": "plain", **smtp},
        },
        "auth": {"senders": [REQUESTER], **AUTH},
    }


def test_the_limits_are_validated_when_the_config_is_loaded(tmp_path):
    cfg = config.from_dict(smtp_config(), base=tmp_path)
    assert (cfg.smtp.max_recipients_per_hour, cfg.smtp.max_recipients_per_day) == (150, 450), "defaults"
    off = config.from_dict(smtp_config(max_recipients_per_hour=0, max_recipients_per_day=0), base=tmp_path)
    assert off.smtp.max_recipients_per_day == 0, "0: no limit"
    bad = smtp_config(
        max_recipients_per_hour=500, max_recipients_per_day=450, retry_first_seconds=60, retry_max_seconds=10
    )
    with pytest.raises(ConfigError) as caught:
        config.from_dict(bad, base=tmp_path)
    text = "\n".join(caught.value.problems)
    assert "max_recipients_per_hour (500) is more than max_recipients_per_day (450)" in text
    assert "retry_first_seconds must be positive and at most retry_max_seconds" in text
    with pytest.raises(ConfigError, match="must be 0"):
        config.from_dict(smtp_config(max_recipients_per_day=-1), base=tmp_path)
    with pytest.raises(ConfigError, match="is not a number"):
        config.from_dict(smtp_config(max_recipients_per_hour="many"), base=tmp_path)


# ------------------------------------------------------- with the real servers


@pytest.fixture
def mailer(tmp_path, dovecot, smtp, monkeypatch):
    """Dispatchers (one per 'process start') reading Dovecot and sending to the SMTP sink."""
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.add("limits", senders=[REQUESTER])
    monkeypatch.setenv("ATHOME_TEST_IMAP_PW", IMAP_PASSWORD)
    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "expunge", "-u", USER, "mailbox", "INBOX", "all"], check=True
    )
    data = smtp_config(port=smtp.port, max_recipients_per_hour=2, max_recipients_per_day=10)
    data["state_dir"] = str(tmp_path / "state")
    data["mail"]["imap"].update(port=dovecot.imap_port, password_env="ATHOME_TEST_IMAP_PW")
    data["auth"]["tokens_file"] = str(tokens.path)
    if smtp.login:  # a submission server (STARTTLS, AUTH) like production's
        monkeypatch.setenv("ATHOME_TEST_SMTP_PW", smtp.password)
        data["mail"]["smtp"].update(
            security="starttls", user=smtp.login, password_env="ATHOME_TEST_SMTP_PW", cafile=str(smtp.cert)
        )

    def start(**smtp_settings) -> Dispatcher:
        data["mail"]["smtp"].update(smtp_settings)
        return Dispatcher(config.from_dict(data, base=tmp_path))

    def send(subject: str, msgid: str) -> None:
        dovecot.deliver(USER, command_message(subject, REQUESTER, msgid).as_bytes())

    start.token, start.send = token, send
    return start


def pass_time(d: Dispatcher, seconds: float) -> None:
    """Move everything the ledger counted `seconds` into the past."""
    path = d.mail_ledger.path
    data = json.loads(path.read_text())
    data["sent"] = [[t - seconds, n, k] for t, n, k in data["sent"]]
    path.write_text(json.dumps(data))


def answered(smtp) -> list[tuple[str, str, list[str]]]:
    """(what it answers, kind, recipients) of every message the SMTP server took, in order."""
    out = []
    for _, rcpt, msg in smtp.messages:
        subject = msg["Subject"]
        kind = "notice" if "retidas" in subject else "token" if "Token Invalido" in subject else "help"
        out.append((msg["In-Reply-To"] or "", kind, sorted(rcpt)))
    return out


def test_replies_over_the_limit_wait_in_order_and_go_as_the_window_allows(mailer, smtp, caplog):
    caplog.set_level(logging.INFO, logger="dispatcher")
    d = mailer()
    d.lock("intake"), d.lock("work")  # as the service does: status reads its notes
    # The oldest is a bad-token alert to the admin (requester in copy: 2 recipients).
    mailer.send("[DEADBEEF] HELP", "<bad@example.test>")
    for n in range(1, 5):
        mailer.send(f"[{mailer.token}] HELP", f"<h{n}@example.test>")
    d.poll_once()
    d.flush_outbox()
    d.flush_outbox()
    # 2 recipients an hour: the requester's first two answers went, ahead of the older alert.
    assert answered(smtp) == [
        ("<h1@example.test>", "help", [REQUESTER]),
        ("<h2@example.test>", "help", [REQUESTER]),
    ]
    waiting = sorted(j.payload["kind"] for j in d.outbox.list("pending"))
    assert waiting == ["admin_notice", "help", "help", "token_invalid"], "nothing dropped"
    warnings = [r for r in caplog.records if "outgoing mail limit reached" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, "one warning per stretch"
    report = health.status(d.cfg)
    mail = report["outgoing_mail"]
    assert (mail["sent_last_hour"], mail["limit_per_hour"], mail["held_replies"]) == (2, 2, 4)
    assert 0 < mail["next_send_in"] <= HOUR
    _, reasons = health.verdict(report, d.cfg)
    assert any("held back by the outgoing mail limit (2/2 recipients in the last hour" in r for r in reasons)

    d = mailer()  # a restart: the count is kept
    assert d.flush_outbox() == 0 and len(smtp.messages) == 2
    pass_time(d, HOUR)
    d.flush_outbox()  # the notice goes first (it explains the delay), then the next answer
    assert answered(smtp)[2:] == [("", "notice", [ADMIN]), ("<h3@example.test>", "help", [REQUESTER])]
    pass_time(d, HOUR)
    d.flush_outbox()  # h4 fits; the alert (2 recipients) does not fit beside it, and waits
    assert answered(smtp)[4:] == [("<h4@example.test>", "help", [REQUESTER])]
    pass_time(d, HOUR)
    d.flush_outbox()
    assert answered(smtp)[5:] == [("<bad@example.test>", "token", [ADMIN, REQUESTER])]
    assert d.outbox.count("pending") == 0 and health.status(d.cfg)["outgoing_mail"]["held_replies"] == 0
    assert any("replies go out again" in r.getMessage() for r in caplog.records)
    ids = [m["Message-ID"] for _, _, m in smtp.messages]
    assert len(set(ids)) == len(ids) == 6, "each reply once"

    # A new stretch the same day: a new warning, no second notice to the admins.
    pass_time(d, HOUR)
    before = len([r for r in caplog.records if "outgoing mail limit reached" in r.getMessage()])
    mailer.send(f"[{mailer.token}] HELP", "<h5@example.test>")
    mailer.send(f"[{mailer.token}] HELP", "<h6@example.test>")
    mailer.send(f"[{mailer.token}] HELP", "<h7@example.test>")
    d.poll_once()
    assert [k for _, k, _ in answered(smtp)[6:]] == ["help", "help"]
    assert [j.payload["kind"] for j in d.outbox.list("pending")] == ["help"]
    assert len([r for r in caplog.records if "outgoing mail limit reached" in r.getMessage()]) == before + 1

    # The ledger lost (an upgrade, a wiped file): counted again from the sent replies' records.
    d.mail_ledger.path.unlink()
    assert mailer().mail_ledger.usage().sent(DAY) == sum(len(r) for _, _, r in answered(smtp))
