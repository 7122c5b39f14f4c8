"""From a command email in a real IMAP mailbox to a playbook run over SSH and two replies.

Real parts: Dovecot (IMAP), aiosmtpd (SMTP), sshd and fail2ban-server on
loopback; the dispatcher runs as the `athome` command line, as in production.
"""

from __future__ import annotations

import base64
import contextlib
import email
import json
import os
import subprocess
import sys
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from dispatcher.auth import TokenStore
from tests import servers
from tests.messages import AUTH, command_message, status_of

USER = "service@example.test"
IMAP_PASSWORD = "imap-test-password"
SMTP_PASSWORD = "smtp-test-password-e2e"
REQUESTER = "ana@example.test"
ADMIN = "admin@example.test"
HOSTS = ("gv1p", "gv2p", "gv3p")


@pytest.fixture(scope="module")
def smtp_submission(dovecot):
    """A submission server like production's: STARTTLS required, then AUTH."""
    sink = servers.SMTPSink(cert=dovecot.cert, key=dovecot.key, login=USER, password=SMTP_PASSWORD).start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp(smtp_submission):
    return smtp_submission.reset()


def athome(
    cfg: Path, *args: str, crash_at: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD, ATHOME_TEST_SMTP_PW=SMTP_PASSWORD)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env.pop("ATHOME_CRASH_AT", None)
    if crash_at:
        env["ATHOME_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (cfg.parent / "cli.log").open("a").write(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"athome {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_service(cfg: Path, env: dict[str, str] | None = None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """`athome run` as systemd would start it (secrets in its environment, `env` added),
    output piped (stderr with it, or where `stderr` says)."""
    env = dict(
        os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD, ATHOME_TEST_SMTP_PW=SMTP_PASSWORD, **(env or {})
    )
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def command_email(subject: str, sender: str = REQUESTER, msgid: str = "<cmd-1@example.test>", **kw) -> bytes:
    """As the receiving server delivers it: with its Authentication-Results (see tests/messages.py)."""
    return command_message(subject, sender, msgid, display="Ana", **kw).as_bytes()


@pytest.fixture
def site(workdir, sshd, dovecot, smtp, fail2ban_factory):
    """A dispatcher configured against real IMAP/SMTP and three fail2ban hosts over SSH."""
    f2b = {h: fail2ban_factory(h) for h in HOSTS}
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    hostvars = {h: {"fail2ban_whitelist_conf_dir": str(f2b[h].dir), "audios_from": "audio"} for h in HOSTS}
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": hostvars,
            "fail2ban_servers": {h: {} for h in HOSTS},
            "mac_servers": {"gv1p": {}},
            "recordings": {"audio": {"enabled": True}},
        },
        conn,
    )
    tokens = TokenStore(workdir / "tokens.json")
    _, token = tokens.add("e2e", senders=[REQUESTER])
    cfg = workdir / "athome.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(workdir / "state"),
                "inventory": str(inv.parent),
                "mail": {
                    "transport": "imap",
                    "from_address": USER,
                    "admin_addresses": [ADMIN],
                    "imap": {
                        "host": "127.0.0.1",
                        "port": dovecot.imap_port,
                        "security": "plain",
                        "user": USER,
                        "password_env": "ATHOME_TEST_IMAP_PW",
                    },
                    "smtp": {
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "security": "starttls",
                        "user": USER,
                        "password_env": "ATHOME_TEST_SMTP_PW",
                        "cafile": str(dovecot.cert),
                    },
                },
                "auth": {"senders": [REQUESTER], "tokens_file": str(tokens.path), **AUTH},
                "worker": {"retry_backoff": [0], "poll_interval": 1},
            }
        )
    )
    # Start from an empty mailbox.
    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "expunge", "-u", USER, "mailbox", "INBOX", "all"], check=True
    )
    return {
        "cfg": cfg,
        "token": token,
        "tokens": tokens,
        "f2b": f2b,
        "state": workdir / "state",
        "workdir": workdir,
    }


def replies(smtp) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m[2].as_bytes(), policy=default_policy) for m in smtp.messages]


def body(msg) -> str:
    return msg.get_body(("plain",)).get_content()


