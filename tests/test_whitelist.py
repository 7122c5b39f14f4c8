"""WHITELIST ADD/REMOVE/LIST: the senders file changed atomically with backups, by email
(real Dovecot, SMTP, the `athome` command line) and by `athome whitelist`."""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import json

import pytest

from dispatcher.auth import BACKUPS_KEPT, SenderWhitelist
from dispatcher.errors import AthomeError
from tests.messages import status_of
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
from tests.test_sender_authenticity import by_status, configure, pending_jobs

BOB = "bob@example.test"


def test_changes_keep_comments_and_other_addresses_and_leave_a_backup(tmp_path):
    f = tmp_path / "senders.txt"
    f.write_text("# staff\nana@example.test, bia@example.test  # NOC\ncarlos@example.test\n")
    wl = SenderWhitelist(["root@example.test"], f)
    assert wl.add("Dan@Example.test") and not wl.add("dan@example.test")
    assert wl.remove("bia@example.test") and not wl.remove("bia@example.test")
    assert f.read_text().splitlines() == [
        "# staff",
        "ana@example.test  # NOC",
        "carlos@example.test",
        "dan@example.test",
    ]
    assert wl.addresses() == {
        "root@example.test",
        "ana@example.test",
        "carlos@example.test",
        "dan@example.test",
    }
    backups = sorted((tmp_path / "senders.txt.backups").iterdir())
    assert len(backups) == 2 and "bia@example.test" in backups[-1].read_text()
    with pytest.raises(AthomeError, match="config file"):
        wl.remove("root@example.test")
    with pytest.raises(AthomeError, match="not an accepted address"):
        wl.add("{{7*7}}@example.test")


def test_only_the_newest_backups_are_kept(tmp_path):
    f = tmp_path / "senders.txt"
    f.write_text("")
    wl = SenderWhitelist(path=f)
    for i in range(BACKUPS_KEPT + 5):
        wl.add(f"user{i}@example.test")
    backups = sorted((tmp_path / "senders.txt.backups").iterdir())
    assert len(backups) == BACKUPS_KEPT
    assert "user23@example.test" in backups[-1].read_text() and "user24" not in backups[-1].read_text()


def admin_email(site, subject: str, msgid: str) -> bytes:
    return command_email(f"[{site['admin_token']}] {subject}", sender=ADMIN, msgid=msgid)


@pytest.fixture
def wl_site(site):
    senders = site["workdir"] / "senders.txt"
    senders.write_text(f"{ADMIN}\n")
    configure(site, senders=[REQUESTER], senders_file=str(senders))
    _, site["admin_token"] = site["tokens"].add("admins", senders=[ADMIN], admin=True)
    site["senders"] = senders
    return site


def test_whitelist_by_email_for_admins_only(wl_site, dovecot, smtp):
    site = wl_site
    _, bob_token = site["tokens"].add("bob", senders=[BOB])
    dovecot.deliver(USER, admin_email(site, f"WHITELIST ADD {BOB}", "<w1@x>"))
    # In the same pass, after the change: the new sender is accepted without a restart.
    dovecot.deliver(USER, command_email(f"[{bob_token}] CHECKIP=3.3.3.3", sender=BOB, msgid="<w2@x>"))
    dovecot.deliver(USER, command_email(f"[{site['token']}] WHITELIST LIST", msgid="<w3@x>"))
    dovecot.deliver(USER, admin_email(site, f"WHITELIST REMOVE {REQUESTER}", "<w4@x>"))
    dovecot.deliver(USER, admin_email(site, f"WHITELIST REMOVE {ADMIN}", "<w5@x>"))
    athome(site["cfg"], "poll", "--once")
    [added] = [m for m in by_status(smtp, "Lista de remetentes: ADD")]
    assert added["To"] == ADMIN and f"{BOB} foi adicionado" in body(added) and BOB in body(added)
    assert BOB in site["senders"].read_text()
    assert [j["payload"]["requester"] for j in pending_jobs(site)] == [BOB]
    [denied] = by_status(smtp, "não permitido")
    assert denied["To"] == REQUESTER and "WHITELIST" in status_of(denied)
    inline, last_admin = by_status(smtp, "Lista de remetentes: REMOVE")
    assert "arquivo de configuração" in body(inline) and REQUESTER in site["cfg"].read_text()
    assert "último endereço" in body(last_admin) and ADMIN in site["senders"].read_text()
    backups = list((site["workdir"] / "senders.txt.backups").iterdir())
    assert len(backups) == 1 and BOB not in backups[0].read_text()
    audit = [json.loads(x) for x in athome(site["cfg"], "audit", "--json").stdout.splitlines()]
    changes = [(r["action"], r["address"], r["outcome"]) for r in audit if r["event"] == "whitelist"]
    assert changes == [("add", BOB, "added"), ("remove", REQUESTER, "refused"), ("remove", ADMIN, "refused")]
    assert all(r["by"] == ADMIN for r in audit if r["event"] == "whitelist")
    assert_no_secret(site, smtp, site["admin_token"], bob_token)


def test_whitelist_from_the_command_line(wl_site):
    site = wl_site
    out = athome(site["cfg"], "whitelist", "add", BOB).stdout
    assert out.startswith("added:") and BOB in out and f"{REQUESTER}\t(config file" in out
    refused = athome(site["cfg"], "whitelist", "remove", ADMIN, check=False)
    assert refused.returncode == 1 and "último endereço" in refused.stdout
    assert athome(site["cfg"], "whitelist", "remove", BOB).stdout.startswith("removed:")
    bad = athome(site["cfg"], "whitelist", "add", "x'@example.test", check=False)
    assert bad.returncode == 1 and "not an accepted address" in bad.stderr
    records = [json.loads(x) for x in athome(site["cfg"], "audit", "--json").stdout.splitlines()]
    assert [r["outcome"] for r in records if r["event"] == "whitelist"] == ["added", "refused", "removed"]
