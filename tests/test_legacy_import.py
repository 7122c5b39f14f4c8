"""`athome legacy import`: a legacy tree (tests/fixtures/legacy, written from DOMAIN.md)
carried across, checked, and used for real: a command email through Dovecot IMAP, the
SMTP sink and sshd + fail2ban on loopback, with the imported configuration.

The imported inventory holds the legacy addresses (192.0.2.0/24, never routed): the
end-to-end test rewrites every host to a loopback sandbox and proves none is left
before anything runs.
"""

from __future__ import annotations

import base64
import email
import json
import os
import shutil
import subprocess
import sys
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from dispatcher import inventory
from dispatcher.auth import TokenStore
from dispatcher.legacy import legacy_timers
from tests import servers
from tests.messages import command_message, passing_results
from tests.test_end_to_end import SMTP_PASSWORD, USER, smtp_submission  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "legacy"
IMAP_PASSWORD = "imap-test-password"  # the Dovecot user's: the "rotated" new password
ANA, BIA = "ana@athome.example.com", "bia@athome.example.com"
TOKEN = "9F3E7A21"  # "NOC turno dia", enabled in the legacy file
# Every secret value of the fixture tree, and every legacy token in clear.
LEGACY_SECRETS = [
    "placeholder-imap-secret-8c1f",
    "placeholder-smtp-secret-2b7e",
    "placeholder-ssh-secret-4d2a",
    "placeholder-slave-secret-6f0b",
    "AKIAPLACEHOLDER7Q3X",
    "placeholder/s3-secret+9e4c",
]
LEGACY_TOKENS = [
    t["token"] for t in json.loads((FIXTURE / "master/security/tokens.json").read_text())["tokens"]
]
SECRETS = LEGACY_SECRETS + LEGACY_TOKENS + [t.lower() for t in LEGACY_TOKENS]
# In files full of digits (hashes, times, ansible's event data) 12345678 and 00000000 could occur
# by chance: files are searched for the others.
IN_FILES = [s for s in SECRETS if not s.isdigit()]
FILES = [
    "athome.yml",
    "athome.env.example",
    "senders.txt",
    "tokens.json",
    "inventory/hosts.yml",
    *(f"inventory/host_vars/{h}.yml" for h in ("gv1p", "gv2p", "gv3p", "voip1", "voip3", "audio")),
]


