"""`athome run` under systemd's notify protocol (Type=notify, WatchdogSec=), and the unit's
hardening score.

The notify socket is a real AF_UNIX datagram socket the test binds, handed to the real
`athome run` (with Dovecot, SMTP, sshd as in the end-to-end tests) through NOTIFY_SOCKET
and WATCHDOG_USEC, as systemd does. What cannot run here is systemd itself (PID 1 of
this machine is not systemd): the restart after the pings stop is systemd's part.
"""
# ruff: noqa: F811 - the end-to-end fixtures are imported by name and used as arguments

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
from pathlib import Path

import yaml

from dispatcher import sdnotify
from tests import servers
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    command_email,
    replies,
    site,
    smtp,
    smtp_submission,
    start_service,
)

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "athome.service"
USER = "service@example.test"
WATCHDOG_SEC = 4  # short, so the test sees several pings; the unit's own is minutes


class NotifySocket:
    """The socket systemd would listen on: every datagram received, in order."""

    def __init__(self, path: Path | str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path) if not str(path).startswith("@") else "\0" + str(path)[1:])
        self.address = str(path)
        self.messages: list[str] = []
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.messages.append(data.decode())

    def fields(self) -> list[str]:
        return [f for m in list(self.messages) for f in m.split("\n")]

    def wait_for(self, what: str, count: int = 1, after: int = 0, proc=None, timeout: float = 120) -> int:
        """Wait until `count` fields equal to (or, ending in '*', starting with) `what` have
        arrived after field number `after`; returns the index after the last one."""

        def found() -> list[int]:
            fields = self.fields()
            match = (lambda f: f.startswith(what[:-1])) if what.endswith("*") else (lambda f: f == what)
            return [i for i, f in enumerate(fields) if i >= after and match(f)]

        servers.wait_for(lambda: len(found()) >= count, f"{count} x {what!r}", timeout, proc)
        return found()[count - 1] + 1

    def close(self) -> None:
        self.sock.close()


