"""Local stand-ins for production pieces, shared by `athome demo` and the tests.

Fail2banSandbox is a real fail2ban-server with its own config dir, socket,
in-memory database and a no-op action (it logs +ip/-ip instead of touching a
firewall), so the demo and the tests exercise the real fail2ban client and
server without root-level side effects.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import time
from pathlib import Path


def _stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Fail2banSandbox:
    """A self-contained fail2ban-server with its own config dir (recipe 03).

    Jails `asterisk` and `sshd` use a no-op action that only appends +ip/-ip to
    DIR/actions.log, so no firewall is touched.
    """

    JAILS = ("asterisk", "sshd")

    def __init__(self, confdir: Path, ignoreip: str = "127.0.0.1/8 ::1"):
        self.dir = Path(confdir)
        self.ignoreip = ignoreip
        self.proc: subprocess.Popen | None = None
        self.sock = self.dir / "fail2ban.sock"
        assert len(str(self.sock)) < 100, f"socket path too long: {self.sock}"

    def write_config(self) -> None:
        d = self.dir
        for sub in ("filter.d", "action.d", "jail.d", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "fail2ban.conf").write_text(
            "[Definition]\nloglevel = INFO\n"
            f"logtarget = {d}/fail2ban.log\nsocket = {d}/fail2ban.sock\n"
            f"pidfile = {d}/fail2ban.pid\ndbfile = :memory:\ndbpurgeage = 1d\n"
            "syslogsocket = auto\nallowipv6 = auto\n"
        )
        (d / "filter.d" / "proto.conf").write_text(
            "[Definition]\nfailregex = ^.* auth failure from <HOST>\\s*$\nignoreregex =\n"
        )
        (d / "action.d" / "proto-noop.conf").write_text(
            "[Definition]\nactionstart =\nactionstop =\nactioncheck =\n"
            'actionban = echo "+<ip>" >> <target>\nactionunban = echo "-<ip>" >> <target>\n'
            "[Init]\ntarget = /dev/null\n"
        )
        jails = "".join(
            f"\n[{j}]\nenabled = true\nfilter = proto\nlogpath = {d}/log/{j}.log\n" for j in self.JAILS
        )
        (d / "jail.local").write_text(
            "[DEFAULT]\nbackend = polling\n"
            f"ignoreip = {self.ignoreip}\n"
            "bantime = 1h\nfindtime = 10m\nmaxretry = 3\n"
            f'action = proto-noop[target="{d}/actions.log"]\n' + jails
        )
        for j in self.JAILS:
            (d / "log" / f"{j}.log").touch()

    def start(self) -> Fail2banSandbox:
        if not (self.dir / "jail.local").exists():
            self.write_config()
        self.proc = subprocess.Popen(
            ["fail2ban-server", "-f", "-x", "-c", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fail2ban-server exited with {self.proc.returncode}")
            if self.client("ping", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise TimeoutError("fail2ban-server did not answer ping")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.client("stop", check=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _stop(self.proc)
        self.proc = None

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["fail2ban-client", "-c", str(self.dir), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    # Helpers the tests use to set up and read real state.
    def ban(self, jail: str, ip: str) -> None:
        self.client("set", jail, "banip", ip)

    def banned_jails(self, ip: str) -> list[str]:
        return ast.literal_eval(self.client("banned", ip).stdout.strip())[0]

    def ignore_list(self, jail: str) -> list[str]:
        out = self.client("get", jail, "ignoreip").stdout
        return [line.split(" ", 1)[1].strip() for line in out.splitlines() if line.startswith(("|- ", "`- "))]
