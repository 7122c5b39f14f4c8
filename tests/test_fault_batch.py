"""SIGKILL at random moments while `athome run` works through 50 command emails.

Real parts: Dovecot (IMAP), an SMTP sink (aiosmtpd), sshd, two fail2ban-servers
and the endpoint files of four MAC servers (inventory aliases of one sshd on
loopback). The dispatcher is `athome run` with `worker.concurrency: 2`; it is killed
with SIGKILL, with every process below it (as systemd does), and started again,
about ten times, at moments a seeded random plan picks (the seed is printed;
ATHOME_FAULT_SEED=N replays a run):

- intake: while it handles a wave of new mail (after k messages of the wave have
  their ledger entry);
- playbook: as the k-th next module starts on a host (a playbook half way);
- reply: while a reply is being sent (the SMTP server holds the k-th next message;
  after the kill it refuses it: it was never accepted).

How playbook runs are counted: every module a playbook runs on a host goes
through the host's Python. Here that is a small wrapper that notes the module and
the argument naming its job (CHECKIP: the address, MACCHANGE: the extension) in
the host's marks file, then runs the module unchanged. That is what the host
executed, and it survives the controller's death; ansible-runner's artifacts do
not (a killed run's private data dir is scrubbed at the next start and only
finished runs are kept), and the audit trail records a job's result, not each run.

One moment is kept out of the plan, and the test says so rather than tolerating
its effect: a reply the SMTP server accepted just before the kill, before the
service noted it sent, is sent again after the restart (SMTP cannot be exactly
once there; the replay carries the same Message-ID). Before every kill the sink
holds new messages and waits until each one it accepted is noted as sent.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import email
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from dispatcher.auth import TokenStore
from dispatcher.jobqueue import DirQueue
from tests import servers
from tests.messages import AUTH, command_message, status_of
from tests.test_macchange_playbook import ORIG_DEF, ORIG_SIP, MacHost
from tests.test_run_secrets import descendants, gone

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
USER = "service@example.test"
IMAP_PASSWORD = "imap-test-password"  # the session Dovecot's (tests/conftest.py)
ADMIN = "admin@example.test"
REQUESTERS = [f"{name}@example.test" for name in ("ana", "bia", "caio", "davi", "eva")]
F2B_HOSTS = ("gv1p", "gv2p")
MAC_HOSTS = ("gv3p", "gv4p", "gv5p", "gv6p")
EXTENSIONS = ("2001", "2003", "3001", "3002", "3012", "4001")  # MAC in both fixture files, one line each
COMMANDS = 50
KILLS = {"intake": 4, "playbook": 3, "reply": 3}

# ansible_python_interpreter of each host: notes the module run, then runs it.
MARKING_PYTHON = """#!/usr/bin/python3
import ast, json, re, subprocess, sys, time
data = open(sys.argv[1], "rb").read() if len(sys.argv) > 1 else sys.stdin.buffer.read()
found = re.search(rb"ANSIBALLZ_PARAMS = (.*)", data)
args = json.loads(ast.literal_eval(found.group(1).decode()))["ANSIBLE_MODULE_ARGS"] if found else {{}}
key = args.get("ip") or args.get("extension") or "-"
with open({marks!r}, "a") as marks:
    marks.write("%s %s %d\\n" % (args.get("_ansible_module_name", "?"), key, time.time_ns()))
if len(sys.argv) > 1:
    sys.exit(subprocess.run(["/usr/bin/python3", *sys.argv[1:]]).returncode)
