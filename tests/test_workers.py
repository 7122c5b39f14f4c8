"""Parallel workers with per-host locks, against real hosts over SSH (sshd + fail2ban-server).

What the hosts record proves it: every MAC server's provisioning monitor and every
fail2ban client call is a small script on the host that appends `<host> <kind>
start|end <ns>` to one marks file (one clock: every host is an alias of one sshd on
loopback). A monitor can be held (`hold-<host>` exists) so that a job stays on its
host for as long as the test needs: no sleeps, no timing guesses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from dispatcher.jobqueue import DirQueue
from tests import servers
from tests.messages import status_of
from tests.test_dispatch_commands import REQUESTER, Site
from tests.test_macchange_playbook import MacHost
from tests.test_run_secrets import descendants, gone

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FORWARD = "MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER={}"
BACK = "MACCHANGE=3010 MACATUAL=010203040599 MACFUTURO=010203040506 SERVER={}"


class Fleet:
    """MAC servers gv1p..gv3p (gv1p and gv2p are fail2ban servers too), all marking into one file."""

    def __init__(self, workdir: Path, sshd, fail2ban_factory, concurrency: int = 2):
        self.workdir = workdir
        self.marks = workdir / "marks.log"
        self.marks.touch()
        f2b = {name: fail2ban_factory(name) for name in ("gv1p", "gv2p")}
        macs = {name: MacHost(workdir, name) for name in ("gv1p", "gv2p", "gv3p")}
        python = servers.target_python()
        mac_vars = {
            name: host.hostvars(python, endpoint_mac_monitor_command=["/bin/sh", self._monitor(name)])
            for name, host in macs.items()
        }
        f2b_vars = {
            name: {
                "fail2ban_whitelist_conf_dir": str(server.dir),
                "fail2ban_whitelist_client": self._client(name),
            }
            for name, server in f2b.items()
        }
        self.inventory = servers.write_inventory(
            workdir / "inventory" / "hosts.yml",
            {
                "sip_servers": {name: {"audios_from": "audio"} for name in macs},
                "mac_servers": mac_vars,
                "fail2ban_servers": f2b_vars,
                "recordings": {"audio": {}},
            },
            dict(sshd.ansible_vars(), ansible_python_interpreter=python),
        )
        self.f2b, self.macs = f2b, macs
        self.concurrency = concurrency

    def _script(self, name: str, body: str) -> str:
        path = self.workdir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return str(path)

    def _mark(self, host: str, kind: str, edge: str) -> str:
        return f'echo "{host} {kind} {edge} $(date +%s%N)" >> {self.marks}\n'

    def _monitor(self, host: str) -> str:
        hold = self.workdir / f"hold-{host}"
        return self._script(
            f"monitor-{host}",
            "#!/bin/sh\n"
            + self._mark(host, "mac", "start")
            # held by the test (at most 120 s, so a broken test cannot hang a host for good)
            + f"i=0; while [ -e {hold} ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done\n"
            + self._mark(host, "mac", "end"),
        )

    def _client(self, host: str) -> str:
        return self._script(
            f"client-{host}",
            "#!/bin/sh\n"
            + self._mark(host, "f2b", "start")
            + 'fail2ban-client "$@"; rc=$?\n'
            + self._mark(host, "f2b", "end")
            + "exit $rc\n",
        )

    def hold(self, host: str) -> None:
        (self.workdir / f"hold-{host}").touch()

    def let_go(self, host: str) -> None:
        (self.workdir / f"hold-{host}").unlink(missing_ok=True)

    def lines(self) -> list[tuple[str, str, str, int]]:
        return [
            (host, kind, edge, int(ns))
            for host, kind, edge, ns in (line.split() for line in self.marks.read_text().splitlines())
        ]

    def seen(self, host: str, kind: str, edge: str, count: int = 1) -> bool:
        return sum(1 for h, k, e, _ in self.lines() if (h, k, e) == (host, kind, edge)) >= count

    def intervals(self, host: str, kind: str | None = None) -> list[tuple[int, int]]:
        """(start, end) of each call on a host, in order: each start is followed by its end
        unless two calls overlapped (then the pairing fails the test)."""
        out, open_at = [], None
        for h, k, edge, ns in self.lines():
            if h != host or (kind and k != kind):
                continue
            if edge == "start":
                assert open_at is None, f"two calls at once on {host}: {self.marks.read_text()}"
                open_at = ns
            else:
                assert open_at is not None, f"an end without a start on {host}"
                out.append((open_at, ns))
                open_at = None
        assert open_at is None, f"a call on {host} never ended"
        return out


@pytest.fixture
def fleet(sshd, workdir, fail2ban_factory):
    return Fleet(workdir, sshd, fail2ban_factory)


def site_of(fleet: Fleet, concurrency: int = 2) -> Site:
    site = Site(fleet.workdir, fleet.inventory)
    site.cfg.concurrency = concurrency
    site.cfg.poll_interval = 0.2
    return site


@contextlib.contextmanager
def workers(site: Site):
    """The service's workers (work_forever) in a thread, stopped and joined at the end."""
    stop = threading.Event()
    thread = threading.Thread(target=site.dispatcher.work_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=600)
        assert not thread.is_alive(), "the workers stopped"


