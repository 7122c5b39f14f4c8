"""The work side under faults, in process with the Maildir transport and real playbooks
over sshd on loopback: poison records are quarantined while the other jobs complete; a
full disk (a real tmpfs filled up) loses nothing, strands nothing, leaves no temp file,
and work resumes by itself once space returns. Results are final."""

from __future__ import annotations

import contextlib
import email
import json
import logging
import os
import subprocess
import sys
from email.policy import default as default_policy
from pathlib import Path

import yaml

from dispatcher import config
from dispatcher.auth import TokenStore
from dispatcher.service import Dispatcher
from tests import servers
from tests.disk import small_disk
from tests.messages import AUTH, command_message, status_of
from tests.test_macchange_playbook import MacHost, with_mac

REQUESTER = "ana@example.test"
REPO = Path(__file__).resolve().parent.parent


class Site:
    """A config file (for the CLI too), a MAC server over sshd and the mailboxes."""

    def __init__(self, workdir: Path, sshd, state_dir: Path, monitor: str = ""):
        self.workdir = workdir
        self.gv2p = MacHost(workdir, "gv2p")
        hostvars = self.gv2p.hostvars(servers.target_python())
        if monitor:
            hostvars["endpoint_mac_monitor_command"] = ["/bin/sh", "-c", monitor]
        inventory = servers.write_inventory(
            workdir / "inventory" / "hosts.yml",
            {
                "sip_servers": {"gv2p": {"audios_from": "audio"}},
                "mac_servers": {"gv2p": hostvars},
                "fail2ban_servers": {},
                "recordings": {"audio": {}},
            },
            sshd.ansible_vars(),
        )
        tokens = TokenStore(workdir / "tokens.json")
        _, self.token = tokens.add("fault tests", senders=[REQUESTER])
        self.config = workdir / "athome.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(state_dir),
                    "inventory": str(inventory.parent),
                    "mail": {
                        "transport": "maildir",
                        "from_address": "ops@example.test",
                        "admin_addresses": ["admin@example.test"],
                        "maildir": {"inbox": str(workdir / "inbox"), "outbox": str(workdir / "outbox")},
                    },
                    "auth": {"senders": [REQUESTER], "tokens_file": str(tokens.path), **AUTH},
                    "worker": {"retry_backoff": [0]},
                }
            )
        )
        self.dispatcher = Dispatcher(config.load(self.config))

    def send(self, command: str, msgid: str) -> None:
        self.dispatcher._inbox_factory().box.add(command_message(f"[{self.token}] {command}", msgid=msgid))

    def unseen(self) -> list[str]:
        return [m.message_id for m in self.dispatcher._inbox_factory().fetch()]

    def replies(self) -> list[tuple[str, str]]:
        """(In-Reply-To, kind) of every reply delivered, kind 'ack' or 'result'."""
        out = []
        for sub in ("new", "cur"):
            for path in sorted((self.workdir / "outbox" / sub).glob("*")):
                msg = email.message_from_bytes(path.read_bytes(), policy=default_policy)
                out.append((msg["In-Reply-To"], "ack" if "recebido" in status_of(msg) else "result"))
        return sorted(out)

    def queue_files(self) -> dict[str, list[str]]:
        d = self.dispatcher
        return {
            f"{name}/{state}": sorted(os.listdir(q.root / state))
            for name, q in (("queue", d.jobs), ("outbox", d.outbox))
            for state in ("tmp", "pending", "processing", "done", "failed", "quarantine")
        }


def _move_to_processing(q, job_id: str, **changes) -> None:
    """Rewrite a stored record by hand into processing/ (as a crash or a person leaves it)."""
    path = q.root / "pending" / f"{job_id}.json"
    data = json.loads(path.read_text())
    data.update(changes)
    (q.root / "processing" / f"{job_id}.json").write_text(json.dumps(data))
    path.unlink()


MAC = "MACCHANGE=3010 MACATUAL={} MACFUTURO={} SERVER=gv2p"
RAN = {"status": "successful", "hosts": {}, "errors": []}


