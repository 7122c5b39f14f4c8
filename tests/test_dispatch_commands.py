"""Each command through the dispatcher (in process, Maildir transport) against real hosts over SSH.

The mail transport here is the embedded Maildir one; IMAP/SMTP are covered by
test_end_to_end.py. The playbooks run for real over sshd on loopback.
"""

from __future__ import annotations

import email
import errno
import json
import re
import time
from email.policy import default as default_policy

import pytest
import yaml

from dispatcher import config
from dispatcher.auth import TokenStore
from dispatcher.service import Dispatcher
from tests import servers
from tests.messages import AUTH, command_message, status_of
from tests.test_macchange_playbook import MacHost

REQUESTER = "ana@example.test"


class Site:
    def __init__(self, workdir, inventory_path, commands=None, senders=(REQUESTER,)):
        self.workdir = workdir
        self.inventory_path = inventory_path
        self.tokens = TokenStore(workdir / "tokens.json")
        _, self.token = self.tokens.add("dispatch tests", senders=[REQUESTER])
        self.cfg = config.from_dict(
            {
                "state_dir": str(workdir / "state"),
                "inventory": str(inventory_path.parent),
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {"inbox": str(workdir / "inbox"), "outbox": str(workdir / "outbox")},
                },
                "auth": {"senders": list(senders), "tokens_file": str(self.tokens.path), **AUTH},
                "commands": commands or {},
                "worker": {"retry_backoff": [0]},
            },
            base=workdir,
        )
        self.dispatcher = Dispatcher(self.cfg)
        self.n = 0

    def send(self, command: str, subject: str | None = None, sender: str = REQUESTER, **headers) -> None:
        """`command` after this site's token, or a whole `subject` as it is."""
        self.n += 1
        msgid = f"<c{self.n}.{time.time()}@example.test>"
        msg = command_message(subject or f"[{self.token}] {command}", sender, msgid, **headers)
        self.dispatcher._inbox_factory().box.add(msg)

    def replies(self) -> list:
        box = self.workdir / "outbox"
        files = [p for sub in ("new", "cur") if (box / sub).exists() for p in (box / sub).iterdir()]
        # In the order they were sent (Date has whole seconds: several replies share one).
        # Maildir names end in Q<n>, a per-process counter: the tie-break for equal mtimes.
        files.sort(key=lambda p: (p.stat().st_mtime_ns, int(re.search(r"Q(\d+)", p.name).group(1))))
        return [email.message_from_bytes(p.read_bytes(), policy=default_policy) for p in files]

    def last_result(self):
        results = [m for m in self.replies() if "recebido" not in status_of(m)]
        return results[-1], results[-1].get_body(("plain",)).get_content()


@pytest.fixture
def mac_site(sshd, workdir):
    gv2p = MacHost(workdir, "gv2p")
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv2p": {"audios_from": "audio"}, "voip1": {"audios_from": "s3"}},
            "mac_servers": {"gv2p": gv2p.hostvars(servers.target_python())},
            "fail2ban_servers": {"voip1": {}},
            "recordings": {"audio": {}},
        },
        conn,
    )
    return Site(workdir, inv), gv2p


def test_macchange_by_email_edits_both_files_and_reports_before_and_after(mac_site):
    site, gv2p = mac_site
    site.send("MACCHANGE=3010 MACATUAL=01:02:03:04:05:06 MACFUTURO=010203040599 SERVER=gv2p")
    assert site.dispatcher.poll_once()["queued"] == 1
    assert site.dispatcher.work_once() == 1
    msg, text = site.last_result()
    assert "✅" in status_of(msg) and "MACCHANGE" in status_of(msg)
    assert "'serialnumber': '010203040506'" in text and "'serialnumber': '010203040599'" in text
    assert "MAC:010203040599" in text and "troca" in text
    def_bytes, sip_bytes = gv2p.files()
    assert b"'serialnumber': '010203040599'" in def_bytes and b"3010;MAC:010203040599;" in sip_bytes
    assert len(gv2p.backups()) == 2 and gv2p.notifications() == 1