def assert_no_secret(site, smtp, *extra: str) -> None:
    secrets = [site["token"], site["token"].lower(), IMAP_PASSWORD, SMTP_PASSWORD, *extra]
    for path in Path(site["state"]).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".json" and "outbox" in path.parts:  # stored replies are base64 MIME
                data += base64.b64decode(json.loads(data)["payload"]["raw"])
            for s in secrets:
                assert s.encode() not in data, f"{s!r} leaked into {path}"
    cli_log = site["cfg"].parent / "cli.log"
    log = cli_log.read_text() if cli_log.exists() else ""
    for s in secrets:
        assert s not in log, f"{s!r} leaked into the logs"
    for m in smtp.messages:
        raw = m[2].as_bytes()
        for s in secrets:
            assert s.encode() not in raw, f"{s!r} leaked into a reply"


def test_checkip_email_is_confirmed_run_over_ssh_and_answered(site, dovecot, smtp):
    site["f2b"]["gv3p"].ban("asterisk", "3.3.3.3")
    dovecot.deliver(USER, command_email(f"Re: [{site['token']}] CHECKIP=3.3.3.3"))

    athome(site["cfg"], "poll", "--once")
    [ack] = replies(smtp)
    assert ack["In-Reply-To"] == "<cmd-1@example.test>"
    assert "recebido" in status_of(ack) and "CHECKIP=3.3.3.3" in body(ack)
    assert dovecot.fetch_flags(USER) == ["\\Seen"], "flagged only after the job was queued"
    [job] = list((site["state"] / "queue" / "pending").iterdir())
    assert site["f2b"]["gv3p"].banned_jails("3.3.3.3") == ["asterisk"], "nothing ran yet"

    athome(site["cfg"], "work", "--once")
    ack, result = replies(smtp)
    assert result["In-Reply-To"] == "<cmd-1@example.test>"
    assert "✅" in status_of(result) and "concluído" in status_of(result)
    text = body(result)
    for host in HOSTS:
        assert host in text
        f2b = site["f2b"][host]
        assert f2b.banned_jails("3.3.3.3") == []
        assert all("3.3.3.3" in f2b.ignore_list(j) for j in f2b.JAILS)
    assert "asterisk" in text, "the reply names the jail that banned it"
    assert (site["state"] / "queue" / "done" / job.name).exists()
    html = result.get_body(("html",)).get_content()
    assert "<table" in html and "gv3p" in html
    [artifacts] = list((site["state"] / "artifacts").iterdir())
    kept = {p.name for p in artifacts.iterdir()}
    assert "stdout" in kept and "job_events" in kept, "the run is kept for ops"
    assert "command" not in kept and "env" not in kept, "not the environment ansible-runner records"
    assert_no_secret(site, smtp)


def test_hostile_and_malformed_commands_get_a_clear_reply_and_reach_no_server(site, dovecot, smtp):
    subjects = [
        f"[{site['token']}] CHECKIP=3.3.3.3;reboot",
        f"[{site['token']}] CHECKIP={{{{ lookup('pipe','id') }}}}",
        f"[{site['token']}] MACCHANGE=3010 MACATUAL=010203040506 SERVER=gv2p",  # gv2p: not a MAC server here
        f"[{site['token']}] RAMAIS=1121 SERVER=gv1p INICIO=01/01/2025 00:00 FIM=01/03/2025 00:00",
    ]
    for i, s in enumerate(subjects):
        dovecot.deliver(USER, command_email(s, msgid=f"<bad-{i}@example.test>"))
    athome(site["cfg"], "poll", "--once")
    got = replies(smtp)
    assert len(got) == len(subjects)
    for m in got:
        assert "não aceito" in status_of(m)
        assert "Forma correta" in body(m) and "[SEU TOKEN]" in body(m)
    assert list((site["state"] / "queue" / "pending").iterdir()) == []
    actions = [site["f2b"][h].dir / "actions.log" for h in HOSTS]
    assert not any(a.exists() and a.read_text() for a in actions), "no server was touched"
    assert_no_secret(site, smtp)


