"""The athome command line as ops use it: token and queue commands, and the service loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatcher.mail import open_maildir
from tests import servers
from tests.messages import AUTHSERV, command_message

REPO = Path(__file__).resolve().parent.parent


def athome(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "athome.yml"
    path.write_text(
        f"state_dir: {tmp_path}/state\n"
        "inventory: inventory/demo\n"
        "mail:\n  transport: maildir\n  from_address: ops@example.test\n  admin_addresses: [a@example.test]\n"
        f"  maildir: {{inbox: {tmp_path}/in, outbox: {tmp_path}/out}}\n"
        f"auth: {{senders: [ana@example.test], tokens_file: {tmp_path}/tokens.json,\n"
        f"  authentication_results: {{trusted_authserv_ids: [{AUTHSERV}]}}}}\n"
        "worker: {poll_interval: 0.5}\n"
    )
    return path


def new_token(out: str) -> str:
    return out.split("): ", 1)[1].split()[0]


def test_token_commands_print_the_token_once_and_store_only_its_hash(cfg, tmp_path):
    add = ("--config", str(cfg), "token", "add", "--description", "NOC", "--sender", "ana@example.test")
    token = new_token(athome(*add, "--commands", "checkip").stdout)
    assert len(token) == 16 and token not in (tmp_path / "tokens.json").read_text()
    listing = athome("--config", str(cfg), "token", "list").stdout
    assert "t1\tenabled\t-\tCHECKIP\tana@example.test\texpires -\tNOC" in listing and token not in listing
    athome("--config", str(cfg), "token", "disable", "t1")
    assert "t1\tdisabled" in athome("--config", str(cfg), "token", "list").stdout
    bad = athome(*add, "--commands", "REBOOT", check=False)
    assert bad.returncode == 1 and "unknown command" in bad.stderr
    unbound = athome("--config", str(cfg), "token", "add", "--description", "x", check=False)
    assert unbound.returncode == 2 and "--sender" in unbound.stderr
    rotated = athome("--config", str(cfg), "token", "rotate", "t1").stdout
    assert new_token(rotated) != token and "stopped working" in rotated


def test_legacy_tokens_import_as_they_really_are_and_check_warns_about_them(cfg, tmp_path):
    legacy = tmp_path / "legacy-tokens.json"
    legacy.write_text(
        json.dumps(
            {
                "tokens": [
                    {"token": "A1B2C3D4", "description": "Token Master 1", "enabled": True},
                    {"token": "12345678", "description": "Token Teste", "enabled": True},
                ]
            }
        )
    )
    out = athome("--config", str(cfg), "token", "import", str(legacy), "--sender", "ana@example.test").stdout
    assert (
        "t1 (Token Master 1): imported enabled, legacy" in out and "guessable token imported DISABLED" in out
    )
    assert "A1B2C3D4" not in (tmp_path / "tokens.json").read_text()
    check = athome("--config", str(cfg), "check", check=False).stdout
    assert "WARNING: auth: token t1 (Token Master 1): a legacy token" in check
    legacy.write_text('{"tokens": [{"token": "A1B2C3D4"}, "oops"]}')
    bad = athome(
        "--config", str(cfg), "token", "import", str(legacy), "--sender", "ana@example.test", check=False
    )
    assert bad.returncode == 1 and f"{legacy}: entry 2 is not an object" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_queue_commands_list_show_and_retry(cfg, tmp_path):
    from dispatcher.jobqueue import DirQueue

    q = DirQueue(tmp_path / "state" / "queue")
    job = q.put({"command": "CHECKIP", "command_text": "CHECKIP=3.3.3.3", "requester": "ana@example.test"})
    q.finish(q.claim(), success=False)
    listing = athome("--config", str(cfg), "queue", "list").stdout
    assert f"{job.id}\tfailed" in listing and "CHECKIP=3.3.3.3" in listing
    shown = json.loads(athome("--config", str(cfg), "queue", "show", job.id).stdout)
    assert shown["state"] == "failed" and shown["payload"]["requester"] == "ana@example.test"
    athome("--config", str(cfg), "queue", "retry", job.id)
    assert f"{job.id}\tpending" in athome("--config", str(cfg), "queue", "list", "--state", "pending").stdout
    missing = athome("--config", str(cfg), "queue", "show", "nope", check=False)
    assert missing.returncode == 1 and "no job nope" in missing.stderr


def test_the_service_answers_while_running_and_stops_cleanly_on_sigterm(cfg, tmp_path):
    token = new_token(
        athome(
            "--config", str(cfg), "token", "add", "--description", "svc", "--sender", "ana@example.test"
        ).stdout
    )
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        msg = command_message(f"[{token}] HELP", msgid="<run@x>")
        open_maildir(tmp_path / "in").add(msg)  # safe while the service creates it too
        deadline = time.monotonic() + 30
        out = tmp_path / "out" / "new"
        while time.monotonic() < deadline and not (out.exists() and any(out.iterdir())):
            time.sleep(0.2)
        assert out.exists() and len(list(out.iterdir())) == 1, "the running service answered HELP"
        # The service is up (it answered): a second worker is refused.
        busy = athome("--config", str(cfg), "work", "--once", check=False)
        assert busy.returncode == 1 and "already running" in busy.stderr, "one worker at a time"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped" in output


def test_state_files_are_private_whatever_umask_athome_is_started_with(cfg, tmp_path):
    add = ("--config", str(cfg), "token", "add", "--description", "u", "--sender", "ana@example.test")
    token = new_token(athome(*add).stdout)
    open_maildir(tmp_path / "in").add(command_message(f"[{token}] CHECKIP=3.3.3.3", msgid="<um@x>"))
    subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "poll", "--once"],
        cwd=REPO,
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(0o022),  # a shell's usual umask
    )
    state = tmp_path / "state"
    made = [p for p in state.rglob("*")]
    assert len(made) > 10, "the pass wrote its queue, ledger and audit trail"
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in made if p.stat().st_mode & 0o077]
    assert loose == []


def status(cfg) -> tuple[int, dict]:
    proc = athome("--config", str(cfg), "status", "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)


def test_status_says_down_healthy_or_degraded_with_an_exit_code_for_monitoring(cfg, tmp_path):
    code, report = status(cfg)
    assert code == 2 and report["status"] == "down" and "not running" in report["reasons"][0]
    athome("--config", str(cfg), "token", "add", "--description", "s", "--sender", "ana@example.test")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        servers.wait_for(
            lambda: status(cfg)[0] == 0, "the running service to report healthy", timeout=60, proc=proc
        )
        code, report = status(cfg)
        assert report["service"]["intake_running"] and report["service"]["mailbox_read_ago"] is not None
        # A record set aside: degraded, and says why.
        (tmp_path / "state" / "queue" / "quarantine" / "20250101_000000_000000_00.json").write_text("{")
        code, report = status(cfg)
        assert code == 1 and any("quarantine" in r for r in report["reasons"])
        text = athome("--config", str(cfg), "status", check=False)
        assert text.returncode == 1 and text.stdout.startswith("athome: DEGRADED")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert status(cfg)[0] == 2, "stopped: down"


def test_a_recordings_window_longer_than_the_module_allows_is_a_config_problem(tmp_path):
    from dispatcher import config as config_module

    with pytest.raises(config_module.ConfigError) as caught:
        config_module.from_dict({"commands": {"max_window_days": 120}}, base=tmp_path)
    assert any("between 1 and 91, not 120" in p for p in caught.value.problems)
    with pytest.raises(config_module.ConfigError) as other:  # the rest of this config is missing
        config_module.from_dict({"commands": {"max_window_days": 91}}, base=tmp_path)
    assert other.value.problems and not any("max_window_days" in p for p in other.value.problems)
