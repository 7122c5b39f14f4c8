"""The inventory unreadable for a long time, then fixed: the waiting command is handled
afterwards, never set aside.

Real parts: `athome run` over Dovecot IMAP (IDLE) and an SMTP sink, sshd and a
fail2ban-server on loopback. The inventory is what many deployments have: a
symbolic link into the ops checkout. The outage is that checkout gone (moved away
while it is cloned again): the link dangles and nothing of the inventory can be
read, by root either (the tests run as root, where chmod 000 would not stop a
read). tests/test_service.py covers a YAML syntax error before the service ever
read the inventory, in process; this one takes the service as it runs, with a
good inventory already loaded.

Ten real minutes do not fit in a test; the set-aside logic counts passes, not
time. At the default poll_interval (30 s) ten minutes are 20 intake passes; here
the poll interval is 0.2 s and the test waits for 25 failed passes (from the
service's log) before it repairs the checkout.
"""

from __future__ import annotations

import email
import json
import os
import signal
import subprocess
import sys
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from dispatcher.auth import TokenStore
from tests import servers
from tests.messages import AUTH, command_message, status_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
USER = "service@example.test"
IMAP_PASSWORD = "imap-test-password"  # the session Dovecot's (tests/conftest.py)
REQUESTER = "ana@example.test"
ADMIN = "admin@example.test"
FAILED_PASSES = 25  # more than ten minutes' worth at the default poll_interval (30 s: 20 passes)
FAILED_LINE = "could not handle message uid"


def test_a_command_waiting_out_an_inventory_outage_is_handled_after_it_never_set_aside(
    workdir, sshd, dovecot, smtp, fail2ban_factory
):
    f2b = fail2ban_factory("gv1p")
    checkout = workdir / "ops"
    servers.write_inventory(
        checkout / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv1p": {"audios_from": "audio"}},
            "fail2ban_servers": {"gv1p": {"fail2ban_whitelist_conf_dir": str(f2b.dir)}},
            "mac_servers": {},
            "recordings": {"audio": {}},
        },
        dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python()),
    )
    inventory = workdir / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").symlink_to(checkout / "inventory" / "hosts.yml")
    tokens = TokenStore(workdir / "tokens.json")
    _, token = tokens.add("outage", senders=[REQUESTER])
    state = workdir / "state"
    cfg = workdir / "athome.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "inventory": str(inventory),
                "mail": {
                    "transport": "imap",
                    "from_address": USER,
                    "admin_addresses": [ADMIN],
                    "imap": servers.imap_settings(
                        dovecot, USER, "ATHOME_TEST_IMAP_PW", quarantine_folder="Quarentena"
                    ),
                    "smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "plain"},
                },
                "auth": {"senders": [REQUESTER], "tokens_file": str(tokens.path), **AUTH},
                "worker": {"retry_backoff": [0], "poll_interval": 0.2},
            }
        )
    )
    doveadm = ["doveadm", "-c", str(dovecot.conf)]
    subprocess.run([*doveadm, "mailbox", "create", "-u", USER, "Quarentena"], check=False)
    for mailbox in ("INBOX", "Quarentena"):
        subprocess.run([*doveadm, "expunge", "-u", USER, "mailbox", mailbox, "all"], check=True)

    env = dict(os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    log_path = workdir / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        # Up, with the inventory loaded: a first command runs.
        dovecot.deliver(
            USER, command_message(f"[{token}] CHECKIP=3.3.3.3", REQUESTER, "<before@x>").as_bytes()
        )
        servers.wait_for(lambda: len(smtp.messages) == 2, "the first command's two replies", proc=proc)

        # The checkout goes away; a command arrives and waits it out.
        checkout.rename(workdir / "ops.old")
        assert not (inventory / "hosts.yml").exists(), "the inventory link dangles"
        dovecot.deliver(
            USER, command_message(f"[{token}] CHECKIP=4.4.4.4", REQUESTER, "<during@x>").as_bytes()
        )
        servers.wait_for(
            lambda: output().count(FAILED_LINE) >= FAILED_PASSES,
            f"{FAILED_PASSES} intake passes failing on the inventory",
            proc=proc,
        )
        assert len(smtp.messages) == 2, "nothing answered (or refused) while the inventory is gone"
        assert dovecot.fetch_flags(USER) == ["\\Seen", ""], "the waiting command is still unseen in the inbox"
        health = json.loads((state / "health.json").read_text())
        assert "inventory cannot be read" in health["last_error"], health

        # Repaired: the command is handled on a following pass and runs.
        (workdir / "ops.old").rename(checkout)
        servers.wait_for(lambda: len(smtp.messages) == 4, "the waiting command's two replies", proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    log_text = output()
    failed = log_text.count(FAILED_LINE)
    print(f"\ninventory outage: {failed} failed intake passes, then handled")
    replies = [email.message_from_bytes(m[2].as_bytes(), policy=default_policy) for m in smtp.messages]
    during = [m for m in replies if m["In-Reply-To"] == "<during@x>"]
    assert len(during) == 2, [status_of(m) for m in replies]
    assert "recebido" in status_of(during[0]) and "concluído" in status_of(during[1]), status_of(during[1])
    assert all(m["To"] == REQUESTER for m in replies), "no alert to the admins: nothing was set aside"
    assert f2b.banned_jails("4.4.4.4") == [] and all("4.4.4.4" in f2b.ignore_list(j) for j in f2b.JAILS)
    assert dovecot.fetch_flags(USER) == ["\\Seen", "\\Seen"], "both handled in the inbox"
    assert dovecot.fetch_flags(USER, "Quarentena") == [], "never moved to the quarantine folder"
    assert not list((state / "seen").glob("*.failures")), "no failure was held against the message"
    assert "setting message" not in log_text and "inventory cannot be read" in log_text
