"""CHECKIP with fail2ban_whitelist_expire_days, end to end: the reply (pt-BR, text and HTML)
names the addresses a run removed from the whitelist as expired. Real Dovecot, SMTP, sshd and
fail2ban servers (tests/test_end_to_end.py fixtures); the expiry is reached by dating an entry
of the managed file 40 days back, as a run that long ago would have written it."""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

from tests.messages import status_of
from tests.test_checkip_playbooks import MANAGED, age_entry
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    HOSTS,
    USER,
    athome,
    body,
    command_email,
    replies,
    site,
    smtp,
    smtp_submission,
)


def test_the_checkip_reply_names_the_addresses_removed_as_expired(site, dovecot, smtp):
    group_vars = site["workdir"] / "inventory" / "group_vars"
    group_vars.mkdir(exist_ok=True)
    (group_vars / "fail2ban_servers.yml").write_text("fail2ban_whitelist_expire_days: 30\n")
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=4.4.4.4", msgid="<old@example.test>"))
    athome(site["cfg"], "poll", "--once")
    athome(site["cfg"], "work", "--once")
    first = [m for m in replies(smtp) if m["In-Reply-To"] == "<old@example.test>" and "✅" in status_of(m)]
    assert len(first) == 1 and "expiração" not in body(first[0])
    age_entry(site["f2b"]["gv2p"], "4.4.4.4", 40)

    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<new@example.test>"))
    athome(site["cfg"], "poll", "--once")
    athome(site["cfg"], "work", "--once")
    [result] = [m for m in replies(smtp) if m["In-Reply-To"] == "<new@example.test>" and "✅" in status_of(m)]
    text = body(result)
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count("Removidos da lista branca por expiração: 4.4.4.4") == 1, text
    gv2p_line = next(i for i, line in enumerate(lines) if "gv2p:" in line)
    assert lines[gv2p_line + 1] == "Removidos da lista branca por expiração: 4.4.4.4", text
    html = result.get_body(("html",)).get_content()
    assert "Removidos da lista branca por expiração: " in html and "4.4.4.4" in html
    for host in HOSTS:
        f2b = site["f2b"][host]
        gone = host == "gv2p"
        assert ("4.4.4.4" in (f2b.dir / MANAGED).read_text()) is not gone
        assert all(("4.4.4.4" in f2b.ignore_list(j)) is not gone for j in f2b.JAILS), host
