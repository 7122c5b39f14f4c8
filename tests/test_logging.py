"""Logs: stderr, journald priorities under systemd, a request id on every line of a job.

The real `athome` command line (poll, work, run) against Dovecot, SMTP and sshd +
fail2ban hosts on loopback, its stderr captured in a file; under journald that file's
device:inode is what JOURNAL_STREAM names, as systemd sets it for the journal stream.
"""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading

from dispatcher import logs
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    IMAP_PASSWORD,
    SMTP_PASSWORD,
    USER,
    command_email,
    site,
    smtp,
    smtp_submission,
    start_service,
)

JOURNAL_LINE = re.compile(r"<(\d)>(\S+) (\S+) (\S+): (.*)")
CONSOLE_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| (\w+) *\| (\S+) \| (\S+) \| (\S+) \| (.*)")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")
REQUEST_ID = re.compile(r"\d{8}_\d{6}_\d{6}_[0-9a-f]{2}")


def record(msg: str, level: int = logging.INFO, args=(), exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("dispatcher.service", level, __file__, 1, msg, args, exc_info)


def test_levels_map_to_syslog_priorities_and_a_traceback_keeps_its_priority_on_every_line():
    assert [logs.priority(lv) for lv in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("could not handle message uid %s", logging.ERROR, ("7",), sys.exc_info())
    with logs.request("20251111_171215_482913_a1"):
        logs.RequestIdFilter().filter(rec)
    lines = logs.JournalFormatter().format(rec).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert (
        lines[0]
        == "<3>MainThread 20251111_171215_482913_a1 dispatcher.service: could not handle message uid 7"
    )
    assert lines[-1] == "<3>ValueError: boom"


def test_the_request_id_comes_from_the_context_of_each_thread_or_from_the_line():
    seen: dict[str, str] = {}

    def job(rid: str) -> None:
        with logs.request(rid):
            rec = record("running")
            logs.RequestIdFilter().filter(rec)
            seen[rid] = rec.request_id

    threads = [threading.Thread(target=job, args=(f"20251111_171215_00000{n}_a{n}",)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {rid: rid for rid in seen} and len(seen) == 2
    named = record("sent reply %s (%s) to %s", args=("20251111_171215_482913_a1-result", "result", "x@y"))
    plain = record("intake pass: %s", args=({"fetched": 1},))
    for rec in (named, plain):
        logs.RequestIdFilter().filter(rec)
    assert (named.request_id, plain.request_id) == ("20251111_171215_482913_a1", "-")


def test_journald_is_recognised_by_the_stream_it_names(tmp_path):
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert logs.under_journald(a)
            assert not logs.under_journald(b), "stderr redirected elsewhere: a readable format"
        finally:
            del os.environ["JOURNAL_STREAM"]
        assert not logs.under_journald(a)


def run_logged(site, *args: str, journal: bool) -> str:
    """`athome ARGS` with its stderr in a file (named by JOURNAL_STREAM when `journal`)."""
    path = site["workdir"] / f"stderr-{len(list(site['workdir'].glob('stderr-*')))}.log"
    env = dict(os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD, ATHOME_TEST_SMTP_PW=SMTP_PASSWORD)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    with path.open("w") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal else ""
        subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", "--config", str(site["cfg"]), *args],
            env=env,
            stderr=err,
            stdout=subprocess.DEVNULL,
            timeout=600,
            check=True,
        )
    return path.read_text()


def assert_no_secret_in(text: str, site) -> None:
    for secret in (site["token"], site["token"].lower(), IMAP_PASSWORD, SMTP_PASSWORD):
        assert secret not in text, f"{secret!r} leaked into the log"


def test_under_journald_each_line_has_its_priority_no_time_and_the_jobs_id(site, dovecot, smtp):
    dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3"))
    dovecot.deliver(USER, command_email(f"[{site['token']}] HELP", sender="eve@example.test", msgid="<e@x>"))
    intake = run_logged(site, "poll", "--once", journal=True)
    [job] = list((site["state"] / "queue" / "pending").iterdir())
    rid = job.name.removesuffix(".json")
    work = run_logged(site, "work", "--once", journal=True)
    lines = [JOURNAL_LINE.fullmatch(line) for line in (intake + work).splitlines()]
    assert lines and all(lines), "every line starts with <N> and names thread, request and logger"
    assert not TIMESTAMP.search(intake + work), "journald adds the time itself"
    by_text = {m.group(5): m for m in lines}
    [queued] = [m for text, m in by_text.items() if text.startswith(f"queued {rid} CHECKIP=3.3.3.3")]
    [eve] = [m for text, m in by_text.items() if "not on the whitelist" in text]
    assert (queued.group(1), queued.group(3)) == ("6", rid), "an intake decision carries its request id"
    assert (eve.group(1), eve.group(3)) == ("4", "-"), "a warning; no request for an ignored sender"
    texts = [m.group(5) for m in lines]
    first = texts.index(next(t for t in texts if t.startswith(f"running {rid}")))
    last = texts.index(f"finished {rid}: success")
    job_lines = lines[first : last + 1]
    assert any("playbook unban.yml finished" in m.group(5) for m in job_lines)
    assert all(m.group(3) == rid for m in job_lines), [m.group(0) for m in job_lines]
    sent = [m for m in lines if m.group(5).startswith("sent reply")]
    assert {m.group(5).split()[2] for m in sent} == {f"{rid}-ack", f"{rid}-result"}
    assert all(m.group(3) == rid for m in sent), "the replies for it carry it too"
    assert_no_secret_in(intake + work, site)


def test_the_service_log_is_readable_and_each_line_of_a_job_carries_its_id(site, dovecot, smtp):
    """Two jobs through the running service: intake and two worker threads log at once."""
    err_path = site["workdir"] / "service.log"
    with err_path.open("w") as err:
        proc = start_service(site["cfg"], env={"JOURNAL_STREAM": ""}, stderr=err)
        try:
            for n, ip in enumerate(("3.3.3.3", "4.4.4.4")):
                dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP={ip}", msgid=f"<j{n}@x>"))
            assert len(smtp.wait_for(4, timeout=240)) == 4, "two confirmations and two results"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
    assert proc.returncode == 0
    text = err_path.read_text()
    lines = [CONSOLE_LINE.fullmatch(line) for line in text.splitlines()]
    assert lines and all(lines), f"every line: time | level | thread | request | logger | message\n{text}"
    ids = sorted(p.name.removesuffix(".json") for p in (site["state"] / "queue" / "done").iterdir())
    assert len(ids) == 2
    for rid in ids:
        mine = [m for m in lines if rid in m.group(5)]
        kinds = {re.sub(r" .*", "", m.group(5)) for m in mine}
        assert {"queued", "running", "finished", "sent"} <= kinds, mine
        assert all(m.group(3) == rid for m in mine), [m.group(0) for m in mine]
    runs = [m for m in lines if m.group(5).startswith("playbook unban.yml finished")]
    assert sorted(m.group(3) for m in runs) == ids, "the runner's own line carries the job it ran for"
    assert all(m.group(2).startswith("work-") for m in runs)
    assert all(REQUEST_ID.fullmatch(m.group(3)) or m.group(3) == "-" for m in lines)
    assert_no_secret_in(text, site)