def test_poison_records_are_quarantined_and_the_other_jobs_complete(sshd, workdir, caplog):
    site = Site(workdir, sshd, workdir / "state")
    d = site.dispatcher
    site.send(MAC.format("010203040506", "010203040599"), "<good@x>")
    assert d.poll_once()["queued"] == 1
    [good] = d.jobs.list("pending")
    payload = dict(good.payload, message_id="<saved@x>")
    # In processing/: a job whose result was saved before a crash (completes without a
    # run), and the poison: a result, but a payload without its command text.
    saved = d.jobs.put(payload, job_id="20000101_000000_000000_01")
    _move_to_processing(d.jobs, saved.id, attempts=1, result={"outcome": "success", "playbook": RAN})
    broken = {k: v for k, v in payload.items() if k != "command_text"}
    poison = d.jobs.put(broken, job_id="20000101_000000_000000_00")
    _move_to_processing(d.jobs, poison.id, attempts=1, result={"outcome": "success"})
    # In pending/: a record cut in half on disk, and one whose requester is gone.
    cut = d.jobs.put(payload, job_id="20000101_000000_000000_02")
    path = d.jobs.root / "pending" / f"{cut.id}.json"
    path.write_bytes(path.read_bytes()[:100])
    orphan = {k: v for k, v in payload.items() if k != "requester"}
    nobody = d.jobs.put(orphan, job_id="20000101_000000_000000_03")

    with caplog.at_level(logging.ERROR, logger="dispatcher"):
        assert d.work_once() == 1, "the good job ran; the saved one was completed"

    assert d.jobs.get(good.id).state == "done" and d.jobs.get(saved.id).state == "done"
    assert site.gv2p.files() == with_mac("010203040599") and site.gv2p.notifications() == 1
    assert site.replies() == [("<good@x>", "ack"), ("<good@x>", "result"), ("<saved@x>", "result")]
    files = site.queue_files()
    bad = [poison.id, cut.id, nobody.id]
    assert sorted(n.split(".json.")[0] for n in files["queue/quarantine"]) == sorted(bad)
    assert files["queue/pending"] == files["queue/processing"] == files["queue/tmp"] == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for job_id in bad:
        assert any(job_id in e and "quarantined" in e for e in errors), (job_id, errors)

    listing = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(site.config), "queue", "list"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=True,
    ).stdout
    assert "3 quarantined record(s)" in listing
    for job_id in bad:
        assert f"{job_id}.json." in listing
    assert f"{good.id}\tdone" in listing


def test_a_reply_that_can_never_be_sent_is_quarantined_and_the_others_go_out(sshd, workdir, smtp):
    from dispatcher.mail import SMTPSender

    site = Site(workdir, sshd, workdir / "state")
    d = site.dispatcher
    d._sender = SMTPSender(config.SMTPSettings(host="127.0.0.1", port=smtp.port, security="plain", timeout=5))
    d.outbox.put({"raw": "not base64!", "rcpt": [REQUESTER], "kind": "result"}, job_id="a-garbled")
    d.outbox.put({"rcpt": [REQUESTER], "kind": "result"}, job_id="b-no-message")
    d.outbox.put({"raw": "", "rcpt": "ana", "kind": "result"}, job_id="c-no-list")
    site.send("HELP", "<help@x>")
    assert d.poll_once()["replied"] == 1
    [(_, rcpt, msg)] = smtp.messages
    assert rcpt == [REQUESTER] and msg["In-Reply-To"] == "<help@x>"
    files = site.queue_files()
    quarantined = sorted(n.split(".json.")[0] for n in files["outbox/quarantine"])
    assert quarantined == ["a-garbled", "b-no-message", "c-no-list"]
    assert files["outbox/pending"] == files["outbox/processing"] == []


def test_a_saved_result_is_final_on_the_last_attempt(sshd, workdir):
    """The worker fails after the playbook ran and its result was saved: the result stands
    and the job is completed with it, not failed, not run again."""
    site = Site(workdir, sshd, workdir / "state")
    d = site.dispatcher
    site.send(MAC.format("010203040506", "010203040599"), "<last@x>")
    d.poll_once()
    job = d.jobs.claim()
    job.attempts = job.max_attempts
    job.result = {"outcome": "success", "playbook": RAN}
    d.jobs.checkpoint(job)
    d._give_back(job, "RuntimeError: the worker broke after the checkpoint")
    stored = d.jobs.get(job.id)
    assert stored.state == "done" and stored.result["outcome"] == "success"
    assert site.replies() == [("<last@x>", "ack")] and d.outbox.count("pending") == 1
    assert site.gv2p.files() == with_mac("010203040506"), "the playbook did not run"


def test_a_job_given_back_with_its_result_saved_is_completed_not_run_again(sshd, workdir):
    """As an older version left it: back in pending/ with its result (retry_later)."""
    site = Site(workdir, sshd, workdir / "state")
    d = site.dispatcher
    site.send(MAC.format("010203040506", "010203040599"), "<again@x>")
    d.poll_once()
    job = d.jobs.claim()
    job.result = {"outcome": "success", "playbook": RAN}
    d.jobs.checkpoint(job)
    d.jobs.retry_later(job, 0, "the reply could not be queued")
    assert d.work_once() == 1
    assert d.jobs.get(job.id).state == "done"
    assert site.replies() == [("<again@x>", "ack"), ("<again@x>", "result")]
    assert site.gv2p.files() == with_mac("010203040506") and site.gv2p.notifications() == 0, "not run"
    assert not list(d.cfg.artifacts_dir.glob(f"{job.id}-*")), "no run was even started"


