"""Mail transports against real servers: IMAP over TLS, STARTTLS and plain; SMTP with STARTTLS + AUTH."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from dispatcher.config import IMAPSettings, SMTPSettings
from dispatcher.errors import TransportError
from dispatcher.mail import IMAPInbox, MaildirInbox, MaildirSender, SMTPSender, build_message
from tests import servers

USER, PASSWORD = "service@example.test", "imap-test-password"


def message(subject: str, msgid: str) -> bytes:
    m = EmailMessage()
    m["From"] = "Ana <ana@example.test>"
    m["Subject"] = subject
    m["Message-ID"] = msgid
    m.set_content("x")
    return m.as_bytes()


@pytest.mark.parametrize("security", ["tls", "starttls", "plain"])
def test_imap_fetch_does_not_mark_seen_until_ack(dovecot, security):
    import subprocess

    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "expunge", "-u", USER, "mailbox", "INBOX", "all"], check=True
    )
    dovecot.deliver(USER, message("=?utf-8?q?[A1B2C3D4]_CHECKIP=3D3.3.3.3?=", f"<{security}@x>"))
    port = dovecot.imaps_port if security == "tls" else dovecot.imap_port
    settings = IMAPSettings(
        host="127.0.0.1", port=port, security=security, user=USER, password=PASSWORD, cafile=str(dovecot.cert)
    )
    with IMAPInbox(settings) as inbox:
        [msg] = inbox.fetch()
        assert msg.subject == "[A1B2C3D4] CHECKIP=3.3.3.3"
        assert msg.message_id == f"<{security}@x>"
    assert dovecot.fetch_flags(USER) == [""], "fetching alone leaves it unseen"
    with IMAPInbox(settings) as inbox:
        [msg] = inbox.fetch()
        inbox.ack(msg.uid)
    assert dovecot.fetch_flags(USER) == ["\\Seen"]
    with IMAPInbox(settings) as inbox:
        assert inbox.fetch() == []


def test_a_real_gmail_message_over_imap_keeps_its_authentication_results_unfolded(dovecot):
    import subprocess
    from pathlib import Path

    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "expunge", "-u", USER, "mailbox", "INBOX", "all"], check=True
    )
    dovecot.deliver(USER, (Path(__file__).parent / "fixtures" / "mail" / "gmail_command.eml").read_bytes())
    settings = IMAPSettings(
        host="127.0.0.1", port=dovecot.imap_port, security="plain", user=USER, password=PASSWORD
    )
    with IMAPInbox(settings) as inbox:
        [msg] = inbox.fetch()
    assert msg.from_header == "=?UTF-8?Q?Jos=C3=A9_da_Silva_=28NOC_ATHome=29?= <jose@athome.example.com.br>"
    assert msg.date == "Sat, 29 Nov 2025 12:31:01 -0300"
    [results] = msg.auth_results
    assert results.startswith("mx.google.com;") and "dmarc=pass" in results and "\n" not in results


def test_imap_wrong_password_is_a_transport_error(dovecot):
    settings = IMAPSettings(
        host="127.0.0.1", port=dovecot.imap_port, security="plain", user=USER, password="wrong"
    )
    with pytest.raises(TransportError, match="IMAP"):
        IMAPInbox(settings).__enter__()


def test_smtp_starttls_with_auth_delivers(dovecot):
    sink = servers.SMTPSink(cert=dovecot.cert, key=dovecot.key, login=USER, password="smtp-pass").start()
    try:
        raw = build_message(
            from_address=USER,
            to=["ana@example.test"],
            subject="Olá ✅",
            text="corpo",
            html="<p>corpo</p>",
            in_reply_to="<a@x>",
            references="<a@x>",
        )
        ok = SMTPSettings(
            host="127.0.0.1",
            port=sink.port,
            security="starttls",
            user=USER,
            password="smtp-pass",
            cafile=str(dovecot.cert),
        )
        SMTPSender(ok).send(raw, USER, ["ana@example.test"])
        [(_frm, rcpt, msg)] = sink.wait_for(1)
        assert rcpt == ["ana@example.test"]
        assert str(email.header.make_header(email.header.decode_header(msg["Subject"]))) == "Olá ✅"
        assert msg["In-Reply-To"] == "<a@x>"
        bad = SMTPSettings(
            host="127.0.0.1",
            port=sink.port,
            security="starttls",
            user=USER,
            password="nope",
            cafile=str(dovecot.cert),
            timeout=5,
        )
        with pytest.raises(TransportError, match="535"):
            SMTPSender(bad).send(raw, USER, ["ana@example.test"])
    finally:
        sink.stop()


def test_smtp_server_down_is_a_transport_error():
    settings = SMTPSettings(host="127.0.0.1", port=servers.free_port(), security="plain", timeout=3)
    with pytest.raises(TransportError):
        SMTPSender(settings).send(b"Subject: x\r\n\r\nx", "a@example.test", ["b@example.test"])


def test_maildir_transport_round_trip(tmp_path):
    inbox_dir = tmp_path / "inbox"
    box = MaildirInbox(inbox_dir)
    box.box.add(message("[A1B2C3D4] HELP", "<m@x>"))
    [msg] = box.fetch()
    assert msg.subject == "[A1B2C3D4] HELP"
    box.ack(msg.uid)
    assert box.fetch() == []
    MaildirSender(tmp_path / "outbox").send(b"Subject: ok\r\n\r\nbody", "a@x", ["b@x"])
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == 1


def test_a_permanent_smtp_refusal_is_told_apart_from_a_temporary_one(smtp):
    from dispatcher.errors import PermanentTransportError

    settings = SMTPSettings(host="127.0.0.1", port=smtp.port, security="plain", timeout=5)
    raw = b"From: a@example.test\r\nSubject: x\r\n\r\nx"
    smtp.down = True
    with pytest.raises(TransportError) as info:
        SMTPSender(settings).send(raw, "a@example.test", ["b@example.test"])
    assert not isinstance(info.value, PermanentTransportError)
    smtp.down, smtp.reject = False, True
    with pytest.raises(PermanentTransportError):
        SMTPSender(settings).send(raw, "a@example.test", ["b@example.test"])


HOSTILE_HEADERS = (
    b"From: Ana <ana@example.test>\r\n"
    b"Message-ID: <\xe9\xe9@example.test>\r\n"
    b"References: <a1@example.test>\r\n <a2@example.test>\r\n\t<a3@example.test>\r\n"
    b"Subject: [A1B2C3D4] HELP\r\n\r\nbody"
)


def test_eight_bit_and_folded_threading_headers_are_normalised_and_replies_still_build(tmp_path):
    box = MaildirInbox(tmp_path / "inbox")
    box.box.add(HOSTILE_HEADERS)
    box.box.add(b"no headers at all")
    msgs = box.fetch()
    assert len(msgs) == 2
    msg = next(m for m in msgs if m.subject)
    assert msg.references.startswith("<a1@example.test> <a2@example.test> <a3@example.test>")
    assert "\n" not in msg.references
    raw = build_message(
        from_address="ops@example.test",
        to=["ana@example.test"],
        subject="s",
        text="t",
        html="<p>t</p>",
        in_reply_to=msg.message_id,
        references=msg.references,
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["References"]).split()[:3] == [
        "<a1@example.test>",
        "<a2@example.test>",
        "<a3@example.test>",
    ]


def test_automatic_mail_is_recognised(tmp_path):
    box = MaildirInbox(tmp_path / "inbox")
    for extra in (b"Auto-Submitted: auto-replied\r\n", b"Precedence: bulk\r\n", b"Return-Path: <>\r\n"):
        box.box.add(b"From: ana@example.test\r\n" + extra + b"Subject: Ausente\r\n\r\nx")
    box.box.add(b"From: MAILER-DAEMON@example.test\r\nSubject: Undelivered\r\n\r\nx")
    box.box.add(b"From: ana@example.test\r\nAuto-Submitted: no\r\nSubject: [A1B2C3D4] HELP\r\n\r\nx")
    reasons = sorted(m.automated for m in box.fetch())
    assert reasons[0] == "" and all(reasons[1:]), reasons