def queue(site: Site, *commands: str) -> list[str]:
    """Queue each command in its own intake pass (so their order is the order given)."""
    ids = []
    for command in commands:
        site.send(command)
        assert site.dispatcher.poll_once()["queued"] == 1, command
        ids.append(max(j.id for j in site.dispatcher.jobs.list("pending") if j.id not in ids))
    return ids


def states(site: Site, ids: list[str]) -> list[str]:
    return [site.dispatcher.jobs.get(i).state for i in ids]


def test_jobs_on_different_hosts_overlap_and_jobs_on_one_host_never_do(fleet):
    site = site_of(fleet)
    fleet.hold("gv1p")
    fleet.hold("gv2p")
    first, second, other = queue(site, FORWARD.format("gv1p"), BACK.format("gv1p"), FORWARD.format("gv2p"))
    with workers(site):
        # Both held on their hosts at once: the gv2p job started while the first gv1p one runs.
        servers.wait_for(lambda: fleet.seen("gv1p", "mac", "start"), "the first job on gv1p")
        servers.wait_for(lambda: fleet.seen("gv2p", "mac", "start"), "the job on gv2p, beside it")
        # The second gv1p job was passed over although it is older than the gv2p one.
        assert site.dispatcher.jobs.get(second).state == "pending"
        assert site.dispatcher.host_locks.busy() == {"gv1p": first, "gv2p": other}
        assert not fleet.seen("gv1p", "mac", "start", count=2)
        fleet.let_go("gv2p")
        fleet.let_go("gv1p")
        every = [first, second, other]
        servers.wait_for(lambda: states(site, every) == ["done"] * 3, "every job done")
    (g1_start, g1_end), (g1b_start, _g1b_end) = fleet.intervals("gv1p")
    [(g2_start, g2_end)] = fleet.intervals("gv2p")
    assert max(g1_start, g2_start) < min(g1_end, g2_end), "gv1p and gv2p were worked on at the same time"
    assert g1_end < g1b_start, "the second job on gv1p started after the first one ended"
    # Forward then back: the second job found the first one's MAC (it ran after it).
    assert b"3010;MAC:010203040506;" in fleet.macs["gv1p"].files()[1]
    assert b"3010;MAC:010203040599;" in fleet.macs["gv2p"].files()[1]