def test_bad_token_goes_to_the_admin_with_the_requester_in_copy(site, dovecot, smtp):
    dovecot.deliver(USER, command_email("[DEADBEEF] CHECKIP=3.3.3.3", msgid="<t1@example.test>"))
    dovecot.deliver(USER, command_email("CHECKIP=3.3.3.3", msgid="<t2@example.test>"))
    athome(site["cfg"], "poll", "--once")
    got = replies(smtp)
    assert len(got) == 2
    for m, (_frm, rcpt, _raw) in zip(got, smtp.messages, strict=True):
        assert m["Subject"].endswith("Erro - Token Invalido")
        assert m["To"] == ADMIN and m["Cc"] == REQUESTER
        assert sorted(rcpt) == sorted([ADMIN, REQUESTER])
        assert "DEADBEEF" not in m.as_string()
    assert list((site["state"] / "queue" / "pending").iterdir()) == []


def test_sender_not_on_the_whitelist_gets_no_reply_at_all(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", sender="eve@example.test"))
    athome(site["cfg"], "poll", "--once")
    assert smtp.messages == []
    assert dovecot.fetch_flags(USER) == ["\\Seen"], "handled (ignored), not fetched again and again"
    assert "not on the whitelist" in (site["cfg"].parent / "cli.log").read_text()


def test_a_crash_before_the_message_is_flagged_does_not_queue_it_twice(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3"))
    proc = athome(site["cfg"], "poll", "--once", crash_at="intake-before-ack", check=False)
    assert proc.returncode == 77
    assert dovecot.fetch_flags(USER) == [""], "still unseen: it will be fetched again"
    athome(site["cfg"], "poll", "--once")
    assert len(list((site["state"] / "queue" / "pending").iterdir())) == 1
    assert len(replies(smtp)) == 1, "one confirmation only"
    assert dovecot.fetch_flags(USER) == ["\\Seen"]


def test_a_crash_after_the_run_completes_the_job_without_running_it_again(site, dovecot, smtp):
    site["f2b"]["gv1p"].ban("sshd", "4.4.4.4")
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=4.4.4.4"))
    athome(site["cfg"], "poll", "--once")
    proc = athome(site["cfg"], "work", "--once", crash_at="work-after-checkpoint", check=False)
    assert proc.returncode == 77
    actions_before = (site["f2b"]["gv1p"].dir / "actions.log").read_text()
    athome(site["cfg"], "work", "--once")
    assert (site["f2b"]["gv1p"].dir / "actions.log").read_text() == actions_before
    results = [m for m in replies(smtp) if "CHECKIP concluído" in status_of(m)]
    assert len(results) == 1
    [done] = list((site["state"] / "queue" / "done").iterdir())
    record = json.loads(done.read_text())
    assert record["result"]["playbook"]["hosts"]["gv1p"]["report"]["banned_in"] == ["sshd"]
    assert [h["event"] for h in record["history"]].count("claimed") == 1


def test_an_smtp_outage_delays_replies_and_loses_none(site, dovecot, smtp):
    smtp.down = True
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP"))
    athome(site["cfg"], "poll", "--once")
    assert smtp.messages == []
    pending = list((site["state"] / "outbox" / "pending").iterdir())
    assert len(pending) == 1
    record = json.loads(pending[0].read_text())
    record["not_before"] = 0  # do not wait for the backoff in the test
    pending[0].write_text(json.dumps(record))
    smtp.down = False
    athome(site["cfg"], "poll", "--once")
    [help_reply] = replies(smtp)
    assert "Comandos" in status_of(help_reply) and "CHECKIP" in body(help_reply)


def test_status_shows_a_request_to_its_requester(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=5.5.5.5", msgid="<s1@example.test>"))
    athome(site["cfg"], "poll", "--once")
    [job] = list((site["state"] / "queue" / "pending").iterdir())
    request_id = job.name.removesuffix(".json")
    dovecot.deliver(USER, command_email(f"[{site['token']}] STATUS {request_id}", msgid="<s2@example.test>"))
    athome(site["cfg"], "poll", "--once")
    status = replies(smtp)[-1]
    assert request_id in status_of(status)
    assert "na fila" in body(status) and "CHECKIP=5.5.5.5" in body(status)


def test_unreachable_hosts_are_retried_then_reported(site, dovecot, smtp, ssh_keys):
    # Point every host at a port where no sshd listens: nothing can succeed.
    inv = site["workdir"] / "inventory" / "hosts.yml"
    data = yaml.safe_load(inv.read_text())
    data["all"]["vars"]["ansible_port"] = servers.free_port()
    data["all"]["vars"]["ansible_ssh_common_args"] += " -o ConnectTimeout=3"
    inv.write_text(yaml.safe_dump(data))
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=6.6.6.6"))
    athome(site["cfg"], "poll", "--once")
    athome(site["cfg"], "work", "--once")  # attempts 1..3 (backoff 0 in this config)
    failure = replies(smtp)[-1]
    assert "❌" in status_of(failure) and "falhou" in status_of(failure)
    text = body(failure)
    assert "inacessível" in text and "mais tarde" in text
    [failed] = list((site["state"] / "queue" / "failed").iterdir())
    assert json.loads(failed.read_text())["attempts"] == 3


def test_the_service_wakes_up_in_imap_idle_when_mail_arrives(site, dovecot, smtp):
    """poll_interval is 10 minutes here: only IMAP IDLE can answer within the test's wait."""
    import signal

    cfg = yaml.safe_load(site["cfg"].read_text())
    cfg["worker"]["poll_interval"] = 600
    site["cfg"].write_text(yaml.safe_dump(cfg))
    proc = start_service(site["cfg"])
    try:
        # A first command proves the service is up and has made a pass; after it the
        # service waits in IDLE (a fetch it might still be making sees the second one too).
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<first@example.test>"))
        assert len(smtp.wait_for(1, timeout=60)) == 1
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<idle@example.test>"))
        got = smtp.wait_for(2, timeout=60)
        assert len(got) == 2 and all("Comandos" in status_of(m) for m in replies(smtp))
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output


def test_a_message_that_keeps_failing_is_set_aside_in_the_quarantine_folder(site, dovecot, smtp, monkeypatch):
    from dispatcher import config
    from dispatcher.service import MAX_INTAKE_FAILURES, Dispatcher

    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "mailbox", "create", "-u", USER, "Quarentena"], check=False
    )
    cfg = yaml.safe_load(site["cfg"].read_text())
    cfg["mail"]["imap"]["quarantine_folder"] = "Quarentena"
    site["cfg"].write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("ATHOME_TEST_IMAP_PW", IMAP_PASSWORD)
    monkeypatch.setenv("ATHOME_TEST_SMTP_PW", SMTP_PASSWORD)
    d = Dispatcher(config.load(site["cfg"]))
    real_render = d.replies.render

    def render(kind, **values):  # fault injection: this message's reply can never be rendered
        if kind == "help":
            raise RuntimeError("template broken")
        return real_render(kind, **values)

    d.replies.render = render
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<aside@example.test>"))
    for _ in range(MAX_INTAKE_FAILURES):
        d.poll_once()
    assert dovecot.fetch_flags(USER) == [], "moved out of the inbox"
    [flags] = dovecot.fetch_flags(USER, "Quarentena")
    assert "$AthomeSetAside" in flags and "\\Seen" in flags
    [alert] = replies(smtp)
    assert alert["To"] == ADMIN and "deixada de lado" in status_of(alert) and "Quarentena" in body(alert)
    assert_no_secret(site, smtp)


def test_the_service_rides_out_a_dovecot_restart_and_handles_mail_delivered_meanwhile(site, dovecot, smtp):
    """Dovecot stops while the service waits in IDLE; mail arriving meanwhile is deferred
    (the MTA keeps it and retries); Dovecot comes back: the service reconnects by itself
    and answers the mail the MTA then delivers."""
    import signal

    proc = start_service(site["cfg"])
    try:
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", msgid="<before@example.test>"))
        assert len(smtp.wait_for(1, timeout=60)) == 1, "up and in IDLE"
        clients = descendants(dovecot.proc.pid)  # its imap processes hold the service's session
        assert clients, "the service's IMAP session is served by a Dovecot process"
        dovecot.stop()
        for pid in clients:  # a restart drops every connection
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        during = command_email(f"[{site['token']}] HELP", msgid="<during@example.test>")
        lda = ["/usr/lib/dovecot/dovecot-lda", "-c", str(dovecot.conf), "-d", USER]
        deferred = subprocess.run(lda, input=during, capture_output=True, timeout=30)
        assert deferred.returncode == 75, "EX_TEMPFAIL: the MTA keeps the mail and retries"
        dovecot.start()
        dovecot.deliver(USER, during)  # the MTA's retry
        got = smtp.wait_for(2, timeout=90)
        assert len(got) == 2, "answered after the restart"
        assert proc.poll() is None, "the service never stopped"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert "reconnecting" in output, "it saw the connection go and came back by itself"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
