"""Shared fixtures: real servers on loopback, started once per session or per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import servers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def scratch():
    """A short scratch dir for the whole session (socket paths stay < 108 bytes)."""
    path = servers.short_tmpdir("ath-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_keys(scratch):
    return servers.SSHKeys(scratch / "ssh")


@pytest.fixture(scope="session")
def sshd(ssh_keys):
    """One real sshd on loopback; many inventory aliases can point at it."""
    server = servers.SSHD(ssh_keys).start()
    yield server
    server.stop()


@pytest.fixture
def workdir():
    """A short per-test scratch dir."""
    path = servers.short_tmpdir("atw-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fail2ban_factory(workdir):
    """Start real fail2ban-server instances: factory(name) -> Fail2ban."""
    started: list[servers.Fail2ban] = []

    def make(name: str, ignoreip: str = "127.0.0.1/8 ::1") -> servers.Fail2ban:
        f2b = servers.Fail2ban(workdir / "f2b" / name, ignoreip=ignoreip).start()
        started.append(f2b)
        return f2b

    yield make
    for f2b in started:
        f2b.stop()


@pytest.fixture(scope="session")
def smtp_sink():
    sink = servers.SMTPSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp(smtp_sink):
    """The session's SMTP sink, emptied for this test."""
    return smtp_sink.reset()


@pytest.fixture(scope="session")
def dovecot(scratch):
    server = servers.Dovecot(
        scratch / "dovecot",
        users={"service@example.test": "imap-test-password", "other@example.test": "x-password"},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(scratch):
    server = servers.SeaweedS3(scratch / "s3").start()
    yield server
    server.stop()
