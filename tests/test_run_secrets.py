"""Secrets stay out of process arguments, environments and what a run leaves on disk.

- Extravars go to <private data dir>/env/extravars (0600, every string `!unsafe`),
  never on the ansible-playbook command line that every local user can read.
- Private data dirs live under state/run/ and what a killed service left there is
  removed at the next start.

Real parts: sshd on loopback, ansible-runner.
"""

from __future__ import annotations

import contextlib
import email
import json
import os
import stat
import time
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest

from dispatcher import config, runner
from dispatcher.auth import TokenStore
from dispatcher.service import Dispatcher
from tests import servers

REQUESTER = "ana@example.test"
# Stands for the rest of the service's environment: kept artifacts must not record it.
CANARY_VAR, CANARY = "ATHOME_TEST_ENV_CANARY", "canary-4b1d-environment"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(root: Path) -> list[Path]:
    return [Path(d, f) for d, _dirs, files in os.walk(root) for f in files]


def holders(root: Path, needles: list[str], skip: tuple[Path, ...] = ()) -> list[str]:
    """Every file under root (skip excepted) that contains one of the needles."""
    found = []
    for path in files_under(root):
        if path in skip:
            continue
        with contextlib.suppress(FileNotFoundError):
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return found


# ------------------------------------------------------------------ unit: extravars file


def test_extravars_file_tags_every_string_unsafe_and_is_private(tmp_path):
    from ansible.parsing.dataloader import DataLoader
    from ansible.utils.unsafe_proxy import AnsibleUnsafeText

    values = {
        "requester": "{{ 7*7 }}@example.com",
        "extensions": ["1121", "0012"],
        "nested": {"note": "{% raw %}x", "list": [{"deep": "ação"}]},
        "count": 3,
        "check": True,
        "nothing": None,
    }
    path = runner.write_extravars(tmp_path, values)
    assert path == tmp_path / "env" / "extravars"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    loaded = DataLoader().load_from_file(str(path))
    assert loaded == values, "Ansible reads back exactly what was written"
    for text in (
        loaded["requester"],
        loaded["extensions"][0],
        loaded["extensions"][1],
        loaded["nested"]["note"],
        loaded["nested"]["list"][0]["deep"],
    ):
        assert isinstance(text, AnsibleUnsafeText), repr(text)
    assert all(not isinstance(k, AnsibleUnsafeText) for k in loaded), "keys stay plain"
    assert loaded["count"] == 3 and loaded["check"] is True and loaded["nothing"] is None
    assert "!unsafe '{{ 7*7 }}@example.com'" in path.read_text()


def test_scrub_removes_only_leftover_run_dirs(tmp_path):
    root = tmp_path / "run"
    assert runner.scrub_private_dirs(root) == 0, "no root yet: nothing to do"
    left = root / "athome-run-abc123"
    (left / "artifacts" / "job-1").mkdir(parents=True)
    (left / "artifacts" / "job-1" / "command").write_text('{"env": {"X": "y"}}')
    (left / "env").mkdir()
    (left / "env" / "extravars").write_text("a: 1\n")
    other = root / "not-ours"
    other.mkdir()
    assert runner.scrub_private_dirs(root) == 1
    assert not left.exists() and other.is_dir()


def test_a_run_under_private_root_leaves_nothing_and_keeps_no_environment(tmp_path, monkeypatch):
    """audios.yml refused on localhost (no host needed): the private dir goes, the kept
    artifacts hold neither the recorded environment nor the extravars file."""
    monkeypatch.setenv(CANARY_VAR, CANARY)
    root, kept = tmp_path / "state" / "run", tmp_path / "state" / "artifacts"
    inventory = servers.write_inventory(tmp_path / "inv.yml", {"sip_servers": {}})
    result = runner.run_playbook(
        "audios.yml",
        inventory=inventory,
        extravars={"server": "nowhere", "request_id": "req-priv-1", "requester": "{{ 7*7 }}@x.example"},
        timeout=120,
        artifacts_dir=kept,
        ident="req-priv-1-1",
        private_root=root,
    )
    errors = result.errors + [e for h in result.hosts.values() for e in h.errors]
    assert result.status == "failed" and "Bad request" in " ".join(errors), result.to_dict()
    assert root.is_dir() and mode(root) == 0o700 and list(root.iterdir()) == []
    names = {p.name for p in (kept / "req-priv-1-1").iterdir()}
    assert "stdout" in names and "job_events" in names
    assert not names & {"command", "env", "fact_cache"}, names
    assert holders(kept, [CANARY]) == []