sys.exit(subprocess.run(["/usr/bin/python3"], input=data).returncode)
"""


class Gate:
    """The SMTP sink's side of a kill: holds new messages (not accepted) while one is
    prepared, and refuses the held ones after it; can also call a kill itself when the
    k-th next message arrives (a kill during reply sending)."""

    def __init__(self):
        self.arrived = 0
        self.passed = 0  # accepted: the sink records them
        self.holding = False
        self.released = threading.Event()
        self.trigger_at: int | None = None
        self.triggered = threading.Event()

    async def before_accept(self, envelope) -> str | None:
        self.arrived += 1
        if self.trigger_at is not None and self.arrived >= self.trigger_at:
            self.trigger_at = None
            self.hold()
            self.triggered.set()
        if not self.holding:
            self.passed += 1
            return None
        # Held until the test lets go (`release`): a wait on that event, not a poll.
        await asyncio.get_running_loop().run_in_executor(None, self.released.wait, 900)
        return "451 4.3.0 the sender went away before this was accepted (test)"

    def hold(self) -> None:
        self.released.clear()
        self.holding = True

    def release(self) -> None:
        self.holding = False
        self.released.set()


class Batch:
    """The hosts, the commands and what the sink and the hosts saw."""

    def __init__(self, workdir: Path, sshd, dovecot, fail2ban_factory, seed: int):
        self.workdir, self.dovecot = workdir, dovecot
        self.rng = random.Random(seed)
        self.gate = Gate()
        self.sink = servers.SMTPSink(before_accept=self.gate.before_accept).start()
        self.f2b = {name: fail2ban_factory(name) for name in F2B_HOSTS}
        self.macs = {name: MacHost(workdir, name) for name in MAC_HOSTS}
        marks = {name: workdir / f"marks-{name}.log" for name in (*F2B_HOSTS, *MAC_HOSTS)}
        self.marks = marks
        python = {name: self._python(name, path) for name, path in marks.items()}
        f2b_vars = {
            name: {"fail2ban_whitelist_conf_dir": str(server.dir), "ansible_python_interpreter": python[name]}
            for name, server in self.f2b.items()
        }
        mac_vars = {name: host.hostvars(python[name]) for name, host in self.macs.items()}
        inventory = servers.write_inventory(
            workdir / "inventory" / "hosts.yml",
            {
                "sip_servers": {name: {"audios_from": "audio"} for name in (*F2B_HOSTS, *MAC_HOSTS)},
                "fail2ban_servers": f2b_vars,
                "mac_servers": mac_vars,
                "recordings": {"audio": {}},
            },
            dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python()),
        )
        tokens = TokenStore(workdir / "tokens.json")
        self.tokens = {who: tokens.add(who, senders=[who])[1] for who in REQUESTERS}
        self.state = workdir / "state"
        self.cfg = workdir / "athome.yml"
        self.cfg.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(self.state),
                    "inventory": str(inventory.parent),
                    "mail": {
                        "transport": "imap",
                        "from_address": USER,
                        "admin_addresses": [ADMIN],
                        "imap": servers.imap_settings(dovecot, USER, "ATHOME_TEST_IMAP_PW"),
                        "smtp": {
                            "host": "127.0.0.1",
                            "port": self.sink.port,
                            "security": "plain",
                            # ~110 replies in minutes: the outgoing limit is not under test here.
                            "max_recipients_per_hour": 0,
                            "max_recipients_per_day": 0,
                        },
                    },
                    "auth": {"senders": REQUESTERS, "tokens_file": str(tokens.path), **AUTH},
                    # Attempts enough for every kill: a job killed mid-run is retried, not failed.
                    "worker": {
                        "retry_backoff": [0],
                        "poll_interval": 1,
                        "concurrency": 2,
                        "max_attempts": 20,
                    },
                }
            )
        )
        self.jobs = DirQueue(self.state / "queue")
        self.outbox = DirQueue(self.state / "outbox")
        self.commands = self._commands()
        self.delivered = 0

    def _python(self, host: str, marks: Path) -> str:
        path = self.workdir / f"python-{host}"
        path.write_text(MARKING_PYTHON.format(marks=str(marks)))
        path.chmod(0o755)
        return str(path)

    def _commands(self) -> list[dict]:
        """50 commands in a seeded order: 24 MACCHANGE (6 extensions on each MAC server),
        10 CHECKIP (every third address banned somewhere first; each needs both fail2ban
        servers, so they run one at a time), 16 HELP or STATUS."""
        out = []
        for h, host in enumerate(MAC_HOSTS):
            for ext in EXTENSIONS:
                current = (
                    re.search(rb"^%s;MAC:([0-9A-F]{12});" % ext.encode(), ORIG_SIP, re.M).group(1).decode()
                )
                new = f"0200{h:02X}{ext}00"
                text = f"MACCHANGE={ext} MACATUAL={current} MACFUTURO={new} SERVER={host}"
                out.append(
                    {"kind": "MACCHANGE", "text": text, "host": host, "key": ext, "mac": (current, new)}
                )
        for n in range(10):
            ip = f"3.3.3.{10 + n}"
            if n % 3 == 0:
                self.f2b[F2B_HOSTS[n % 2]].ban("asterisk" if n % 2 else "sshd", ip)
            out.append({"kind": "CHECKIP", "text": f"CHECKIP={ip}", "key": ip})
        for n in range(16):
            out.append({"kind": "STATUS" if n % 2 else "HELP", "text": "HELP"})
        assert len(out) == COMMANDS
        self.rng.shuffle(out)
        for n, command in enumerate(out):
            command["sender"] = REQUESTERS[n % len(REQUESTERS)]
            command["msgid"] = f"<fault-{n}@example.test>"
        return out

    # ----------------------------------------------------------------- mail

    def deliver(self, count: int) -> None:
        for command in self.commands[self.delivered : self.delivered + count]:
            text = command["text"]
            if command["kind"] == "STATUS":  # about an earlier request when there is one
                known = [j.id for state in ("done", "pending") for j in self.jobs.list(state)]
                text = f"STATUS {self.rng.choice(known) if known else '20250101_000000_000000_aa'}"
                command["text"] = text
            subject = f"[{self.tokens[command['sender']]}] {text}"
            raw = command_message(subject, command["sender"], command["msgid"]).as_bytes()
            self.dovecot.deliver(USER, raw)
        self.delivered = min(COMMANDS, self.delivered + count)

    def replies(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(m[2].as_bytes(), policy=default_policy) for m in self.sink.messages]

    def expected_replies(self) -> int:
        return sum(2 if c["kind"] in ("MACCHANGE", "CHECKIP") else 1 for c in self.commands)

    # ----------------------------------------------------- what is going on

    def ledger(self) -> int:
        seen = self.state / "seen"
        return sum(1 for p in seen.iterdir() if "." not in p.name) if seen.is_dir() else 0

    def module_runs(self) -> list[tuple[str, str, str]]:
        """(host, module, key) of every module run on a host, in order per host."""
        runs = []
        for host, path in self.marks.items():
            if path.exists():
                for line in path.read_text().splitlines():
                    module, key, _ns = line.split()
                    runs.append((host, module.rsplit(".", 1)[-1], key))  # athome.voip.X -> X
        return runs

    def idle(self) -> bool:
        """Every delivered message decided and nothing left to run or send."""
        seen = self.state / "seen"
        decided = sum(1 for p in seen.glob("*.decided")) if seen.is_dir() else 0
        busy = sum(q.count(s) for q in (self.jobs, self.outbox) for s in ("pending", "processing"))
        return decided >= self.delivered and busy == 0

    def finished(self) -> bool:
        return (
            self.delivered == COMMANDS and len(self.sink.messages) >= self.expected_replies() and self.idle()
        )

    def describe(self) -> str:
        """Where things stand, for a failure message."""
        states = {
            f"{q.root.name}/{state}": [j.id for j in q.list(state)]
            for q in (self.jobs, self.outbox)
            for state in ("pending", "processing", "waiting", "failed")
        }
        got = collections.Counter(m[2]["In-Reply-To"] for m in self.sink.messages)
        short = [c["text"] for c in self.commands if got[c["msgid"]] < (2 if c.get("key") else 1)]
        return (
            f"delivered {self.delivered}, replies {len(self.sink.messages)}/{self.expected_replies()}, "
            f"unanswered {short}, {states}"
        )

    def unsent_but_accepted(self) -> list[str]:
        """Replies still in outbox/processing that the sink already accepted: a kill now
        would send them twice (the window SMTP leaves; see the module's docstring)."""
        accepted = {m[2]["Message-ID"] for m in list(self.sink.messages)}
        out = []
        processing = self.state / "outbox" / "processing"
        for path in processing.glob("*.json") if processing.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError):
                raw = base64.b64decode(json.loads(path.read_bytes())["payload"]["raw"])
                msgid = email.message_from_bytes(raw)["Message-ID"]
                if msgid in accepted:
                    out.append(path.name)
        return out