def test_a_warning_of_the_module_reaches_the_requester_in_portuguese(mac_site):
    """Adding a MAC to an extension without one: endpoint_mac warns (in English) that other
    extensions have none either; the reply says it in Portuguese, the English after it."""
    site, _ = mac_site
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO= SERVER=gv2p")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    site.send("MACCHANGE=3010 MACATUAL= MACFUTURO=010203040588 SERVER=gv2p")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    msg, text = site.last_result()
    assert "✅" in status_of(msg), text
    assert "Atenção: Outros ramais também estão sem MAC: 2010." in text
    assert "(detalhe técnico: other extensions also have no MAC: 2010)" in text
    html = msg.get_body(("html",)).get_content()
    assert "Outros ramais também estão sem MAC: 2010." in html


def test_macchange_with_a_wrong_current_mac_writes_nothing_and_says_why(mac_site):
    site, gv2p = mac_site
    before = gv2p.files()
    site.send("MACCHANGE=3010 MACATUAL=AABBCCDDEEFF MACFUTURO=010203040599 SERVER=gv2p")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    msg, text = site.last_result()
    assert "❌" in status_of(msg)
    assert "nenhum arquivo foi alterado" in text and "010203040506" in text
    why = "O MAC atual informado (AABBCCDDEEFF) não é o que o ramal 3010 tem nos dois arquivos"
    detail = "Detalhe técnico: extension 3010 does not hold MAC AABBCCDDEEFF in both files"
    assert why in text and detail in text and text.index(why) < text.index(detail), text
    html = msg.get_body(("html",)).get_content()
    assert why in html and html.index(why) < html.index("Detalhe técnico"), html
    assert gv2p.files() == before and gv2p.backups() == []
    [failed] = site.dispatcher.jobs.list("failed")
    assert failed.attempts == 1, "a refusal on the server is definitive: not retried"


def test_inventory_edits_are_picked_up_without_a_restart(mac_site):
    site, _gv2p = mac_site
    data = yaml.safe_load(site.inventory_path.read_text())
    data["all"]["children"]["mac_servers"]["hosts"]["gv2p"]["enabled"] = False
    site.inventory_path.write_text(yaml.safe_dump(data))
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    assert site.dispatcher.poll_once()["replied"] == 1
    text = site.replies()[-1].get_body(("plain",)).get_content()
    assert "desativado" in text
    assert site.dispatcher.jobs.count("pending") == 0


@pytest.fixture
def ramais_site(sshd, workdir):
    from datetime import date

    from tests import recordings_support as rs

    calls = rs.generate_calls([date(2025, 11, 3), date(2025, 11, 4)], 150, seed=7)
    rs.write_tree(workdir / "tree", calls, "dated")
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv1p": {"audios_from": "audio"}},
            "recordings": {
                "audio": {
                    "recordings_root": str(workdir / "tree"),
                    "recordings_publish_dir": str(workdir / "www"),
                    "recordings_publish_base_url": "http://127.0.0.1:9/recordings",
                }
            },
            "fail2ban_servers": {},
            "mac_servers": {},
        },
        conn,
    )
    return Site(workdir, inv), calls


def test_ramais_by_email_sends_the_link_and_the_counts_per_extension(ramais_site):
    from tests import recordings_support as rs

    site, calls = ramais_site
    site.send("RAMAIS=1121,1122 SERVER=gv1p INICIO=03/11/2025 08:00 FIM=04/11/2025 18:30")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    msg, text = site.last_result()
    want = rs.expected(calls, ["1121", "1122"], "2025-11-03 08:00", "2025-11-04 18:30")
    assert want, "the generated tree has calls in the window"
    assert "✅" in status_of(msg)
    assert f"{len(want)} gravações" in text
    for ext in ("1121", "1122"):
        n = sum(1 for c in want if ext in c.parties)
        assert f"ramal {ext}: {n}" in text
    assert "http://127.0.0.1:9/recordings/" in text and ".zip" in text
    zips = list((site.workdir / "www").glob("*.zip"))
    assert len(zips) == 1
    assert (site.workdir / "www" / "index.html").read_text() == "", "the folder cannot be listed"


