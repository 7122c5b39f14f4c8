"""Sender authenticity (Authentication-Results, RFC 8601) and freshness: pure decisions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.policy import default as default_policy
from pathlib import Path

import pytest

from dispatcher import mailauth
from dispatcher.auth import sender_address
from dispatcher.mail import incoming_from_headers

SAMPLES = Path(__file__).parent / "fixtures" / "mail"
TRUSTED = ["mx.google.com"]
GENUINE_TOP = (
    "mx.google.com; dkim=pass header.i=@example.test header.s=s1 header.b=AbC; "
    "spf=pass smtp.mailfrom=a@example.test; dmarc=pass (p=REJECT) header.from=example.test"
)


@pytest.mark.parametrize(
    ("headers", "domain", "ok"),
    [
        ([GENUINE_TOP], "example.test", True),
        (
            ["mx.google.com; dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=example.test"],
            "example.test",
            True,
        ),
        (["mx.google.com; dkim=pass header.d=example.test"], "example.test", True),
        (["mx.google.com; dkim=pass header.i=@mail.example.com.br"], "example.com.br", True),  # relaxed
        (["mx.google.com; dkim=pass header.d=example.com.br"], "noc.example.com.br", True),
        # refused
        (["mx.google.com; spf=pass smtp.mailfrom=a@example.test"], "example.test", False),
        (
            ["mx.google.com; dkim=pass header.d=other.test; spf=pass smtp.mailfrom=example.test"],
            "example.test",
            False,
        ),
        (["mx.google.com; dkim=pass header.d=example.com.br"], "other.com.br", False),  # public suffix only
        (["mx.google.com; dmarc=fail (p=REJECT) header.from=example.test"], "example.test", False),
        (["mx.google.com; dmarc=pass header.from=other.test"], "example.test", False),
        (["mx.google.com; dkim=fail header.d=example.test"], "example.test", False),
        (["mx.google.com; none"], "example.test", False),
        ([], "example.test", False),
        (
            ["evil.example; dmarc=pass header.from=example.test"],
            "example.test",
            False,
        ),  # untrusted authserv-id
        (
            ["mx.google.com; dmarc=fail header.from=example.test", GENUINE_TOP],
            "example.test",
            False,
        ),  # forged below
        (["mx.google.com; dkim=pass header.d=example.test ((("], "example.test", False),
        (["\x00garbage"], "example.test", False),
    ],
)
def test_the_topmost_trusted_header_decides(headers, domain, ok):
    verdict = mailauth.verify_sender(headers, domain, TRUSTED)
    assert verdict.ok is ok, verdict.reason
    assert verdict.reason


def test_an_oversized_top_header_is_refused_unparsed():
    huge = "mx.google.com; dmarc=pass header.from=example.test; " + "x=y " * 5000
    assert not mailauth.verify_sender([huge], "example.test", TRUSTED).ok


def test_spf_alone_is_named_as_not_enough():
    verdict = mailauth.verify_sender(
        ["mx.google.com; spf=pass smtp.mailfrom=a@example.test"], "example.test", TRUSTED
    )
    assert "SPF alone" in verdict.reason


def test_organizational_domains_come_from_the_shipped_public_suffix_list():
    assert mailauth.organizational_domain("mail.athome.com.br") == "athome.com.br"
    assert mailauth.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert not mailauth.aligned("evil.com.br", "athome.com.br")


NOW = datetime(2025, 11, 29, 15, 31, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("date", "ok", "says"),
    [
        ("Sat, 29 Nov 2025 12:31:01 -0300", True, ""),
        ("Fri, 28 Nov 2025 15:32:00 +0000", True, ""),
        ("Fri, 28 Nov 2025 15:30:00 +0000", False, "há mais de 24 horas"),
        ("Mon, 03 Jan 2022 10:00:00 +0000", False, "03/01/2022"),
        ("Sat, 29 Nov 2025 15:45:00 +0000", False, "futuro"),
        ("Sat, 29 Nov 2025 15:40:00 -0000", True, ""),
        ("", False, "Date"),
        ("yesterday", False, "Date"),
        ("Fri, 31 Dec 9999 23:59:00 -2359", False, "Date"),  # past datetime's range
        ("Sat, 29 Nov 2025 12:00:00 +9999999999999999999", False, "Date"),
    ],
)
def test_freshness_window(date, ok, says):
    verdict = mailauth.check_date(date, NOW, timedelta(hours=24), timedelta(minutes=10))
    assert verdict.ok is ok and says in verdict.reason


@pytest.mark.parametrize("policy", [compat32, default_policy], ids=["imap-tools (compat32)", "default"])
def test_a_real_gmail_message_is_read_unfolded_and_authenticated(policy):
    raw = (SAMPLES / "gmail_command.eml").read_bytes()
    headers = BytesHeaderParser(policy=policy).parsebytes(raw)
    msg = incoming_from_headers("7", headers)
    sender = sender_address(msg.from_header)
    assert sender == "jose@athome.example.com.br"
    assert msg.subject == "[A1B2C3D4E5F60718] CHECKIP=3.3.3.3"
    assert (
        msg.date == "Sat, 29 Nov 2025 12:31:01 -0300" and msg.message_id == "<CAFx2b+Q1k3v0w@mail.gmail.com>"
    )
    assert len(msg.auth_results) == 1, "ARC-Authentication-Results is not an Authentication-Results header"
    assert "\n" not in msg.auth_results[0] and "\n" not in msg.from_header
    verdict = mailauth.verify_sender(msg.auth_results, "athome.example.com.br", TRUSTED)
    assert verdict.ok and "athome.example.com.br" in verdict.reason