def test_a_checkip_on_every_fail2ban_host_is_neither_overtaken_nor_starved(fleet):
    site = site_of(fleet)
    fleet.hold("gv1p")
    mac1, checkip, mac2, mac1_back, mac3 = queue(
        site,
        FORWARD.format("gv1p"),  # runs first, held on gv1p
        "CHECKIP=3.3.3.3",  # needs gv1p and gv2p: waits for gv1p
        FORWARD.format("gv2p"),  # newer, needs gv2p: must not overtake the CHECKIP
        BACK.format("gv1p"),  # newer, needs gv1p: must not overtake it either
        FORWARD.format("gv3p"),  # another host: runs meanwhile
    )
    with workers(site):
        servers.wait_for(lambda: fleet.seen("gv1p", "mac", "start"), "the held job on gv1p")
        servers.wait_for(lambda: site.dispatcher.jobs.get(mac3).state == "done", "the job on gv3p")
        assert states(site, [checkip, mac2, mac1_back]) == ["pending"] * 3
        assert not [line for line in fleet.lines() if line[0] == "gv2p"], "gv2p is kept for the CHECKIP"
        fleet.let_go("gv1p")
        every = [mac1, checkip, mac2, mac1_back, mac3]
        servers.wait_for(lambda: states(site, every) == ["done"] * 5, "every job done")
    [(_, mac1_end), (mac1_back_start, _)] = fleet.intervals("gv1p", "mac")
    checkip_gv1p = fleet.intervals("gv1p", "f2b")
    checkip_gv2p = fleet.intervals("gv2p", "f2b")
    [(mac2_start, _)] = fleet.intervals("gv2p", "mac")
    assert checkip_gv1p and checkip_gv2p, "the CHECKIP ran on both fail2ban servers"
    assert mac1_end < checkip_gv1p[0][0] and checkip_gv1p[-1][1] < mac1_back_start
    assert checkip_gv2p[-1][1] < mac2_start, "the newer gv2p job waited for the CHECKIP"
    for name in ("gv1p", "gv2p"):
        assert "3.3.3.3" in fleet.f2b[name].ignore_list("asterisk")
    assert site.dispatcher.jobs.get(checkip).result["outcome"] == "success"


def test_a_service_killed_mid_run_with_two_workers_loses_nothing(fleet):
    site = site_of(fleet)  # to drop mail and read replies; `athome run` does the work
    cfg_path = fleet.workdir / "athome.yml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(site.cfg.state_dir),
                "inventory": str(fleet.inventory.parent),
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {
                        "inbox": str(fleet.workdir / "inbox"),
                        "outbox": str(fleet.workdir / "outbox"),
                    },
                },
                "auth": {
                    "senders": [REQUESTER],
                    "tokens_file": str(site.tokens.path),
                    "authentication_results": {"required": True, "trusted_authserv_ids": ["mx.example.test"]},
                },
                "worker": {"retry_backoff": [0], "poll_interval": 0.2, "concurrency": 2},
            }
        )
    )
    fleet.hold("gv1p")
    fleet.hold("gv2p")
    site.send(FORWARD.format("gv1p"))
    site.send(FORWARD.format("gv2p"))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg_path), "run"]
    log = open(fleet.workdir / "service.log", "wb")  # noqa: SIM115 - read after both runs
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        servers.wait_for(lambda: fleet.seen("gv1p", "mac", "start"), "the job on gv1p", proc=proc)
        servers.wait_for(lambda: fleet.seen("gv2p", "mac", "start"), "the job on gv2p", proc=proc)
        servers.wait_for(lambda: len(site.replies()) == 2, "both confirmations", proc=proc)
        jobs = DirQueue(site.cfg.queue_dir)
        assert jobs.count("processing") == 2, "both jobs in flight at once"
        below = descendants(proc.pid)  # SIGKILL, then what was below it (as systemd does)
        proc.kill()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        servers.wait_for(lambda: all(gone(p) for p in below), "the killed runs' processes to go")
    finally:
        if proc.poll() is None:
            proc.kill()
    fleet.let_go("gv1p")
    fleet.let_go("gv2p")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        finished = lambda: jobs.count("done") + jobs.count("failed") == 2  # noqa: E731
        servers.wait_for(finished, "both jobs finished", proc=proc)
        servers.wait_for(lambda: len(site.replies()) == 4, "both results", proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
    output = (fleet.workdir / "service.log").read_text(errors="replace")
    done = jobs.list("done")
    assert len(done) == 2, output
    for job in done:
        assert job.attempts == 2 and any(h["event"] == "recovered after interruption" for h in job.history)
    replies = site.replies()
    assert len(replies) == 4, [status_of(m) for m in replies]
    per_message: dict[str, list[str]] = {}
    for msg in replies:
        per_message.setdefault(msg["In-Reply-To"], []).append(status_of(msg))
    assert len(per_message) == 2
    for statuses in per_message.values():
        assert sum("recebido" in s for s in statuses) == 1 and len(statuses) == 2, statuses
    for name in ("gv1p", "gv2p"):
        assert b"3010;MAC:010203040599;" in fleet.macs[name].files()[1]