def test_ramais_with_nothing_in_the_window_says_so_and_echoes_the_criteria(ramais_site):
    site, _calls = ramais_site
    site.send("RAMAIS=1121 SERVER=gv1p INICIO=01/10/2025 00:00 FIM=02/10/2025 00:00")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    msg, text = site.last_result()
    assert "Nenhuma gravação encontrada" in text
    assert "01/10/2025 00:00 a 02/10/2025 00:00" in text and "1121" in text
    assert "❌" not in status_of(msg)
    assert not list((site.workdir / "www").glob("*.zip"))


def test_a_target_disabled_between_queueing_and_running_is_not_reported_as_done(mac_site):
    site, gv2p = mac_site
    before = gv2p.files()
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    assert site.dispatcher.poll_once()["queued"] == 1
    data = yaml.safe_load(site.inventory_path.read_text())
    data["all"]["children"]["mac_servers"]["hosts"]["gv2p"]["enabled"] = False
    site.inventory_path.write_text(yaml.safe_dump(data))
    site.dispatcher.work_once()
    msg, text = site.last_result()
    assert "❌" in status_of(msg), text
    assert gv2p.files() == before


# --------------------------------------------------------------- confirm by reply

CONFIRMED = {"MACCHANGE": {"confirm": True}}


@pytest.fixture
def confirm_site(sshd, workdir):
    gv2p = MacHost(workdir, "gv2p")
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv2p": {"audios_from": "audio"}},
            "mac_servers": {"gv2p": gv2p.hostvars(servers.target_python())},
        },
        conn,
    )
    return Site(workdir, inv, commands=CONFIRMED, senders=(REQUESTER, "bob@example.test")), gv2p


def confirmation_request(site):
    [msg] = [m for m in site.replies() if "Confirme" in status_of(m)]
    code = msg["Subject"].rsplit("CONFIRMAR ", 1)[1].strip()
    return msg, msg.get_body(("plain",)).get_content(), code