def athome(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env["PATH"]
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if log is not None:
        with log.open("a") as f:
            f.write(proc.stdout + proc.stderr)
    return proc


def import_(legacy: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return athome(
        "legacy", "import", str(legacy), "--out", str(out), "--sender", ANA, "--sender", BIA, *extra
    )


def new_secrets_env() -> dict:
    """The environment of the service once the secrets are rotated: the names athome.env.example gives."""
    return {"ATHOME_IMAP_PASSWORD": IMAP_PASSWORD, "ATHOME_SMTP_PASSWORD": SMTP_PASSWORD}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def assert_no_secret(*texts: str, roots: tuple[Path, ...] = ()) -> None:
    for text in texts:
        for s in SECRETS:
            assert s not in text, f"{s!r} leaked into the output"
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.suffix == ".json" and "outbox" in path.parts:  # stored replies are base64 MIME
                data += base64.b64decode(json.loads(data)["payload"]["raw"])
            for s in IN_FILES:
                assert s.encode() not in data, f"{s!r} leaked into {path}"


@pytest.fixture
def legacy(workdir) -> Path:
    """A copy of the fixture tree: the master's and the slave's side by side."""
    return Path(shutil.copytree(FIXTURE, workdir / "legacy"))


# ------------------------------------------------------------------ the import itself


def test_dry_run_prints_the_plan_and_writes_nothing(legacy, workdir):
    out = workdir / "import"
    proc = import_(legacy, out, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not out.exists(), "a dry run writes nothing, not even the directory"
    for rel in FILES:
        assert f"CREATE    {rel}" in proc.stdout
    assert "10 legacy tokens (6 enabled, 4 disabled)" in proc.stdout
    assert "dry run: nothing written" in proc.stdout
    assert_no_secret(proc.stdout, proc.stderr)

    assert import_(legacy, out).returncode == 0
    (out / "senders.txt").write_text((out / "senders.txt").read_text() + "carla@athome.example.com\n")
    before = snapshot(out)
    again = import_(legacy, out, "--dry-run")
    assert "CONFLICT  senders.txt" in again.stdout and "UNCHANGED athome.yml" in again.stdout
    assert "-carla@athome.example.com" in again.stdout, "the dry run shows what --force would change"
    assert again.returncode == 1 and "1 file(s) would need --force" in again.stdout
    assert snapshot(out) == before, "nothing changed, not even a modification time"


def test_import_writes_everything_and_athome_check_passes_on_it(legacy, workdir):
    out = workdir / "import"
    proc = import_(legacy, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: configuration and inventory are valid" in proc.stdout, "the import ends with athome check"
    assert "NOTE: legacy timers: cannot tell" in proc.stdout, "no systemd here: said, no crash"

    inv = inventory.load(out / "inventory")
    assert inv.problems() == []
    assert {h.name for h in inv.group("sip_servers", enabled_only=False)} == {
        "gv1p",
        "gv2p",
        "gv3p",
        "voip1",
        "voip3",
    }
    assert [h.name for h in inv.group("fail2ban_servers")] == ["gv1p", "gv2p", "gv3p", "voip1"]
    assert [h.name for h in inv.group("mac_servers")] == ["gv1p", "gv2p", "gv3p"]
    assert [h.name for h in inv.group("recordings")] == ["audio"]
    assert inv.hosts["voip3"].enabled is False and inv.hosts["gv2p"].enabled is True
    assert {h: inv.hosts[h].vars["audios_from"] for h in ("gv1p", "voip1")} == {
        "gv1p": "audio",
        "voip1": "s3",
    }
    assert inv.hosts["gv3p"].vars["ansible_host"] == "192.0.2.13"
    audio = inv.hosts["audio"].vars
    assert audio["recordings_legacy_queue"] is True
    assert audio["recordings_legacy_queue_dir"] == "/root/sandbox/fila_audios", "the slave's QUEUE_DIR"
    assert audio["recordings_root"] == "/var/www/html/2p"
    assert audio["recordings_publish_base_url"] == "http://192.0.2.20/ramais"
    assert inv.hosts["voip1"].vars["recordings_s3_prefix"] == "voip1/"
    assert inv.hosts["voip1"].vars["recordings_s3_results_bucket"] == "athome-ramais"

    cfg = yaml.safe_load((out / "athome.yml").read_text())
    assert cfg["mail"]["imap"]["host"] == "imap.gmail.com" and cfg["mail"]["imap"]["security"] == "tls"
    assert cfg["mail"]["imap"]["password_env"] == "ATHOME_IMAP_PASSWORD"
    assert cfg["mail"]["smtp"]["password_env"] == "ATHOME_SMTP_PASSWORD"
    assert cfg["mail"]["imap"]["processed_folder"] == "Processados"
    assert cfg["mail"]["admin_addresses"] == ["admin@athome.example.com"]
    assert cfg["auth"]["authentication_results"]["trusted_authserv_ids"] == ["mx.google.com"]
    assert cfg["worker"]["max_attempts"] == 3
    env_example = (out / "athome.env.example").read_text()
    for name in (
        "ATHOME_IMAP_PASSWORD=",
        "ATHOME_SMTP_PASSWORD=",
        "AWS_ACCESS_KEY_ID=",
        "AWS_SECRET_ACCESS_KEY=",
    ):
        assert f"\n{name}\n" in env_example, f"{name} named, with no value"
    assert "EMAIL_PASSWORD" in env_example and "ssh_password" in env_example
    assert "ROTATE every one" in proc.stdout and "/etc/athome/athome.env" in proc.stdout
    lines = [x for x in (out / "senders.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["ana@athome.example.com", "bia@athome.example.com", "noc@athome.example.com"]

    entries = TokenStore(out / "tokens.json").entries()
    assert len(entries) == 10 and all(e.legacy and e.expires for e in entries)
    assert all(e.senders == [ANA, BIA] for e in entries)
    assert all(e.commands == ["CHECKIP", "MACCHANGE", "RAMAIS"] for e in entries), "allowed_commands.json"
    disabled = {e.description for e in entries if not e.enabled}
    assert disabled == {"Antigo estagiario", "Token Teste", "Token Debug", "Token Zero"}
    assert (out / "athome.key").stat().st_mode & 0o077 == 0

    check = athome("--config", str(out / "athome.yml"), "check", env=new_secrets_env())
    assert check.returncode == 0 and "OK: configuration and inventory are valid" in check.stdout, check.stdout
    assert "a legacy token (known in clear)" in check.stdout

    before = snapshot(out)
    again = import_(legacy, out)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout
    assert "UNCHANGED tokens.json" in again.stdout
    assert snapshot(out) == before, "a second import changes nothing"
    assert_no_secret(proc.stdout, proc.stderr, again.stdout, again.stderr, check.stdout, roots=(out,))


def test_a_file_that_differs_is_replaced_only_with_force_and_kept(legacy, workdir):
    out = workdir / "import"
    assert import_(legacy, out).returncode == 0
    edited = (out / "inventory/host_vars/gv1p.yml").read_text() + "extra_var: 1\n"
    (out / "inventory/host_vars/gv1p.yml").write_text(edited)
    refused = import_(legacy, out)
    assert refused.returncode == 1 and "nothing written: 1 file(s) exist and differ" in refused.stdout
    assert (out / "inventory/host_vars/gv1p.yml").read_text() == edited
    forced = import_(legacy, out, "--force")
    assert forced.returncode == 0, forced.stdout
    assert "extra_var" not in (out / "inventory/host_vars/gv1p.yml").read_text()
    [kept] = list((out / ".backups/inventory/host_vars").iterdir())
    assert kept.read_text() == edited and kept.name.startswith("gv1p.yml.")
    assert inventory.load(out / "inventory").problems() == [], "the backup is outside what ansible reads"


def test_unknown_keys_are_listed_by_name_never_by_value(legacy, workdir):
    cfg = legacy / "master/config/monitor_config.txt"
    cfg.write_text(cfg.read_text() + "BACKUP_FTP_PASSWORD=placeholder-imap-secret-8c1f\nLANGUAGE=pt_BR\n")
    allowed = legacy / "master/config/allowed_commands.json"
    allowed.write_text('{"allowed_commands": ["RAMAIS", "CHECKIP", "MACCHANGE", "REBOOT"]}')
    proc = import_(legacy, workdir / "import", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unknown keys, NOT imported (4)" in proc.stdout
    assert f"{allowed}:1: command REBOOT (athome has no such command)" in proc.stdout
    assert f"{cfg}:21: BACKUP_FTP_PASSWORD" in proc.stdout and f"{cfg}:22: LANGUAGE" in proc.stdout
    assert "servers_config.json:15: servers.audio.pbx_version" in proc.stdout
    assert "BACKUP_FTP_PASSWORD (" in proc.stdout.split("secrets found")[1], (
        "and counted as a secret to rotate"
    )
    assert_no_secret(proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("rel", "edit", "expected"),
    [
        (
            "master/config/monitor_config.txt",
            lambda t: t.replace("SMTP_PASSWORD=", "SMTP_PASSWORD "),
            "master/config/monitor_config.txt:10: not a KEY=VALUE line",
        ),
        (
            "master/config/monitor_config.txt",
            lambda t: t.replace("IMAP_PORT=993", "IMAP_PORT=nine"),
            "master/config/monitor_config.txt:6: IMAP_PORT is not a port number",
        ),
        (
            "audio/config/monitor_config.txt",
            lambda t: t + "MODE=master\n",
            "audio/config/monitor_config.txt:16: MODE is set twice (first on line 2)",
        ),
        (
            "master/servers/servers_config.json",
            lambda t: t.replace(
                '"fail2ban": true, "mac_files": false}', '"fail2ban": true "mac_files": false}'
            ),
            "master/servers/servers_config.json:10: not valid JSON: Expecting ',' delimiter",
        ),
        (
            "master/servers/servers_config.json",
            lambda t: t.replace(
                '"audios_from": "s3", "fail2ban": false', '"audios_from": "s4", "fail2ban": false'
            ),
            "master/servers/servers_config.json:12: servers.voip3.audios_from: 's4' is neither",
        ),
        (
            "master/security/tokens.json",
            lambda t: t.replace(
                '{"token": "3D6A1F8C", "description": "Comercial", "enabled": true}', '"3D6A1F8C"'
            ),
            'master/security/tokens.json:8: entry 6 is not an object with a "token" string',
        ),
        (
            "master/config/s3_config.json",
            lambda t: t.replace('"link_expiration": 259200', '"link_expiration": 9999999'),
            "master/config/s3_config.json:8: link_expiration: seconds, at most 7 days",
        ),
    ],
)
def test_malformed_inputs_name_the_file_and_line_and_write_nothing(legacy, workdir, rel, edit, expected):
    path = legacy / rel
    path.write_text(edit(path.read_text(encoding="latin-1")), encoding="latin-1")
    out = workdir / "import"
    proc = import_(legacy, out)
    assert proc.returncode == 1 and f"error: {legacy}/{expected}" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert_no_secret(proc.stdout, proc.stderr)


# ------------------------------------------------------------------ the legacy timers


def test_check_warns_when_the_legacy_timers_are_enabled_or_active(tmp_path):
    # No systemd runs in this container: the unit files and their enablement links are read.
    root = tmp_path / "root"
    (root / "etc/systemd/system/timers.target.wants").mkdir(parents=True)
    (root / "lib/systemd/system").mkdir(parents=True)
    for unit in ("monitor_emails.timer", "queue_processor.timer"):
        (root / "lib/systemd/system" / unit).write_text("[Timer]\nOnCalendar=*:0/3\n")
    warnings, notes = legacy_timers(systemctl="", root=root)
    assert warnings == [] and "installed but not enabled" in notes[0] and "cannot tell" in notes[0]
    (root / "etc/systemd/system/timers.target.wants/monitor_emails.timer").symlink_to(
        root / "lib/systemd/system/monitor_emails.timer"
    )
    warnings, notes = legacy_timers(systemctl="", root=root)
    assert len(warnings) == 1 and "monitor_emails.timer is enabled here" in warnings[0] and notes == []

    # With systemd running, `systemctl is-active` decides. Stand-in: a script answering as
    # systemctl does (one state a line, in the order asked), since systemd cannot run here.
    (root / "run/systemd/system").mkdir(parents=True)
    fake = tmp_path / "systemctl"
    fake.write_text('#!/bin/sh\n[ "$1" = is-active ] || exit 2\necho inactive\necho active\nexit 0\n')
    fake.chmod(0o755)
    warnings, notes = legacy_timers(systemctl=str(fake), root=root)
    assert notes == [] and len(warnings) == 1
    assert "queue_processor.timer is active here" in warnings[0] and "disable --now" in warnings[0]


# ------------------------------------------------------------------ a newcomer's installation


def test_make_install_puts_athome_on_the_path(tmp_path):
    venv = Path(sys.prefix)
    bindir = tmp_path / "bin"
    proc = subprocess.run(
        ["make", "-s", "-o", str(venv / ".installed"), "install", f"VENV={venv}", f"BINDIR={bindir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    link = bindir / "athome"
    assert link.is_symlink() and link.resolve() == (venv / "bin" / "athome").resolve()
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}/usr/bin:/bin")
    version = subprocess.run(["athome", "--version"], env=env, capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("athome "), version.stdout + version.stderr
    assert "not on your PATH" in proc.stdout, "the install says when its directory is not on PATH"


# ------------------------------------------------------------------ end to end


@pytest.fixture
def submission(smtp_submission):  # noqa: F811 - the fixture imported above
    """STARTTLS + AUTH, as the imported smtp.gmail.com:587 settings expect."""
    return smtp_submission.reset()


PROCESSED = "Processados"  # the legacy PROCESSED_FOLDER, imported as mail.imap.processed_folder


def empty_mailbox(dovecot) -> None:
    """An empty INBOX and an empty Processados (created first, as the README asks an operator to)."""
    doveadm = ["doveadm", "-c", str(dovecot.conf)]
    subprocess.run([*doveadm, "mailbox", "create", "-u", USER, PROCESSED], capture_output=True)
    for box in ("INBOX", PROCESSED):
        subprocess.run([*doveadm, "expunge", "-u", USER, "mailbox", box, "all"], check=True)


def seen(dovecot, mailbox: str = "INBOX") -> list[bool]:
    return ["\\Seen" in flags.split() for flags in dovecot.fetch_flags(USER, mailbox)]


def status_of(msg) -> str:
    """A reply's status: the first line of its text body (where main puts it, subjects becoming
    `Re: <command>`) together with the Subject (where it is before that change)."""
    text = msg.get_body(("plain",)).get_content()
    first = next(line.strip() for line in text.splitlines() if line.strip())
    return f"{msg['Subject']} | {first}"


def _mail_at_loopback(out: Path, workdir: Path, dovecot, smtp_server) -> Path:
    """Rewrite the imported config's mail servers (and state dir) to the loopback ones."""
    cfg_path = out / "athome.yml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["state_dir"] = str(workdir / "state")
    cfg["mail"]["imap"].update(host="127.0.0.1", port=dovecot.imap_port, security="plain", user=USER)
    cfg["mail"]["smtp"].update(
        host="127.0.0.1", port=smtp_server.port, security="starttls", user=USER, cafile=str(dovecot.cert)
    )
    cfg["worker"].update(retry_backoff=[0], poll_interval=1)
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def _point_at_loopback(out: Path, workdir: Path, sshd, dovecot, smtp_server, f2b: dict) -> Path:
    """Rewrite the imported config and inventory to loopback sandboxes (and nothing else)."""
    cfg_path = _mail_at_loopback(out, workdir, dovecot, smtp_server)
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    for path in (out / "inventory/host_vars").iterdir():
        hv = yaml.safe_load(path.read_text())
        hv.update(conn)
        if path.stem in f2b:
            hv["fail2ban_whitelist_conf_dir"] = str(f2b[path.stem].dir)
        if path.stem == "audio":
            hv["recordings_legacy_queue_dir"] = str(workdir / "fila_audios")
            for state in ("pending", "processing", "completed", "failed"):  # the slave's own queue
                (workdir / "fila_audios" / state).mkdir(parents=True)
            hv["recordings_publish_base_url"] = "http://127.0.0.1/ramais"  # a link in replies only
        path.write_text(yaml.safe_dump(hv))
    left = [p for p in (out / "inventory").rglob("*.yml") if "192.0.2." in p.read_text()]
    assert left == [], f"production addresses left in {left}"
    return cfg_path


def test_a_command_email_runs_end_to_end_with_the_imported_configuration(
    legacy, workdir, sshd, dovecot, submission, fail2ban_factory
):
    smtp = submission
    out = workdir / "import"
    imported = import_(legacy, out)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    f2b = {h: fail2ban_factory(h) for h in ("gv1p", "gv2p", "gv3p", "voip1")}
    cfg = _point_at_loopback(out, workdir, sshd, dovecot, smtp, f2b)
    log = workdir / "cli.log"
    env = new_secrets_env()
    check = athome("--config", str(cfg), "check", env=env, log=log)
    assert check.returncode == 0, check.stdout + check.stderr
    empty_mailbox(dovecot)

    # The runbook's first steps: [TOKEN] HELP, then harmless commands.
    f2b["gv3p"].ban("asterisk", "3.3.3.3")
    results = [passing_results(ANA, "mx.google.com")]  # Gmail's receiving server, as configured
    subjects = {
        "<help@athome.example.com>": f"[{TOKEN}] HELP",
        "<checkip@athome.example.com>": f"[{TOKEN}] CHECKIP=3.3.3.3",
        "<ramais@athome.example.com>": f"[{TOKEN}] RAMAIS=1121,1122 SERVER=gv1p INICIO=01/11/2025 00:00 "
        "FIM=05/11/2025 23:59",
    }
    for msgid, subject in subjects.items():
        dovecot.deliver(USER, command_message(subject, ANA, msgid, results=results).as_bytes())
    poll = athome("--config", str(cfg), "poll", "--once", env=env, log=log)
    assert poll.returncode == 0, poll.stdout + poll.stderr
    assert dovecot.fetch_flags(USER) == [], "handled messages leave the inbox (PROCESSED_FOLDER)"
    assert seen(dovecot, PROCESSED) == [True] * 3, "queued or answered, then flagged"
    work = athome("--config", str(cfg), "work", "--once", env=env, log=log)
    assert work.returncode == 0, work.stdout + work.stderr

    replies: dict[str, list] = {}
    for _frm, _rcpt, raw in smtp.messages:
        msg = email.message_from_bytes(raw.as_bytes(), policy=default_policy)
        replies.setdefault(msg["In-Reply-To"], []).append(msg)
    [help_reply] = replies["<help@athome.example.com>"]
    assert "CHECKIP" in help_reply.get_body(("plain",)).get_content()
    checkip = replies["<checkip@athome.example.com>"]
    assert len(checkip) == 2 and "✅" in status_of(checkip[-1]), [status_of(m) for m in checkip]
    assert f2b["gv3p"].banned_jails("3.3.3.3") == []
    for host, server in f2b.items():
        assert all("3.3.3.3" in server.ignore_list(j) for j in server.JAILS), host

    # The transition: recordings_legacy_queue on the recordings host hands RAMAIS over in the legacy JSON.
    ramais = replies["<ramais@athome.example.com>"]
    assert len(ramais) == 2 and "✅" in status_of(ramais[-1]), [status_of(m) for m in ramais]
    [handed] = list((workdir / "fila_audios/pending").glob("*.json"))
    doc = json.loads(handed.read_text())
    assert doc["parameters"] == {
        "ramais": "1121,1122",
        "inicio": "01/11/2025 00:00",
        "fim": "05/11/2025 23:59",
        "email": ANA,
    }
    assert doc["status"] == "pending" and doc["retries"] == 0 and doc["from_email"] == ANA

    raw_replies = "\n".join(m[2].as_string() for m in smtp.messages)
    assert_no_secret(
        imported.stdout, imported.stderr, log.read_text(), raw_replies, roots=(out, workdir / "state")
    )
    assert TOKEN not in raw_replies and TOKEN not in log.read_text()


def test_the_way_back_leaves_unhandled_mail_for_the_legacy_reader(legacy, workdir, dovecot, submission):
    """Mail that arrives once athome is stopped stays unseen: the legacy timers, re-enabled, read it."""
    out = workdir / "import"
    assert import_(legacy, out).returncode == 0
    cfg_path = _mail_at_loopback(out, workdir, dovecot, submission)
    empty_mailbox(dovecot)
    results = [passing_results(ANA, "mx.google.com")]
    dovecot.deliver(USER, command_message(f"[{TOKEN}] HELP", ANA, "<h1@x.test>", results=results).as_bytes())
    service = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg_path), "run"],
        env=dict(os.environ, **new_secrets_env()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        servers.wait_for(lambda: seen(dovecot, PROCESSED) == [True], "athome handles HELP", proc=service)
    finally:
        service.terminate()  # systemctl stop athome
        service.wait(timeout=120)
    assert service.returncode == 0
    dovecot.deliver(USER, command_message(f"[{TOKEN}] HELP", ANA, "<h2@x.test>", results=results).as_bytes())
    assert seen(dovecot) == [False], "a message athome has not handled stays unseen for the legacy"
