"""Dispatcher behaviour that needs no playbook: locks, retention, failure isolation."""

from __future__ import annotations

import email
import os
import shutil
import time
from email import policy

import pytest

from dispatcher import config
from dispatcher.auth import TokenStore
from dispatcher.errors import AthomeError
from dispatcher.inventory import InventoryWatcher
from dispatcher.service import Dispatcher
from tests.messages import AUTH, command_message

REPO_INVENTORY = os.path.join(os.path.dirname(__file__), "..", "inventory", "demo")


@pytest.fixture
def make(tmp_path):
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.add("svc", senders=["ana@example.test"])

    def build(**auth) -> Dispatcher:
        cfg = config.from_dict(
            {
                "state_dir": str(tmp_path / "state"),
                "inventory": REPO_INVENTORY,
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")},
                },
                "auth": {"senders": ["ana@example.test"], "tokens_file": str(tokens.path), **AUTH, **auth},
                "worker": {"retention_days": 30},
            },
            base=tmp_path,
        )
        return Dispatcher(cfg)

    build.token = token
    build.tmp = tmp_path
    return build


def drop(d: Dispatcher, subject: str, msgid: str, **kw) -> None:
    d._inbox_factory().box.add(command_message(subject, msgid=msgid, **kw))


def test_only_one_process_works_the_queue(make):
    first, second = make(), make()
    first.lock("work")
    with pytest.raises(AthomeError, match="already running"):
        second.lock("work")
    second.lock("intake"), "intake and work are separate locks"


def test_retention_removes_old_finished_records_and_markers_only(make):
    d = make()
    old, new = d.jobs.put({"n": 1}), d.jobs.put({"n": 2})
    for _ in (old, new):
        claimed = d.jobs.claim()
        d.jobs.finish(claimed)
    pending = d.jobs.put({"n": 3})
    marker = d.cfg.seen_dir / "abc"
    marker.write_text("{}")
    past = time.time() - 31 * 86400
    os.utime(d.jobs.root / "done" / f"{old.id}.json", (past, past))
    os.utime(d.jobs.root / "pending" / f"{pending.id}.json", (past, past))
    os.utime(marker, (past, past))
    removed = d.prune()
    assert removed["jobs"] == 1 and removed["seen"] == 1
    assert d.jobs.find(old.id) is None and d.jobs.find(new.id) is not None
    assert d.jobs.find(pending.id) is not None, "work still to do is never pruned"


def test_a_message_that_cannot_be_handled_stays_unseen_and_the_others_go_on(make):
    d = make()
    drop(d, f"[{make.token}] HELP", "<bad@x>")
    drop(d, f"[{make.token}] CHECKIP=3.3.3.3", "<good@x>")
    real_render = d.replies.render

    def render(kind, **values):  # fault injection: a broken HELP template
        if kind == "help":
            raise RuntimeError("template broken")
        return real_render(kind, **values)

    d.replies.render = render
    counts = d.poll_once()
    assert counts["failed"] == 1 and counts["queued"] == 1
    assert [m.message_id for m in d._inbox_factory().fetch()] == ["<bad@x>"], "the failed one stays unseen"
    d.replies.render = real_render
    assert d.poll_once()["replied"] == 1, "fixed: handled on the next pass"


def test_a_message_that_always_fails_is_set_aside_after_a_few_passes(make):
    from dispatcher.service import MAX_INTAKE_FAILURES

    d = make()
    drop(d, f"[{make.token}] HELP", "<always@x>")

    real_render = d.replies.render

    def render(kind, **values):  # fault injection: HELP can never be rendered
        if kind == "help":
            raise RuntimeError("template broken")
        return real_render(kind, **values)

    d.replies.render = render
    for _ in range(MAX_INTAKE_FAILURES - 1):
        assert d.poll_once()["failed"] == 1
    assert d._inbox_factory().fetch(), "still unseen, still retried"
    d.poll_once()
    assert d._inbox_factory().fetch() == [], "set aside after the last try"
    [aside] = list((make.tmp / "in" / "cur").iterdir())
    assert aside.name.endswith(":2,FS"), "flagged as set aside, not as handled"
    [alert] = d.outbox.list("done")
    assert alert.payload["kind"] == "security_alert" and alert.payload["rcpt"] == ["admin@example.test"]
    assert [r["outcome"] for r in d.audit.search() if r.get("outcome") == "set aside"] == ["set aside"]