# ------------------------------------------------------------------ through the dispatcher


class Site:
    """A Dispatcher in this process on the Maildir transport (as tests/test_dispatch_commands.py)."""

    def __init__(self, workdir: Path, inventory: Path):
        self.workdir = workdir
        tokens = TokenStore(workdir / "tokens.json")
        _, self.token = tokens.add("secrets tests")
        self.cfg = config.from_dict(
            {
                "state_dir": str(workdir / "state"),
                "inventory": str(inventory.parent),
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {"inbox": str(workdir / "inbox"), "outbox": str(workdir / "outbox")},
                },
                "auth": {"senders": [REQUESTER], "tokens_file": str(tokens.path)},
                "worker": {"retry_backoff": [0], "playbook_timeout": 300},
            },
            base=workdir,
        )
        self.dispatcher = Dispatcher(self.cfg)

    def send(self, command: str) -> None:
        msg = EmailMessage()
        msg["From"] = REQUESTER
        msg["Subject"] = f"[{self.token}] {command}"
        msg["Message-ID"] = f"<secrets.{time.time()}@example.test>"
        msg.set_content("x")
        self.dispatcher._inbox_factory().box.add(msg)

    def result_text(self) -> str:
        box = self.workdir / "outbox"
        texts = [
            email.message_from_bytes(p.read_bytes(), policy=default_policy)
            for sub in ("new", "cur")
            for p in (box / sub).glob("*")
        ]
        results = [m for m in texts if "recebido" not in m["Subject"]]
        assert len(results) == 1, [m["Subject"] for m in texts]
        return results[0].get_body(("plain",)).get_content()


@pytest.fixture
def legacy_site(sshd, workdir):
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    queue = workdir / "fila_audios"
    for sub in ("pending", "processing", "completed", "failed"):
        (queue / sub).mkdir(parents=True)
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv1p": {"audios_from": "audio"}},
            "recordings": {
                "audio": {
                    "recordings_root": str(workdir / "tree"),
                    "recordings_publish_dir": str(workdir / "www"),
                    "recordings_publish_base_url": "http://127.0.0.1:9/recordings",
                    "recordings_legacy_queue": True,
                    "recordings_legacy_queue_dir": str(queue),
                }
            },
        },
        conn,
    )
    return Site(workdir, inv), queue


def test_a_requester_that_looks_like_a_template_reaches_the_host_literally(legacy_site):
    site, queue = legacy_site
    requester = "{{7*7}}@example.com"  # the whitelist would refuse it; the job is built directly
    job = site.dispatcher.jobs.put(
        {
            "command": "RAMAIS",
            "params": {
                "extensions": ["1121"],
                "server": "gv1p",
                "start": "2025-11-03 08:00",
                "end": "2025-11-04 18:30",
            },
            "command_text": "RAMAIS=1121 SERVER=gv1p INICIO=03/11/2025 08:00 FIM=04/11/2025 18:30",
            "requester": requester,
            "message_id": "<tpl@example.test>",
            "references": "",
        }
    )
    assert site.dispatcher.work_once() == 1
    done = [j.id for j in site.dispatcher.jobs.list("done")]
    assert done == [job.id], [j.result for j in site.dispatcher.jobs.list("failed")]
    doc = json.loads((queue / "pending" / f"{job.id}.json").read_text())
    assert doc["from_email"] == requester and doc["parameters"]["email"] == requester
    assert "49@example.com" not in json.dumps(doc)
