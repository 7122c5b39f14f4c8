"""Real servers on loopback for the integration tests.

Each class starts one real daemon bound to 127.0.0.1 under a short scratch
directory (Unix socket paths must stay under 108 bytes) and stops it again.
The recipes in ../shared/recipes/ describe how each one was verified.

Nothing here talks to any address but 127.0.0.1.
"""

from __future__ import annotations

import email
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dispatcher.sandbox import (  # noqa: F401 - re-exported for the tests
    LOOPBACK,
    Fail2banSandbox,
    SeaweedSandbox,
    free_port,
    stop_process,
    wait_port,
)


def wait_for(condition, what: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds, or as soon as
    `proc` (the process expected to make it hold) has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def short_tmpdir(prefix: str) -> Path:
    """A scratch dir with a short path, readable by the daemons' own users."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- sshd


@dataclass
class SSHKeys:
    """Host and client keys shared by every sshd instance of a test session."""

    base: Path

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.host_key = self.base / "host_ed25519_key"
        self.client_key = self.base / "id_ed25519"
        self.authorized_keys = self.base / "authorized_keys"
        self.known_hosts = self.base / "known_hosts"
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.known_hosts.write_text("")

    def trust(self, port: int) -> None:
        host_pub = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        with self.known_hosts.open("a") as f:
            f.write(f"[{LOOPBACK}]:{port} {host_pub}\n")


class SSHD:
    """One sshd on 127.0.0.1:port, key-only root login (recipe 02)."""

    def __init__(self, keys: SSHKeys, port: int | None = None):
        self.keys = keys
        self.port = port or free_port()
        self.config = keys.base / f"sshd_{self.port}.conf"
        self.log = keys.base / f"sshd_{self.port}.log"
        self.proc: subprocess.Popen | None = None
        keys.trust(self.port)

    def start(self) -> SSHD:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {LOOPBACK}",
                    f"HostKey {self.keys.host_key}",
                    f"PidFile {self.keys.base}/sshd_{self.port}.pid",
                    f"AuthorizedKeysFile {self.keys.authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxSessions 100",
                    "MaxStartups 100:30:200",
                    "Subsystem sftp internal-sftp",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def ansible_vars(self) -> dict:
        """Connection host vars for an inventory alias served by this sshd."""
        return {
            "ansible_host": LOOPBACK,
            "ansible_port": self.port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.keys.client_key),
            "ansible_ssh_common_args": (
                f"-F /dev/null -o UserKnownHostsFile={self.keys.known_hosts} "
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
            ),
        }


# ----------------------------------------------------------------------- fail2ban


# The same self-contained fail2ban-server the demo runs (recipe 03).
Fail2ban = Fail2banSandbox


# ------------------------------------------------------------------------ Dovecot


class Dovecot:
    """Dovecot IMAP on loopback: plain+STARTTLS and IMAPS, passwd-file users (recipe 04)."""

    def __init__(self, base: Path, users: dict[str, str]):
        self.base = Path(base)
        self.users = users
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.conf = self.base / "dovecot.conf"
        self.cert = self.base / "tls" / "cert.pem"
        self.key = self.base / "tls" / "key.pem"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Dovecot:
        b = self.base
        for sub in ("run", "mail", "tls"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(b / "mail", "nobody", "nogroup")
        make_cert(self.cert, self.key)
        users = b / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        shutil.chown(users, "root", "dovecot")
        users.chmod(0o640)
        self.conf.write_text(
            f"""instance_name = athome-test-{self.imap_port}
base_dir = {b}/run
state_dir = {b}/run/state
protocols = imap
listen = {LOOPBACK}
log_path = {b}/dovecot.log
disable_plaintext_auth = no
auth_mechanisms = plain login
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={b}/mail/%d/%n
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  mailbox Processed {{
    auto = create
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {LOOPBACK}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.imap_port, proc=self.proc)
        wait_port(self.imaps_port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def deliver(self, user: str, raw: bytes) -> None:
        """Deliver a message the way the MTA would (dovecot-lda)."""
        subprocess.run(
            ["/usr/lib/dovecot/dovecot-lda", "-c", str(self.conf), "-d", user],
            input=raw,
            check=True,
            timeout=30,
        )

    def fetch_flags(self, user: str, mailbox: str = "INBOX") -> list[str]:
        out = subprocess.run(
            ["doveadm", "-c", str(self.conf), "fetch", "-u", user, "flags", "mailbox", mailbox, "all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("flags:")]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def imap_settings(dovecot: Dovecot, user: str, password_env: str, **extra: str) -> dict:
    """The `mail.imap` section of an athome config reading `user`'s mailbox on this
    Dovecot over loopback (the password is taken from the environment variable)."""
    return {
        "host": LOOPBACK,
        "port": dovecot.imap_port,
        "security": "plain",
        "user": user,
        "password_env": password_env,
        **extra,
    }


def make_cert(cert: Path, key: Path) -> None:
    if cert.exists():
        return
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            f"subjectAltName=DNS:localhost,IP:{LOOPBACK}",
        ],
        check=True,
        capture_output=True,
    )


# --------------------------------------------------------------------------- SMTP


@dataclass
class SMTPSink:
    """aiosmtpd on loopback that records what it receives (recipe 05).

    With `login`/`password`, the server requires STARTTLS and AUTH like a real
    submission server does.
    """

    cert: Path | None = None
    key: Path | None = None
    login: str | None = None
    password: str | None = None
    port: int = field(default_factory=free_port)
    messages: list = field(default_factory=list)
    down: bool = False  # answer 451 (try later) to every message
    reject: bool = False  # answer 550 (refused for good) to every message
    # Scripted answers, each used once, then the normal one: to the next DATA commands
    # (e.g. "451 4.3.0 ...", "421 4.7.0 try later"), MAIL FROM, and RCPT TO per address.
    data_script: list = field(default_factory=list)
    mail_script: list = field(default_factory=list)
    rcpt_script: dict = field(default_factory=dict)
    tries: int = 0  # DATA commands received, whatever the answer
    # Fault injection: awaited with each message before it is recorded. It may wait (the
    # client then waits for its answer) and returns None to accept the message, or an
    # SMTP answer ("451 ...") to refuse it.
    before_accept: Callable[[Any], Awaitable[str | None]] | None = None

    def start(self) -> SMTPSink:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        sink = self

        class Handler:
            async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: N802
                if sink.mail_script:
                    return sink.mail_script.pop(0)
                envelope.mail_from = address
                envelope.mail_options.extend(options)
                return "250 OK"

            async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: N802
                if sink.rcpt_script.get(address):
                    return sink.rcpt_script[address].pop(0)
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(options)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                sink.tries += 1
                if sink.data_script:
                    return sink.data_script.pop(0)
                if sink.down:
                    return "451 4.3.0 temporarily unavailable (test)"
                if sink.reject:
                    return "550 5.1.1 mailbox unavailable (test)"
                if sink.before_accept is not None:
                    refusal = await sink.before_accept(envelope)
                    if refusal:
                        return refusal
                raw = envelope.original_content or envelope.content
                sink.messages.append(
                    (envelope.mail_from, list(envelope.rcpt_tos), email.message_from_bytes(raw))
                )
                return "250 Message accepted for delivery"

        kwargs: dict = {}
        if self.login:
            srv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            srv_ctx.load_cert_chain(str(self.cert), str(self.key))

            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = (
                    isinstance(auth_data, LoginPassword)
                    and auth_data.login == self.login.encode()
                    and auth_data.password == self.password.encode()
                )
                return AuthResult(success=ok, handled=False)

            kwargs = dict(
                tls_context=srv_ctx,
                require_starttls=True,
                authenticator=authenticator,
                auth_require_tls=True,
            )
        self.controller = Controller(Handler(), hostname=LOOPBACK, port=self.port, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def reset(self) -> SMTPSink:
        """Forget what was received and answer normally again (per test)."""
        self.messages.clear()
        self.down = self.reject = False
        self.data_script.clear()
        self.mail_script.clear()
        self.rcpt_script.clear()
        self.tries = 0
        return self

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


# ----------------------------------------------------------------------------- S3


# The same SeaweedFS stand-in the demo runs.
SeaweedS3 = SeaweedSandbox


# ---------------------------------------------------------------------- inventory


def write_inventory(path: Path, groups: dict[str, dict[str, dict]], all_vars: dict | None = None) -> Path:
    """Write a YAML inventory: {group: {host: hostvars}}; a host may sit in several groups."""
    children = {g: {"hosts": {h: (v or {}) for h, v in hosts.items()}} for g, hosts in groups.items()}
    data = {"all": {"vars": all_vars or {}, "children": children}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def target_python() -> str:
    """The interpreter Ansible uses on loopback targets (not the pyenv shim, recipe 07)."""
    return "/usr/bin/python3"


def pyenv_python(version: str) -> str:
    """An old target interpreter shipped on this image (Python 2.7 / 3.6) for module tests."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    major = version.split(".")[0]
    matches = sorted(Path(root, "versions").glob(f"{version}*/bin/python{major}"))
    if not matches:
        raise FileNotFoundError(f"no Python {version} under {root}/versions (pyenv install {version})")
    return str(matches[-1])