def test_a_fault_of_shared_state_is_never_held_against_a_message(make, tmp_path):
    from dispatcher.service import MAX_INTAKE_FAILURES

    inventory = tmp_path / "inventory"
    shutil.copytree(REPO_INVENTORY, inventory)
    hosts = inventory / "hosts.yml"
    good = hosts.read_text()
    hosts.write_text("all: [this is not an inventory\n")  # broken before the service ever read it
    d = make()
    d.inventory = InventoryWatcher(inventory)
    drop(d, f"[{make.token}] CHECKIP=3.3.3.3", "<shared@x>")
    for _ in range(MAX_INTAKE_FAILURES + 2):
        assert d.poll_once()["failed"] == 1
    assert d._inbox_factory().fetch(), "still unseen: not set aside for the inventory's fault"
    assert d.outbox.list("pending") == [] and d.outbox.list("done") == []
    hosts.write_text(good)  # fixed: the message is handled on the next pass
    assert d.poll_once()["queued"] == 1


def test_a_job_for_a_command_this_version_does_not_know_is_answered_not_looped(make):
    d = make()
    job = d.jobs.put(
        {
            "command": "REBOOTALL",
            "params": {},
            "command_text": "REBOOTALL=1",
            "requester": "ana@example.test",
            "message_id": "<old@x>",
            "references": "",
        }
    )
    assert d.work_once() == 1
    assert d.jobs.get(job.id).state == "failed"
    [reply] = d.outbox.list("done")
    assert reply.id == f"{job.id}-result"