def test_a_confirmed_command_shows_the_change_runs_only_on_the_right_reply_and_once(confirm_site):
    site, gv2p = confirm_site
    d = site.dispatcher
    before = gv2p.files()
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    assert d.poll_once()["queued"] == 1
    [ack] = site.replies()
    assert "confirmação" in ack.get_body(("plain",)).get_content()
    d.work_once()  # the check run
    assert gv2p.files() == before and gv2p.backups() == [] and gv2p.notifications() == 0
    [waiting] = d.jobs.list("waiting")
    msg, text, code = confirmation_request(site)
    assert len(code) == 8 and code not in json.dumps(waiting.payload), "the code is never stored"
    assert "'serialnumber': '010203040506'" in text and "'serialnumber': '010203040599'" in text
    assert "MAC:010203040599" in text and "Nada foi alterado ainda" in text
    # wrong, foreign and malformed codes change nothing
    wrong = ("Z" if code[0] != "Z" else "Y") + code[1:]
    site.send("", subject=f"CONFIRMAR {wrong}")
    site.send("", subject=f"CONFIRMAR {code}", sender="bob@example.test")
    site.send("", subject="CONFIRMAR 123")
    assert d.poll_once()["replied"] == 3
    assert d.jobs.count("waiting") == 1 and d.jobs.count("pending") == 0
    refusals = [m for m in site.replies() if "Confirmação não aceita" in status_of(m)]
    assert len(refusals) == 3 and all(code not in m.as_string() for m in refusals)
    # a plain reply to the confirmation request, no token: the code in its subject is enough
    site.send(
        "", subject=f"Re: {msg['Subject']}", In_Reply_To=msg["Message-ID"], References=msg["Message-ID"]
    )
    assert d.poll_once()["queued"] == 1
    assert "Confirmação recebida" in site.replies()[-1].get_body(("plain",)).get_content()
    d.work_once()
    result, text = site.last_result()
    assert "✅" in status_of(result) and "MAC:010203040599" in text
    assert b"3010;MAC:010203040599;" in gv2p.files()[1] and gv2p.notifications() == 1
    # the same code again (a replayed confirmation): nothing
    site.send("", subject=f"CONFIRMAR {code}")
    d.poll_once()
    d.work_once()
    assert gv2p.notifications() == 1 and d.jobs.count("done") == 1
    assert len([m for m in site.replies() if "Confirmação não aceita" in status_of(m)]) == 4
    records = [
        json.loads(x) for f in sorted((d.cfg.audit_dir).glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert code not in json.dumps(records), "never a code in the audit trail"
    assert [r["event"] for r in records].count("confirmation-requested") == 1


def test_a_confirmation_handled_again_after_a_full_disk_is_acknowledged(confirm_site, monkeypatch):
    """The disk fills up right after the CONFIRMAR took its job out of waiting/ (its ack cannot
    be written) and the message stays unseen: handled again, it is answered "Confirmação
    recebida", not "não aceita" (its code is spent by then), and the change runs once."""
    site, gv2p = confirm_site
    d = site.dispatcher
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    d.poll_once()
    d.work_once()
    _msg, _text, code = confirmation_request(site)
    real_put = d.outbox.put

    def full_disk(payload, job_id=None, **kw):
        if job_id and job_id.endswith("-confirmed"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(payload, job_id=job_id, **kw)

    monkeypatch.setattr(d.outbox, "put", full_disk)
    site.send("", subject=f"CONFIRMAR {code}")
    counts = d.poll_once()
    assert counts["queued"] == 0 and d.jobs.count("pending") == 1, counts  # resumed, ack not written
    monkeypatch.setattr(d.outbox, "put", real_put)  # space again
    assert d.poll_once()["queued"] == 1
    statuses = [status_of(m) for m in site.replies()]
    assert not [s for s in statuses if "não aceita" in s], statuses
    assert "Confirmação recebida" in site.replies()[-1].get_body(("plain",)).get_content()
    d.work_once()
    assert gv2p.notifications() == 1 and d.jobs.count("done") == 1
    assert d.poll_once()["queued"] == 0, "flagged now: a third pass finds nothing"


def test_an_unconfirmed_command_expires_with_a_reply_and_changes_nothing(confirm_site):
    site, gv2p = confirm_site
    d = site.dispatcher
    before = gv2p.files()
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    d.poll_once()
    d.work_once()
    _msg, _text, code = confirmation_request(site)
    [job] = d.jobs.list("waiting")
    job.payload["confirm"]["expires"] = time.time() - 1  # the 30 minutes have passed
    d.jobs.checkpoint(job)
    site.send("", subject=f"CONFIRMAR {code}")
    d.poll_once()
    assert [m for m in site.replies() if "Confirmação não aceita" in status_of(m)], "too late"
    d.work_once()  # the sweep fails it with a reply
    [failed] = d.jobs.list("failed")
    assert failed.id == job.id and gv2p.files() == before
    msg, text = site.last_result()
    assert "❌" in status_of(msg) and "não chegou a tempo" in text


def test_a_check_that_finds_nothing_to_change_asks_for_no_confirmation(confirm_site):
    site, gv2p = confirm_site
    d = site.dispatcher
    site.send("MACCHANGE=3010 MACATUAL=AABBCCDDEEFF MACFUTURO=010203040599 SERVER=gv2p")
    d.poll_once()
    d.work_once()
    assert d.jobs.count("waiting") == 0 and not [m for m in site.replies() if "Confirme" in status_of(m)]
    msg, text = site.last_result()
    assert "❌" in status_of(msg) and "nenhum arquivo foi alterado" in text


def test_what_ran_and_what_changed_is_in_the_audit_trail(mac_site):
    site, _gv2p = mac_site
    site.send("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p")
    site.dispatcher.poll_once()
    site.dispatcher.work_once()
    trail = site.dispatcher.audit
    assert trail.verify()[1] == []
    [result] = [r for r in trail.search(command="MACCHANGE") if r["event"] == "result"]
    assert (
        result["outcome"] == "success"
        and result["changed"] == ["gv2p"]
        and result["playbook"] == "macchange.yml"
    )
    [message] = [r for r in trail.search(command="MACCHANGE") if r["event"] == "message"]
    assert message["request_id"] == result["request_id"] and message["outcome"] == "queued"
