"""`athome status` (another process) shows which hosts the running service holds locked, by
which job and since when; a lock held past the longest run timeout makes it degraded; the
notes of a service that died with locks held are not taken for the truth. A real run: a
CHECKIP on three fail2ban hosts over ssh, one of them a tarpit (accepts TCP, never speaks),
so the job holds its locks while status is read.
"""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import yaml

from dispatcher import config, health
from tests import servers
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    HOSTS,
    USER,
    athome,
    command_email,
    descendants,
    site,
    smtp,
    smtp_submission,
    start_service,
)
from tests.test_timeouts import Tarpit


def status(site) -> dict:
    return json.loads(athome(site["cfg"], "status", "--json", check=False).stdout)


def test_status_shows_the_hosts_a_running_job_holds_and_forgets_a_dead_services_locks(site, dovecot, smtp):
    tarpit = Tarpit()
    inv = site["workdir"] / "inventory" / "hosts.yml"
    data = yaml.safe_load(inv.read_text())
    data["all"]["children"]["sip_servers"]["hosts"]["gv3p"]["ansible_port"] = tarpit.port
    inv.write_text(yaml.safe_dump(data))
    cfg = yaml.safe_load(site["cfg"].read_text())
    cfg["worker"]["max_attempts"] = 1
    site["cfg"].write_text(yaml.safe_dump(cfg))
    proc = start_service(site["cfg"])
    try:
        checkip = command_email(f"[{site['token']}] CHECKIP=7.7.7.7", msgid="<lock@example.test>")
        dovecot.deliver(USER, checkip)
        found: dict = {}

        def locked() -> bool:
            found.update(status(site))
            return len(found["locked_hosts"]) == len(HOSTS)

        servers.wait_for(locked, "status to show the job's host locks", 120, proc)
        [job] = {lock["job"] for lock in found["locked_hosts"]}
        assert [lock["host"] for lock in found["locked_hosts"]] == sorted(HOSTS)
        assert all(0 <= lock["held_for"] < 120 for lock in found["locked_hosts"])
        assert (site["state"] / "queue" / "processing" / f"{job}.json").exists(), "the job that runs"
        text = athome(site["cfg"], "status", check=False).stdout
        assert f"locked hosts: gv1p by {job} for " in text
        assert not any("locked by" in r for r in found["reasons"]), "held for less than a run: fine"

        # The same notes read later than the longest run timeout + margin: degraded, and why.
        cfgobj = config.load(site["cfg"])
        later = time.time() + health.longest_run(cfgobj) + health.LOCK_MARGIN + 60
        code, reasons = health.verdict(health.status(cfgobj, now=later), cfgobj)
        assert code >= health.DEGRADED
        assert any(f"host gv3p locked by {job} for" in r and "longest run timeout" in r for r in reasons)

        # The service dies with the locks held (as systemd kills its whole cgroup).
        victims = [proc.pid, *descendants(proc.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        notes = health.Health(site["state"] / "health.json").read()
        assert len(notes["locks"]) == len(HOSTS), "its last notes still list them"
        report = status(site)
        assert report["status"] == "down" and report["locked_hosts"] == [], "not taken for the truth"

        proc = start_service(site["cfg"])  # recovers the job (attempts spent): failed, with a reply
        failed = site["state"] / "queue" / "failed" / f"{job}.json"
        servers.wait_for(failed.exists, "the job settled", 120, proc)
        servers.wait_for(lambda: status(site)["service"]["work_running"], "the new service up", 60, proc)
        assert status(site)["locked_hosts"] == [], "a new process: the dead one's notes are ignored"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        tarpit.close()