def test_check_reports_every_inventory_problem_in_one_pass(tmp_path):
    import subprocess
    import sys

    inv = tmp_path / "hosts.yml"
    inv.write_text(
        "all:\n  children:\n"
        "    sip_servers:\n      hosts:\n"
        "        gv1p: {audios_from: audio}\n        voip1: {audios_from: s3}\n"
        "        bad1: {audios_from: tape, enabled: 'maybe'}\n"
        "    mac_servers:\n      hosts:\n        gv1p: {}\n"
        "    fail2ban_servers:\n      hosts:\n        gv1p: {}\n"
        "    recordings:\n      hosts:\n        audio: {}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "check", "--inventory", str(inv)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    out = proc.stdout
    assert "bad1: audios_from is 'tape'" in out
    assert "bad1: enabled must be true or false" in out
    assert "gv1p: in mac_servers but endpoint_mac_endpoints_def" in out
    assert "voip1: audios_from is 's3' but recordings_s3_bucket" in out
    assert "audio: in recordings but recordings_root" in out
    assert "5 problem(s) found" in out


def test_check_reports_config_problems_without_leaking_values(tmp_path, monkeypatch):
    import subprocess
    import sys

    cfg = tmp_path / "athome.yml"
    cfg.write_text(
        "mail:\n  transport: imap\n  from_address: ops@example.test\n  admin_addresses: [a@example.test]\n"
        "  imap: {host: imap.example.test, user: ops, password: hunter2hunter2}\n"
        "  smtp: {host: smtp.example.test, password_env: ATHOME_NOT_SET_ANYWHERE}\n"
        "auth: {senders: [a@example.test], tokens_file: " + str(tmp_path / "none.json") + "}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "secrets are not accepted in the config file" in out
    assert "ATHOME_NOT_SET_ANYWHERE is not set" in out
    assert "hunter2hunter2" not in out


def test_automatic_mail_and_replies_to_our_own_mail_get_no_answer(make):
    d = make()
    box = d._inbox_factory().box
    box.add(
        b"From: ana@example.test\r\nAuto-Submitted: auto-replied\r\nMessage-ID: <ooo@x>\r\n"
        b"Subject: Ausente: [A1B2C3D4] CHECKIP=3.3.3.3\r\n\r\nfora do escritorio"
    )
    box.add(
        b"From: ana@example.test\r\nMessage-ID: <re@x>\r\nIn-Reply-To: <1.2.3.athome-ops@example.test>\r\n"
        b"References: <1.2.3.athome-ops@example.test>\r\nSubject: Re: Pedido recebido\r\n\r\nobrigada!"
    )
    counts = d.poll_once()
    assert counts["ignored"] == 2 and counts["replied"] == 0
    assert d.outbox.list("done") == [] and d.outbox.list("pending") == []


def test_a_reply_that_cannot_be_rendered_falls_back_and_the_job_finishes(make):
    d = make()
    job = d.jobs.put(
        {
            "command": "CHECKIP",
            "params": {"ip": "3.3.3.3"},
            "command_text": "CHECKIP=3.3.3.3",
            "requester": "ana@example.test",
            "message_id": "<m@x>",
            "references": "",
        }
    )
    claimed = d.jobs.claim()
    # A report the checkip template cannot show (a host entry that is not a mapping).
    claimed.result = {
        "outcome": "success",
        "playbook": {"status": "successful", "errors": [], "hosts": {"gv1p": {"status": "ok"}}},
    }
    d.jobs.checkpoint(claimed)
    d.work_once()
    assert d.jobs.get(job.id).state == "done"
    [reply] = d.outbox.list("done")
    assert reply.id == f"{job.id}-result" and reply.payload["kind"] in ("result", "bare")


def test_an_operator_retry_gets_its_own_result_reply(make):
    d = make()
    job = d.jobs.put(
        {
            "command": "GONE",
            "params": {},
            "command_text": "GONE=1",
            "requester": "ana@example.test",
            "message_id": "<m@x>",
            "references": "",
        }
    )
    d.work_once()
    d.jobs.retry_failed(job.id)
    d.work_once()
    ids = sorted(r.id for r in d.outbox.list("done"))
    assert ids == [f"{job.id}-result", f"{job.id}-result-1"]


def test_a_reply_refused_for_good_is_set_aside_not_retried_for_months(make, smtp):
    d = make()
    from dispatcher.mail import SMTPSender

    d._sender = SMTPSender(config.SMTPSettings(host="127.0.0.1", port=smtp.port, security="plain", timeout=5))
    drop(d, f"[{make.token}] HELP", "<h@x>")
    smtp.reject = True
    d.poll_once()
    assert d.outbox.count("pending") == 0
    [failed] = d.outbox.list("failed")
    assert "550" in failed.history[-1]["reason"]


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"mail": {"admin_addresses": "admin@example.test"}}, "must be a list"),
        ({"auth": {"senders": ["not-an-address"]}}, "is not an e-mail address"),
        ({"mail": {"imap": {"port": "imaps"}}}, "is not a number"),
        (
            {"mail": {"imap": {"host": "imap.example.test", "security": "plain"}}},
            "only for a server on loopback",
        ),
    ],
)
def test_config_values_of_the_wrong_type_are_problems_not_tracebacks(tmp_path, section, problem):
    from dispatcher.errors import ConfigError

    base = {
        "mail": {
            "transport": "imap",
            "from_address": "ops@example.test",
            "admin_addresses": ["a@example.test"],
            "imap": {"host": "127.0.0.1", "user": "u", "password_env": "X_UNSET"},
            "smtp": {"host": "127.0.0.1"},
        },
        "auth": {"senders": ["a@example.test"], "tokens_file": str(tmp_path / "t.json")},
    }
    for key, value in section.items():
        for sub, v in value.items():
            if isinstance(v, dict):
                base[key][sub] = {**base[key].get(sub, {}), **v}
            else:
                base[key][sub] = v
    with pytest.raises(ConfigError) as info:
        config.from_dict(base, base=tmp_path)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_check_with_a_deployment_config_flags_placeholder_addresses(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "athome.yml"
    cfg.write_text(
        "inventory: inventory/production\n"
        "mail:\n  transport: maildir\n  from_address: ops@example.test\n  admin_addresses: [a@example.test]\n"
        f"  maildir: {{inbox: {tmp_path}/in, outbox: {tmp_path}/out}}\n"
        f"auth: {{senders: [a@example.test], tokens_file: {tmp_path}/t.json,\n"
        "  authentication_results: {trusted_authserv_ids: [mx.google.com]}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "gv1p: ansible_host gv1p.athome.invalid is a placeholder" in proc.stdout
    assert "voip3" not in proc.stdout, "a disabled host is not checked"


def test_bad_token_alerts_are_capped_per_sender_and_hour(make):
    from dispatcher.service import MAX_TOKEN_ALERTS_PER_HOUR

    d = make(lockout={"failures": 100})  # the cap alone, no lock-out
    for i in range(MAX_TOKEN_ALERTS_PER_HOUR + 3):
        drop(d, f"[{i:08X}] CHECKIP=3.3.3.3", f"<guess{i}@x>")
    counts = d.poll_once()
    assert counts["replied"] == MAX_TOKEN_ALERTS_PER_HOUR and counts["ignored"] == 3
    assert len(d.outbox.list("done")) == MAX_TOKEN_ALERTS_PER_HOUR


def test_a_reply_left_in_processing_by_a_dead_sender_is_sent_by_a_later_work_pass(make):
    from dispatcher.service import OUTBOX_STALE_AFTER

    d = make()
    drop(d, f"[{make.token}] HELP", "<stale@x>")
    d._sender, real = None, d._sender
    d.flush_outbox = lambda stop=None: 0  # intake queues the reply but does not send it
    d.poll_once()
    del d.flush_outbox
    d._sender = real
    item = d.outbox.claim()  # a sender claims it and dies before sending
    assert item is not None and d.outbox.count("processing") == 1
    d.work_once()
    assert d.outbox.count("processing") == 1, "too young to be taken for dead"
    path = d.outbox.root / "processing" / f"{item.id}.json"
    os.utime(path, (time.time() - OUTBOX_STALE_AFTER - 5,) * 2)
    d.work_once()
    assert [r.id for r in d.outbox.list("done")] == [item.id]


def test_genuine_mail_is_handled_before_a_flood_and_nothing_is_left_behind(make, monkeypatch):
    from dispatcher import service

    d = make()
    for i in range(4):
        drop(d, f"[{make.token}] CHECKIP=3.3.3.3", f"<forged{i}@x>", results=None)  # not authenticated
    drop(d, f"[{make.token}] HELP", "<genuine@x>")
    handled = []
    real_handle = d._handle

    def spy(inbox, msg, counts):
        handled.append(msg.message_id)
        real_handle(inbox, msg, counts)

    monkeypatch.setattr(d, "_handle", spy)
    monkeypatch.setattr(service, "PRIORITY_BUDGET", 0)  # one suspect message per pass
    counts = d.poll_once()
    assert handled[0] == "<genuine@x>", "the genuine command first"
    assert sorted(handled[1:]) == [f"<forged{i}@x>" for i in range(4)], "each handled once"
    assert counts["fetched"] == 5 and counts["replied"] == 5  # HELP + 4 refusals
    assert d._inbox_factory().fetch() == []


@pytest.mark.parametrize(
    "lockout",
    [{"failures": 0}, {"window_minutes": 0}, {"cooldown_minutes": -1}, {"flood_alert": 0}],
)
def test_a_lockout_setting_that_would_disable_it_is_a_problem(make, lockout):
    from dispatcher.errors import ConfigError

    with pytest.raises(ConfigError, match="auth.lockout"):
        make(lockout=lockout)


def test_copies_that_differ_only_in_white_space_are_the_same_message(make):
    """DKIM's relaxed canonicalisation lets a copy change white space and still verify."""
    d = make()
    subject = f"[{make.token}] CHECKIP=3.3.3.3"
    drop(d, subject, "<ws@x>", date="Sun, 29 Nov 2026 10:00:00 +0000")
    drop(d, subject.replace(" ", "   "), "<ws@x>", date="Sun,  29 Nov 2026  10:00:00 +0000")
    drop(d, subject, "<ws@x>", date="Sun, 29 Nov 2026 07:00:00 -0300", display="Ana  da Silva")
    d.cfg.max_age_hours = 10**6  # the fixed dates above stay fresh
    counts = d.poll_once()
    assert counts["queued"] == 1 and counts["ignored"] == 2
    assert d.jobs.count("pending") == 1


def test_a_message_with_a_duplicated_identity_header_is_ignored(make):
    d = make()
    m = command_message(f"[{make.token}] CHECKIP=3.3.3.3", msgid="<dup@x>")
    raw = m.as_bytes()
    # A Subject (or Date) added above the signed one: the command would change, DKIM would not see it.
    d._inbox_factory().box.add(b"Subject: [" + make.token.encode() + b"] CHECKIP=4.4.4.4\r\n" + raw)
    d._inbox_factory().box.add(b"Date: " + command_message("x")["Date"].encode() + b"\r\n" + raw)
    counts = d.poll_once()
    assert counts["ignored"] == 2 and d.jobs.count("pending") == 0
    assert d.outbox.list("pending") == [] and d.outbox.list("done") == []


def test_mail_without_a_token_does_not_lock_its_sender_out(make):
    d = make()
    for i in range(6):
        drop(d, "Reunião amanhã", f"<plain{i}@x>")
    drop(d, f"[{make.token}] CHECKIP=3.3.3.3", "<after@x>")
    counts = d.poll_once()
    assert counts["queued"] == 1, "ordinary mail re-sent by someone else cannot lock a colleague out"
    assert d.throttle.locked_until("ana@example.test") == 0


def test_a_job_queued_before_a_crash_is_only_confirmed_again_never_refused(make):
    d = make()
    drop(d, f"[{make.token}] CHECKIP=3.3.3.3", "<crash@x>")
    real_ack = d._inbox_factory  # fault injection: the flag after queueing never happens
    d._inbox_factory = lambda: _NoAck(real_ack())
    d.poll_once()
    assert d.jobs.count("pending") == 1
    d._inbox_factory = real_ack
    d.cfg.max_age_hours = 1e-9  # by the next pass the message has grown too old
    for marker in d.cfg.seen_dir.glob("*.decided"):
        marker.unlink()  # and the 'decided' note was lost with the crash
    counts = d.poll_once()
    assert counts["queued"] == 1 and d.jobs.count("pending") == 1
    assert {r.payload["kind"] for r in d.outbox.list("done")} == {"ack"}, "no 'fora do prazo' after the ack"


class _NoAck:
    def __init__(self, inbox):
        self.inbox = inbox

    def __enter__(self):
        self.inbox.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inbox.__exit__(*exc)

    def fetch(self, limit=500):
        return self.inbox.fetch(limit)

    def ack(self, uid):
        raise OSError("the mailbox went away before the flag")


def test_one_sender_cannot_fill_the_genuine_group_of_a_pass(make, monkeypatch):
    from dispatcher.service import GENUINE_PER_SENDER

    d = make(senders=["ana@example.test", "bob@example.test"])
    _, bob_token = TokenStore(make.tmp / "tokens.json").add("bob", senders=["bob@example.test"])
    for i in range(GENUINE_PER_SENDER + 4):
        drop(d, f"[{make.token}] HELP", f"<ana{i}@x>")
    drop(d, f"[{bob_token}] HELP", "<bob@x>", sender="bob@example.test")
    handled = []
    real_handle = d._handle
    monkeypatch.setattr(
        d,
        "_handle",
        lambda inbox, msg, counts: (handled.append(msg.message_id), real_handle(inbox, msg, counts)),
    )
    d.poll_once()
    assert handled.index("<bob@x>") == GENUINE_PER_SENDER, "bob right after ana's first few"
    assert len(handled) == GENUINE_PER_SENDER + 5


def test_times_shown_to_requesters_are_in_the_operators_time_zone():
    from dispatcher.replies import local_time

    assert local_time("2025-11-29T20:31:36Z") == "29/11/2025 17:31 (UTC-03:00)"
    assert local_time("2025-01-15T12:00:00Z", "Europe/Lisbon") == "15/01/2025 12:00 (UTC+00:00)"
    assert local_time(1764448296, "America/Sao_Paulo") == "29/11/2025 17:31 (UTC-03:00)"


def test_an_unknown_time_zone_is_a_config_problem(make):
    from dispatcher.errors import ConfigError

    with pytest.raises(ConfigError, match="timezone"):
        config.from_dict({**_minimal(make.tmp), "timezone": "Brasil/Fortaleza"}, base=make.tmp)


def _minimal(tmp):
    return {
        "mail": {
            "transport": "maildir",
            "from_address": "ops@example.test",
            "admin_addresses": ["admin@example.test"],
            "maildir": {"inbox": str(tmp / "in"), "outbox": str(tmp / "out")},
        },
        "auth": {"senders": ["ana@example.test"], "tokens_file": str(tmp / "tokens.json"), **AUTH},
    }


@pytest.mark.parametrize(
    ("commands", "problem"),
    [
        ({"CHECKIP": {"confirm": True}}, "cannot be confirmed by reply"),
        ({"REBOOT": {"confirm": True}}, "not a command"),
        ({"confirm_minutes": 0}, "confirm_minutes"),
    ],
)
def test_confirmation_settings_that_cannot_work_are_problems(make, commands, problem):
    from dispatcher.errors import ConfigError

    with pytest.raises(ConfigError, match=problem):
        config.from_dict({**_minimal(make.tmp), "commands": commands}, base=make.tmp)


def test_a_huge_hostile_subject_is_cut_before_it_is_decoded_and_refused_in_words(make):
    """email's header parser is superlinear on some forms (400 KB of encoded words took 13 s,
    read before any screening, every pass): the subject is cut to mail.MAX_RAW_SUBJECT first.
    The sender, genuine here, is told the subject is too long."""
    from dispatcher import mail

    d = make()
    hostile = f"[{make.token}] HELP " + "=?x?q?a?= " * 40_000
    raw = command_message("PLACEHOLDER", msgid="<huge@x>").as_bytes()
    d._inbox_factory().box.add(raw.replace(b"PLACEHOLDER", hostile.encode()))
    with d._inbox_factory() as inbox:
        [msg] = inbox.fetch()
    assert msg.subject_cut and len(msg.subject) <= mail.MAX_RAW_SUBJECT
    counts = d.poll_once()
    assert counts["replied"] == 1, counts
    d.flush_outbox()
    [reply] = [m for m in (make.tmp / "out").rglob("*") if m.is_file()]
    text = (
        email.message_from_bytes(reply.read_bytes(), policy=policy.default).get_body(("plain",)).get_content()
    )
    assert "O assunto tem mais de 4096 caracteres; o máximo aceito é 512" in text
    assert make.token not in text


def test_a_token_typed_where_a_mac_goes_never_reaches_the_audit_trail(make):
    """MACATUAL=<12-17 hex> is kept in clear when subjects are quoted; the token itself typed
    there (a paste in the wrong place) is masked anyway: audit trail, replies, queue."""
    d = make()
    drop(
        d,
        f"[{make.token}] MACCHANGE=3010 MACATUAL={make.token} MACFUTURO=010203040599 SERVER=gv2p",
        "<mac@x>",
    )
    assert d.poll_once()["replied"] == 1
    d.flush_outbox()
    written = [*d.cfg.state_dir.rglob("*"), *(make.tmp / "out").rglob("*")]  # not the inbox
    stored = [p.read_bytes() for p in written if p.is_file()]
    assert stored and not [b for b in stored if make.token.encode() in b or make.token.lower().encode() in b]
    audit = b"".join(p.read_bytes() for p in d.cfg.audit_dir.glob("*.jsonl"))
    assert b"MACATUAL=********" in audit


def test_forgeries_in_everyones_name_get_few_refusals_and_those_go_last(make):
    """Forging From costs nothing: 10 whitelisted names x 3 forgeries each would be 30
    refusals an hour (5 per claimed sender); all of them together get at most
    MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR, and they are sent after a colleague's genuine
    answer received after them (and after the admins' alerts)."""
    from dispatcher.service import MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR

    staff = [f"user{n}@example.test" for n in range(10)]
    d = make(senders=["ana@example.test", *staff])
    for n, who in enumerate(staff * 3):
        drop(d, f"[{make.token}] HELP", f"<forged{n}@x>", sender=who, results=None)
    drop(d, f"[{make.token}] HELP", "<genuine@x>")
    counts = d.poll_once()
    d.flush_outbox()
    assert counts["replied"] == MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR + 1 < 30, counts
    assert d.outbox.count("pending") == 0
    sent = sorted(d.outbox.list("done"), key=lambda j: j.history[-1]["at"])
    kinds = [j.payload["kind"] for j in sent]
    assert (
        kinds
        == ["help"] + ["security_alert"] * len(staff) + ["refused"] * MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR
    )