def test_a_job_left_in_processing_goes_back_on_the_next_pass_not_the_next_start(sshd, workdir):
    """What a give-back that failed (a full disk) leaves: settled by the next work pass."""
    site = Site(workdir, sshd, workdir / "state")
    d = site.dispatcher
    site.send(MAC.format("010203040506", "010203040599"), "<stranded@x>")
    d.poll_once()
    job = d.jobs.claim()  # and the worker could not give it back
    assert d.work_once() == 1
    assert d.jobs.get(job.id).state == "done" and d.jobs.get(job.id).attempts == 2
    assert site.gv2p.files() == with_mac("010203040599")
    assert site.replies() == [("<stranded@x>", "ack"), ("<stranded@x>", "result")]


def test_a_full_disk_loses_nothing_and_work_resumes_when_space_returns(sshd, workdir):
    """The state dir on a real tmpfs. The disk fills twice: before a pass (the claim cannot
    be recorded), and in the middle of a playbook (the provisioning monitor, run by the
    playbook, fills it: the result cannot be saved). Each time the passes fail, and
    once the filler is removed the next passes finish everything, once each."""
    with small_disk(workdir / "disk", "16m") as disk:
        once = workdir / "monitor-filled-the-disk"
        monitor = (
            f'echo notified >> {workdir / "gv2p-monitor.log"}; '
            f"[ -e {once} ] || {{ touch {once}; cat /dev/zero > {disk.filler} 2>/dev/null; }}; exit 0"
        )
        site = Site(workdir, sshd, disk.path / "state", monitor=monitor)
        d = site.dispatcher
        site.send(MAC.format("010203040506", "010203040599"), "<first@x>")
        assert d.poll_once()["queued"] == 1
        [first] = d.jobs.list("pending")

        # 1. Full before the passes: new mail stays unseen, the queued job stays pending.
        disk.fill()
        site.send(MAC.format("010203040599", "010203040577"), "<second@x>")
        for _ in range(2):
            with contextlib.suppress(OSError):
                d.poll_once()
            with contextlib.suppress(OSError):
                d.work_once()
            assert site.unseen() == ["<second@x>"], "the new command is still in the mailbox"
            files = site.queue_files()
            assert files["queue/pending"] == [f"{first.id}.json"], files
            assert files["queue/processing"] == files["queue/tmp"] == files["outbox/tmp"] == [], files
            assert d.jobs.get(first.id).attempts == 0
        assert site.gv2p.files() == with_mac("010203040506") and not once.exists()

        # 2. Space returns; the playbook of the first job fills the disk again mid-run.
        disk.free()
        d.poll_once()
        assert site.unseen() == [] and d.jobs.count("pending") == 2
        with contextlib.suppress(OSError):
            d.work_once()
        assert once.exists() and disk.filler.stat().st_size > 0, "the monitor filled the disk"
        assert site.gv2p.files() == with_mac("010203040599"), "the first change was made"
        files = site.queue_files()
        assert files["queue/tmp"] == files["outbox/tmp"] == [], files
        assert files["queue/done"] == files["queue/failed"] == [], "not failed for the disk's fault"
        assert files["queue/processing"] == [] and len(files["queue/pending"]) == 2, files
        assert d.jobs.get(first.id).attempts == 0, "the disk's fault spent no attempt"
        assert site.replies() == [("<first@x>", "ack"), ("<second@x>", "ack")], "no result yet"
        # The run died with the disk (its events could not be written) after the monitor was
        # told but before that was recorded on the host: the re-run tells it again.
        assert Path(f"{site.gv2p.def_path}.monitor-pending").exists()

        # 3. The filler goes: the next passes finish both, nothing twice.
        disk.free()
        for _ in range(2):
            d.work_once()
        files = site.queue_files()
        assert len(files["queue/done"]) == 2, files
        assert files["queue/pending"] == files["queue/processing"] == files["queue/quarantine"] == []
        assert files["queue/tmp"] == files["outbox/tmp"] == files["outbox/pending"] == []
        assert site.gv2p.files() == with_mac("010203040577")
        # The re-run of the first change writes nothing and notifies again (at least once,
        # never zero), the second change once.
        assert site.gv2p.notifications() == 3
        assert not Path(f"{site.gv2p.def_path}.monitor-pending").exists()
        assert site.replies() == [
            ("<first@x>", "ack"), ("<first@x>", "result"), ("<second@x>", "ack"), ("<second@x>", "result")
        ]
        for job in d.jobs.list("done"):
            assert job.result["outcome"] == "success", job.result