class Switch(socketserver.ThreadingTCPServer):
    """A TCP front for the IMAP server: relays to it, or turns into a tarpit (accepts
    connections, never speaks) and drops the sessions it was relaying."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__((servers.LOOPBACK, 0), _Relay)
        self.upstream = upstream_port
        self.port = self.server_address[1]
        self.tarpit = False
        self.let_go = threading.Event()
        self.held: list[socket.socket] = []
        self.relayed: list[socket.socket] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def become_tarpit(self) -> None:
        self.let_go.clear()
        self.tarpit = True
        for s in self.relayed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def relay_again(self) -> None:
        self.tarpit = False
        self.let_go.set()  # the held connections are closed

    def close(self) -> None:
        self.relay_again()
        self.shutdown()
        self.server_close()


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        front: Switch = self.server
        if front.tarpit:
            front.held.append(self.request)
            front.let_go.wait()
            return
        up = socket.create_connection((servers.LOOPBACK, front.upstream))
        front.relayed += [self.request, up]
        back = threading.Thread(target=_pump, args=(up, self.request), daemon=True)
        back.start()
        _pump(self.request, up)
        back.join()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------ the protocol


def test_messages_reach_a_path_socket_and_an_abstract_one(workdir):
    for address in (str(workdir / "notify"), f"@athome-test-{os.getpid()}"):
        sock = NotifySocket(address)
        try:
            n = sdnotify.Notifier({"NOTIFY_SOCKET": address})
            assert n.enabled and n.watchdog_interval is None
            assert n.ready("up") and n.status("line one\nline two") and n.stopping()
            sock.wait_for("STOPPING=1")
            assert sock.messages == ["READY=1\nSTATUS=up", "STATUS=line one line two", "STOPPING=1"]
            n.close()
        finally:
            sock.close()


def test_outside_systemd_nothing_is_sent_and_the_variables_leave_the_environment():
    assert not sdnotify.Notifier({}).send("READY=1")
    assert not sdnotify.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled, "unknown kinds are ignored"
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "A": "1"}
    n = sdnotify.Notifier.from_environ(env)
    assert n.watchdog_interval == 30.0
    assert env == {"A": "1"}, "a playbook started later must not inherit them"
    other = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert sdnotify.Notifier(other).watchdog_interval is None, "the watchdog is another process's"


def test_a_loop_that_breaks_its_promise_stops_the_pings(workdir):
    now = [0.0]
    progress = sdnotify.Progress(allowance=10, clock=lambda: now[0])
    sock = NotifySocket(workdir / "notify")
    try:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "10000000"})
        dog = sdnotify.Watchdog(n, progress, lambda: "all well")
        progress.beat("waiting for mail", loop="intake")
        progress.beat("running job", busy_for=900, loop="work-1")
        assert progress.bounded(30) == 5, "waits leave time for the next beat"
        now[0] = 9
        assert dog.tick() and dog.pings == 1
        now[0] = 11  # intake silent past its allowance; the worker is within its playbook's timeout
        assert progress.stalled() == {"intake": 11}
        assert not dog.tick() and dog.pings == 1
        progress.beat("reading the mailbox", loop="intake")
        now[0] = 905
        assert dog.tick() is False and set(progress.stalled()) == {"intake"}
        progress.beat(loop="intake")
        now[0] = 911  # 900 + the allowance: the playbook ran past its timeout and still holds the worker
        assert set(progress.stalled()) == {"work-1"}
        progress.retire("work-1")  # a worker that ends on purpose is not waited for
        assert dog.tick() and dog.pings == 2
        sock.wait_for("WATCHDOG=1", count=2)
        assert sock.fields().count("STATUS=STUCK: intake silent for 11 s; watchdog pings stopped") == 1
    finally:
        sock.close()


# ------------------------------------------------------------ the real service


def notified_service(site, **extra_env: str):
    sock = NotifySocket(site["workdir"] / "notify")
    env = {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": str(WATCHDOG_SEC * 1_000_000), **extra_env}
    return sock, start_service(site["cfg"], env=env)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    return output


def test_the_service_says_ready_pings_while_both_loops_move_and_says_stopping(site, dovecot, smtp):
    sock, proc = notified_service(site)
    try:
        ready = sock.wait_for("READY=1", proc=proc)
        status = sock.fields()[ready]
        pattern = r"STATUS=intake [a-z ]+, mailbox read .*; [0-2]/2 workers busy; queue: 0 pending, 0 waiting"
        assert re.fullmatch(pattern, status), status
        last = sock.wait_for("WATCHDOG=1", count=3, after=ready, proc=proc)
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP"))
        assert len(smtp.wait_for(1, timeout=60)) == 1, "working while notifying"
        sock.wait_for("WATCHDOG=1", count=2, after=last, proc=proc)
        assert not any(f.startswith("STATUS=STUCK") for f in sock.fields())
        proc.send_signal(signal.SIGTERM)
        sock.wait_for("STOPPING=1", proc=None)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
        sock.close()
    assert proc.returncode == 0, output
    fields = sock.fields()
    assert fields.count("READY=1") == 1
    assert fields[fields.index("STOPPING=1") + 1].startswith("STATUS=stopping: ")
    assert "systemd watchdog 4 s" in output


def test_intake_stuck_on_a_silent_imap_server_stops_the_pings_until_it_moves_again(site, dovecot, smtp):
    """The IMAP server turns into a tarpit (accepts TCP, never speaks; the service's IMAP
    timeout is long): intake blocks reading its greeting and the watchdog pings stop while
    the workers go on. Under systemd the service is restarted WatchdogSec later; here the
    tarpit lets go and the pings come back by themselves."""
    switch = Switch(dovecot.imap_port)
    cfg = yaml.safe_load(site["cfg"].read_text())
    cfg["mail"]["imap"].update(port=switch.port, timeout=600)
    site["cfg"].write_text(yaml.safe_dump(cfg))
    sock, proc = notified_service(site)
    try:
        ready = sock.wait_for("READY=1", proc=proc)
        before = sock.wait_for("WATCHDOG=1", count=2, after=ready, proc=proc)
        switch.become_tarpit()
        servers.wait_for(lambda: switch.held, "intake reconnecting to the tarpit", 60, proc)
        stuck = sock.wait_for("STATUS=STUCK*", after=before, proc=proc)
        assert re.fullmatch(
            r"STATUS=STUCK: intake silent for \d+ s; watchdog pings stopped", sock.fields()[stuck - 1]
        )
        later = sock.wait_for("STATUS=STUCK*", count=3, after=before, proc=proc)
        assert "WATCHDOG=1" not in sock.fields()[stuck:later], "no ping while intake is stuck"
        switch.relay_again()  # the silent server hangs up: intake reconnects and reads mail again
        sock.wait_for("WATCHDOG=1", after=later, proc=proc)
        dovecot.deliver(USER, command_email(f"[{site['token']}] HELP"))
        assert len(smtp.wait_for(1, timeout=60)) == 1
        output = stop(proc)
    finally:
        if proc.poll() is None:
            stop(proc)
        sock.close()
        switch.close()
    assert proc.returncode == 0, output
    assert "watchdog: no progress in intake silent for" in output
    assert "watchdog: every loop moves again (intake was stuck)" in output


# -------------------------------------------------------------------- the unit


def test_the_unit_is_hardened_to_an_exposure_of_at_most_2():
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make system-deps` installs the systemd package"
    out = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for athome\.service: (\d+\.\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found.group(1)) <= 2.0, out.stdout
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure", "a watchdog timeout counts as a failure"
    assert settings["WatchdogSec"] == "5min"