class Service:
    """`athome run` as systemd starts it, its output appended to one log; killed like
    systemd kills a unit (SIGKILL to the process and everything below it)."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.log_path = batch.workdir / "service.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        env.pop("ATHOME_CRASH_AT", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.cli", "--config", str(self.batch.cfg), "run"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def kill(self) -> None:
        gate = self.batch.gate
        gate.hold()  # nothing new is accepted from here on
        servers.wait_for(
            lambda: len(self.batch.sink.messages) >= gate.passed and not self.batch.unsent_but_accepted(),
            "the replies the sink accepted to be noted as sent",
            timeout=60,
        )
        # Freeze the tree first (a stopped process forks no more), then kill all of it.
        self.proc.send_signal(signal.SIGSTOP)
        below: list[int] = []
        while True:
            found = descendants(self.proc.pid)
            if set(found) <= set(below):
                break
            below = sorted(set(below) | set(found))
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        self.proc.kill()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        servers.wait_for(lambda: all(gone(p) for p in below), "the killed service's processes to go")
        gate.release()  # the held messages are refused: their sender is gone
        gate.triggered.clear()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def batch(workdir, sshd, dovecot, fail2ban_factory):
    seed = int(os.environ.get("ATHOME_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"\nfault batch seed {seed} (ATHOME_FAULT_SEED={seed} replays it)")
    subprocess.run(
        ["doveadm", "-c", str(dovecot.conf), "expunge", "-u", USER, "mailbox", "INBOX", "all"], check=True
    )
    b = Batch(workdir, sshd, dovecot, fail2ban_factory, seed)
    yield b
    b.sink.stop()


def wait_for_trigger(batch: Batch, service: Service, kind: str, waves: list[int]) -> bool:
    """Arm a kill of `kind` and wait until its moment comes; new mail is delivered when
    everything delivered is done (a kill needs work under way). False when no work is
    left to kill the service in."""
    rng = batch.rng
    if kind == "intake":
        wave = waves.pop(0)
        before = batch.ledger()
        batch.deliver(wave)
        target = before + rng.randint(1, wave - 1)
        moment = lambda: batch.ledger() >= target  # noqa: E731
    elif kind == "playbook":
        target = len(batch.module_runs()) + rng.randint(1, 3)
        moment = lambda: len(batch.module_runs()) >= target  # noqa: E731
    else:
        batch.gate.trigger_at = batch.gate.arrived + rng.randint(1, 4)
        moment = batch.gate.triggered.is_set
    exhausted = []

    def come() -> bool:
        if moment():
            return True
        if batch.idle():
            if not waves:
                exhausted.append(True)
                return True
            batch.deliver(waves.pop(0))
        return False

    servers.wait_for(come, f"a {kind} moment", timeout=300, proc=service.proc)
    if exhausted:
        batch.gate.trigger_at = None
        return False
    return True


def test_sigkill_at_random_moments_during_50_commands_loses_nothing_and_repeats_nothing(batch):
    kinds = [kind for kind, n in KILLS.items() for _ in range(n)]
    batch.rng.shuffle(kinds)
    waves_count = KILLS["intake"] + 1
    waves = [COMMANDS // waves_count + (n < COMMANDS % waves_count) for n in range(waves_count)]
    service = Service(batch)
    kills: collections.Counter = collections.Counter()
    started = time.monotonic()
    try:
        service.start()
        batch.deliver(waves.pop(0))
        for kind in kinds:
            if kind == "intake" and not waves:
                kind = "playbook"
            if not wait_for_trigger(batch, service, kind, waves):
                break
            service.kill()
            kills[kind] += 1
            service.start()
        while waves:
            batch.deliver(waves.pop(0))
        try:
            # A safety net for a loaded machine (about a minute on an idle 2-core one).
            servers.wait_for(batch.finished, "every command answered", timeout=900, proc=service.proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {batch.describe()}\n{service.output()[-8000:]}") from None
    finally:
        service.stop()
    elapsed = time.monotonic() - started
    output = service.output()

    # Nothing left behind, nothing set aside.
    for queue in (batch.jobs, batch.outbox):
        for state in ("pending", "processing", "waiting", "failed"):
            assert queue.count(state) == 0, (
                f"{queue.root.name}/{state}: {queue.list(state)}\n{output[-5000:]}"
            )
        assert queue.quarantined() == []

    # Each command: one acknowledgement and one result (playbook commands), or its one answer.
    replies = batch.replies()
    by_command = collections.defaultdict(list)
    for msg in replies:
        by_command[msg["In-Reply-To"]].append(msg)
    assert set(by_command) == {c["msgid"] for c in batch.commands}, "every reply answers one of the commands"
    done = {job.payload["message_id"]: job for job in batch.jobs.list("done")}
    runs = collections.Counter(batch.module_runs())
    reruns, interrupted_jobs, job_runs = 0, 0, 0
    for command in batch.commands:
        got = by_command[command["msgid"]]
        subjects = [status_of(m) for m in got]
        if command["kind"] not in ("MACCHANGE", "CHECKIP"):
            assert len(got) == 1, (command["text"], subjects)
            continue
        job = done[command["msgid"]]
        acks = [s for s in subjects if "recebido" in s]
        assert len(acks) == 1 and len(got) == 2, (command["text"], subjects)
        assert job.id in acks[0]
        assert job.result["outcome"] == "success", (command["text"], job.result)
        result_reply = next(m for m in got if "recebido" not in status_of(m))
        assert job.id in result_reply.get_body(("plain",)).get_content()
        # Its playbook ran once, or again after a kill in the middle of it (at most once per claim).
        claims = sum(1 for h in job.history if h["event"] == "claimed")
        interrupted = any(h["event"] == "recovered after interruption" for h in job.history)
        interrupted_jobs += interrupted
        if command["kind"] == "CHECKIP":
            counts = [runs[(host, "fail2ban_ignoreip", command["key"])] for host in F2B_HOSTS]
        else:
            counts = [runs[(command["host"], "endpoint_mac", command["key"])]]
        assert all(1 <= n <= claims for n in counts), (command["text"], counts, job.history)
        if not interrupted:
            assert counts == [1] * len(counts) and claims == 1, (command["text"], counts, job.history)
        reruns += max(counts) - 1
        job_runs += max(counts)

    # The end state on the hosts is the one every command asked for, once.
    for command in batch.commands:
        if command["kind"] == "CHECKIP":
            for server in batch.f2b.values():
                assert server.banned_jails(command["key"]) == []
                assert all(command["key"] in server.ignore_list(jail) for jail in server.JAILS)
    for host, mac_host in batch.macs.items():
        expected_def, expected_sip = ORIG_DEF, ORIG_SIP
        for command in batch.commands:
            if command["kind"] == "MACCHANGE" and command["host"] == host:
                current, new = command["mac"]
                ext = command["key"].encode()
                expected_def = expected_def.replace(
                    b"'%s': {'serialnumber': '%s'" % (ext, current.encode()),
                    b"'%s': {'serialnumber': '%s'" % (ext, new.encode()),
                )
                expected_sip = expected_sip.replace(
                    b"%s;MAC:%s;" % (ext, current.encode()), b"%s;MAC:%s;" % (ext, new.encode())
                )
        assert mac_host.files() == (expected_def, expected_sip), host

    # The audit chain survived every kill.
    verify = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(batch.cfg), "audit", "verify"],
        capture_output=True,
        text=True,
        env=dict(os.environ, ATHOME_TEST_IMAP_PW=IMAP_PASSWORD),
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    playbook_commands = sum(1 for c in batch.commands if c["kind"] in ("MACCHANGE", "CHECKIP"))
    print(
        f"fault batch: {COMMANDS} commands ({playbook_commands} with a playbook), "
        f"{sum(kills.values())} kills ({dict(kills)}), {service.starts} starts, "
        f"{job_runs} playbook runs ({reruns} re-runs after a kill mid-playbook) "
        f"({interrupted_jobs} jobs interrupted), {len(replies)} replies "
        f"({batch.gate.arrived - len(replies)} refused while a kill was under way), {elapsed:.0f} s"
    )
    assert sum(kills.values()) >= 8 and all(kills[kind] for kind in KILLS), kills


def test_a_reply_a_killed_service_was_sending_goes_out_at_the_next_start(tmp_path):
    """The regression the batch found: `athome run` holds both locks, so nobody else can be
    sending; a reply a killed service left in outbox/processing is sent after the restart,
    not OUTBOX_STALE_AFTER (15 minutes) later. A process holding the work lock alone still
    leaves a young one alone (the intake process may be sending it)."""
    from dispatcher import config
    from dispatcher.service import Dispatcher

    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.add("svc", senders=[REQUESTERS[0]])
    cfg = config.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "inventory": str(REPO / "inventory" / "demo"),
            "mail": {
                "transport": "maildir",
                "from_address": USER,
                "admin_addresses": [ADMIN],
                "maildir": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")},
            },
            "auth": {"senders": [REQUESTERS[0]], "tokens_file": str(tokens.path), **AUTH},
        },
        base=tmp_path,
    )
    killed = Dispatcher(cfg)
    killed._inbox_factory().box.add(command_message(f"[{token}] HELP", REQUESTERS[0], "<help@x>"))
    killed.flush_outbox = lambda stop=None: 0  # queued, not sent: then killed as it claims it
    killed.poll_once()
    item = killed.outbox.claim()
    assert item is not None and killed.outbox.count("processing") == 1

    worker_only = Dispatcher(cfg)
    worker_only.lock("work")
    worker_only.recover()
    assert worker_only.outbox.count("processing") == 1, "an intake process may be sending it"
    for fd in worker_only._locks:  # that process ends
        os.close(fd)

    restarted = Dispatcher(cfg)  # `athome run`: both locks, then the recovery
    restarted.lock("intake")
    restarted.lock("work")
    assert any(item.id in action for action in restarted.recover())
    assert restarted.flush_outbox() == 1
    assert [r.id for r in restarted.outbox.list("done")] == [item.id]
    [sent] = list((tmp_path / "out" / "new").iterdir())
    assert "Comandos" in status_of(email.message_from_bytes(sent.read_bytes(), policy=default_policy))
