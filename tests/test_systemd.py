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
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
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


# ------------------------------------------- ansible over ssh under the unit's limits

# Applied by the test as root, then exec'd: what the unit's hardening does to the service,
# rebuilt without systemd (which is not running here). Mount namespace (unshare, below):
# ProtectSystem=strict + ReadWritePaths, ProtectHome, PrivateTmp, ProtectProc=invisible +
# ProcSubset=pid. setpriv: NoNewPrivileges, CapabilityBoundingSet= (no capabilities).
# Here: MemoryDenyWriteExecute (the kernel's PR_SET_MDWE), SystemCallFilter=@system-service
# ~@privileged @resources with SystemCallErrorNumber=EPERM and SystemCallArchitectures=native
# (libseccomp), RestrictAddressFamilies (socket() of other families refused),
# RestrictNamespaces (unshare, setns refused).
CONFINE = """
import ctypes, errno, json, os, socket, sys
import seccomp

allowed, argv = json.loads(sys.argv[1]), sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE failed: %s" % os.strerror(ctypes.get_errno()))
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in allowed:
    if name in ("socket", "unshare", "setns", "clone3"):
        continue
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        pass  # not a syscall of this architecture
for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, family))
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone()
f.load()
os.execv(argv[0], argv)
"""

PROBE = """
import ctypes, json, mmap, os, socket, sys
from dispatcher import runner
libc = ctypes.CDLL(None, use_errno=True)
def unshare_user():
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
problems = []
for what, attempt in [
    ("write outside the state dir", lambda: open("/usr/athome-probe", "w")),
    ("a packet socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
    ("a writable+executable mapping", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)),
    ("the kernel's tunables", lambda: open("/proc/sys/kernel/hostname")),
    ("a new user namespace", unshare_user),
    ("the setuid call", lambda: os.setuid(os.getuid())),
]:
    try:
        attempt()
        problems.append(what)
    except OSError:
        pass
result = runner.run_playbook(
    "unban.yml", inventory=sys.argv[1], extravars={"ip": "3.3.3.3"}, private_root=sys.argv[2],
    artifacts_dir=sys.argv[3], timeout=300,
)
hosts = {h: r.status for h, r in result.hosts.items()}
print(json.dumps({"problems": problems, "status": result.status, "hosts": hosts, "errors": result.errors}))
"""


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    )
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.stdout.splitlines():
        word = line.strip()
        if line.startswith("@"):
            current = groups.setdefault(word, [])
        elif current is not None and word and not word.startswith("#"):
            current.append(word)
    return groups


def expand(groups: dict[str, list[str]], name: str) -> set[str]:
    return set().union(*(expand(groups, n) if n.startswith("@") else {n} for n in groups[name]))


def test_ansible_reaches_a_server_over_ssh_under_the_units_restrictions(sshd, fail2ban_factory):
    """ssh to a loopback sshd with ControlPersist sockets, run by ansible-playbook from the
    dispatcher's runner, inside the confinement the unit asks systemd for (see CONFINE).
    Not reproduced: PrivateUsers= and the service user's passwd home; ssh's files are
    named in the inventory here, as in the tests' own config."""
    groups = syscall_groups()
    allowed = expand(groups, "@system-service") - expand(groups, "@privileged") - expand(groups, "@resources")
    state = Path(tempfile.mkdtemp(prefix="athome-confined-", dir="/var/tmp"))  # not under the private /tmp
    try:
        f2b = fail2ban_factory("gv1p")
        f2b.ban("asterisk", "3.3.3.3")
        ssh = state / ".ssh"
        ssh.mkdir()
        for key in (sshd.keys.client_key, sshd.keys.known_hosts):
            shutil.copy(key, ssh / key.name)
        conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
        conn["ansible_ssh_private_key_file"] = str(ssh / sshd.keys.client_key.name)
        conn["ansible_ssh_common_args"] = conn["ansible_ssh_common_args"].replace(
            str(sshd.keys.known_hosts), str(ssh / sshd.keys.known_hosts.name)
        )
        inv = servers.write_inventory(
            state / "inventory" / "hosts.yml",
            {
                "sip_servers": {"gv1p": {"fail2ban_whitelist_conf_dir": str(f2b.dir)}},
                "fail2ban_servers": {"gv1p": {}},
            },
            conn,
        )
        (state / "confine.py").write_text(CONFINE)
        (state / "run").mkdir()
        # What the probe needs from directories the confinement hides (/home, /root, /tmp): this
        # machine's interpreter (pyenv, under /root), the venv and the checkout (a clone may
        # live in /tmp or a home directory) are mounted back, read-only. A deployment's
        # interpreter is /usr/bin/python3 and its checkout /opt/athome-ops.
        hidden = [d for d in ("/home", "/root", "/tmp") if Path(d).is_dir()]
        wanted = sorted({Path(p).resolve() for p in (sys.base_prefix, sys.prefix, REPO)})
        keep = [
            p
            for p in wanted
            if any(p.is_relative_to(d) for d in hidden)
            and not any(p != q and p.is_relative_to(q) for q in wanted)
        ]
        mounts = " && ".join(
            [
                "mount --make-rprivate /",
                f"mount --bind {state} {state}",
                *(f"mkdir {state}/.keep{n} && mount --bind {p} {state}/.keep{n}" for n, p in enumerate(keep)),
                "mount -o remount,bind,ro /",
                *(f"mount -t tmpfs -o mode=0755 tmpfs {d}" for d in hidden),
                *(f"mkdir -p {p} && mount --bind -o ro {state}/.keep{n} {p}" for n, p in enumerate(keep)),
                "mount -t proc -o hidepid=invisible,subset=pid proc /proc",
            ]
        )
        confined = [
            "setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
            "/usr/bin/python3", str(state / "confine.py"), json.dumps(sorted(allowed)),
            sys.executable, "-c", PROBE, str(inv.parent), str(state / "run"), str(state / "artifacts"),
        ]  # fmt: skip
        script = f"{mounts} && exec {' '.join(shlex.quote(a) for a in confined)}"
        env = dict(os.environ, HOME=str(state), PYTHONPATH=str(REPO))
        proc = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "sh", "-c", script],
            capture_output=True, text=True, timeout=600, env=env, cwd=state,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["problems"] == [], "the confinement is real: each of these should have failed"
        assert (report["status"], report["hosts"]["gv1p"]) == ("successful", "changed"), report
        assert f2b.banned_jails("3.3.3.3") == [], "the server really changed"
    finally:
        shutil.rmtree(state, ignore_errors=True)
