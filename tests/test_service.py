"""Dispatcher behaviour that needs no playbook: locks, retention, failure isolation."""

from __future__ import annotations

import os
import time
from email.message import EmailMessage

import pytest

from dispatcher import config
from dispatcher.auth import TokenStore
from dispatcher.errors import AthomeError
from dispatcher.service import Dispatcher

REPO_INVENTORY = os.path.join(os.path.dirname(__file__), "..", "inventory", "demo")


@pytest.fixture
def make(tmp_path):
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.add("svc")

    def build() -> Dispatcher:
        cfg = config.from_dict(
            {
                "state_dir": str(tmp_path / "state"),
                "inventory": REPO_INVENTORY,
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")},
                },
                "auth": {"senders": ["ana@example.test"], "tokens_file": str(tokens.path)},
                "worker": {"retention_days": 30},
            },
            base=tmp_path,
        )
        return Dispatcher(cfg)

    build.token = token
    build.tmp = tmp_path
    return build


def drop(d: Dispatcher, subject: str, msgid: str) -> None:
    m = EmailMessage()
    m["From"] = "ana@example.test"
    m["Subject"] = subject
    m["Message-ID"] = msgid
    m.set_content("x")
    d._inbox_factory().box.add(m)


def test_only_one_process_works_the_queue(make):
    first, second = make(), make()
    first.lock("work")
    with pytest.raises(AthomeError, match="already running"):
        second.lock("work")
    second.lock("intake"), "intake and work are separate locks"


def test_retention_removes_old_finished_records_and_markers_only(make):
    d = make()
    old, new = d.jobs.put({"n": 1}), d.jobs.put({"n": 2})
    for _ in (old, new):
        claimed = d.jobs.claim()
        d.jobs.finish(claimed)
    pending = d.jobs.put({"n": 3})
    marker = d.cfg.seen_dir / "abc"
    marker.write_text("{}")
    past = time.time() - 31 * 86400
    os.utime(d.jobs.root / "done" / f"{old.id}.json", (past, past))
    os.utime(d.jobs.root / "pending" / f"{pending.id}.json", (past, past))
    os.utime(marker, (past, past))
    removed = d.prune()
    assert removed["jobs"] == 1 and removed["seen"] == 1
    assert d.jobs.find(old.id) is None and d.jobs.find(new.id) is not None
    assert d.jobs.find(pending.id) is not None, "work still to do is never pruned"


def test_a_message_that_cannot_be_handled_stays_unseen_and_the_others_go_on(make):
    d = make()
    drop(d, f"[{make.token}] HELP", "<bad@x>")
    drop(d, f"[{make.token}] CHECKIP=3.3.3.3", "<good@x>")
    real_render = d.replies.render

    def render(kind, **values):  # fault injection: a broken HELP template
        if kind == "help":
            raise RuntimeError("template broken")
        return real_render(kind, **values)

    d.replies.render = render
    counts = d.poll_once()
    assert counts["failed"] == 1 and counts["queued"] == 1
    assert [m.message_id for m in d._inbox_factory().fetch()] == ["<bad@x>"], "the failed one stays unseen"
    d.replies.render = real_render
    assert d.poll_once()["replied"] == 1, "fixed: handled on the next pass"


def test_a_job_for_a_command_this_version_does_not_know_is_answered_not_looped(make):
    d = make()
    job = d.jobs.put(
        {
            "command": "REBOOTALL",
            "params": {},
            "command_text": "REBOOTALL=1",
            "requester": "ana@example.test",
            "message_id": "<old@x>",
            "references": "",
        }
    )
    assert d.work_once() == 1
    assert d.jobs.get(job.id).state == "failed"
    [reply] = d.outbox.list("done")
    assert reply.id == f"{job.id}-result"
