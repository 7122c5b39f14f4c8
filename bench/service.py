"""`athome run` for the long haul: confirmation delay under load, resident memory.

    python -m bench.service [--load-jobs 20] [--samples 5] [--emails 1000]

Everything real on loopback: Dovecot (IMAP IDLE), an SMTP sink, one sshd whose
inventory aliases are four MAC servers with their own endpoint files.

- latency under load: from a command mail's delivery (dovecot-lda) to its
  acknowledgement received by SMTP, while 20 queued MACCHANGE jobs run
  (`worker.concurrency` 2); baseline, same service in the same run: the same with
  the queue idle.
- memory: VmRSS of the `athome run` process (from /proc) right after its start
  (baseline), after 1,000 processed emails and after each 1,000 more (growth
  per 1,000; goal ~0; `--steps` thousands in all, 3 by default). The emails
  are the cheap kinds a mailbox gets most: HELP and STATUS answered, bad
  tokens refused (alerts capped), mail the receiving server did not
  authenticate (one alert, capped) and senders not on the whitelist (ignored);
  put into the mailbox by IMAP APPEND in blocks of 100, the service left to
  drain each block.
"""

from __future__ import annotations

import argparse
import imaplib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.workers import HOSTS, MACS, mac_inventory
from dispatcher.auth import TokenStore
from dispatcher.jobqueue import DirQueue
from tests import servers
from tests.messages import AUTH, command_message

USER, PASSWORD = "svc@example.test", "bench-imap-pw"
REQUESTER = "bob@example.test"


class Service:
    """`athome run` on a fresh state dir, over its own Dovecot and SMTP sink."""

    def __init__(self, base: Path, sshd: servers.SSHD | None):
        self.base = base
        self.dovecot = servers.Dovecot(base / "dovecot", users={USER: PASSWORD}).start()
        self.sink = servers.SMTPSink().start()
        store = TokenStore(base / "tokens.json")
        _, self.token = store.add("bench", senders=[REQUESTER])
        if sshd is not None:
            inventory = mac_inventory(sshd, base).parent
        else:
            inventory = Path(__file__).resolve().parent.parent / "inventory" / "demo"
        self.state = base / "state"
        self.cfg = base / "athome.yml"
        self.cfg.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(self.state),
                    "inventory": str(inventory),
                    "mail": {
                        "transport": "imap",
                        "from_address": USER,
                        "admin_addresses": ["admin@example.test"],
                        "imap": servers.imap_settings(self.dovecot, USER, "BENCH_IMAP_PW"),
                        "smtp": {
                            "host": "127.0.0.1",
                            "port": self.sink.port,
                            "security": "plain",
                            # thousands of replies in minutes: the outgoing limit is not what is measured
                            "max_recipients_per_hour": 0,
                            "max_recipients_per_day": 0,
                        },
                    },
                    "auth": {
                        "senders": [REQUESTER, "eve@example.test"],
                        "tokens_file": str(store.path),
                        **AUTH,
                    },
                    "worker": {"poll_interval": 30, "concurrency": 2, "retry_backoff": [0]},
                }
            )
        )
        self.jobs = DirQueue(self.state / "queue")
        self.proc: subprocess.Popen | None = None
        self.sent = 0

    def start(self) -> None:
        env = dict(os.environ, BENCH_IMAP_PW=PASSWORD)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "--config", str(self.cfg), "run"],
            env=env,
            stdout=open(os.environ.get("BENCH_SERVICE_LOG", os.devnull), "a"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        self.wait(self._read_mailbox, "the first intake pass")  # then it waits in IDLE

    def _read_mailbox(self) -> bool:
        health = self.state / "health.json"
        return health.exists() and "intake_ok" in health.read_text(errors="replace")

    def wait(self, condition, what: str, timeout: float = 600, poll: float = 0.005) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise RuntimeError(f"athome run exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            time.sleep(poll)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def deliver(self, subject: str) -> str:
        """Deliver a command as the MTA does (dovecot-lda); its Message-ID."""
        self.sent += 1
        msgid = f"<lat-{self.sent}@x>"
        self.dovecot.deliver(USER, command_message(f"[{self.token}] {subject}", REQUESTER, msgid).as_bytes())
        return msgid

    def answered(self, msgid: str) -> bool:
        return any(m["In-Reply-To"] == msgid for _f, _r, m in list(self.sink.messages))

    def ack_delay(self, subject: str) -> float:
        """Seconds from delivering a command to its acknowledgement received by SMTP."""
        started = time.perf_counter()
        msgid = self.deliver(subject)
        self.wait(lambda: self.answered(msgid), "acknowledgement")
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)
        self.sink.stop()
        self.dovecot.stop()


def macchange(n: int) -> str:
    """The n-th of a sequence of MACCHANGE commands round robin over HOSTS, each undoing
    the one before it on its host (so every one of them changes something)."""
    host, turn = HOSTS[n % len(HOSTS)], n // len(HOSTS)
    return f"MACCHANGE=3010 MACATUAL={MACS[turn % 2]} MACFUTURO={MACS[(turn + 1) % 2]} SERVER={host}"


def bench_latency(base: Path, load_jobs: int, samples: int) -> None:
    keys = servers.SSHKeys(base / "ssh")
    sshd = servers.SSHD(keys).start()
    service = Service(base / "lat", sshd)
    try:
        service.start()
        # Under load: load_jobs commands queued (as mail, like every other command) and
        # running on 2 workers while the measured ones arrive.
        load = [service.deliver(macchange(n)) for n in range(load_jobs)]
        service.wait(lambda: all(service.answered(m) for m in load), "the load queued", poll=0.05)
        loaded, in_queue = [], []
        for n in range(load_jobs, load_jobs + samples):
            in_queue.append(service.jobs.count("pending") + service.jobs.count("processing"))
            loaded.append(service.ack_delay(macchange(n)))
        total = load_jobs + samples
        service.wait(lambda: service.jobs.count("done") + service.jobs.count("failed") == total, "the load")
        idle = []
        for n in range(total, total + samples):
            idle.append(service.ack_delay(macchange(n)))
            service.wait(
                lambda n=n: service.jobs.count("done") + service.jobs.count("failed") == n + 1, "job"
            )
        print(
            f"confirmation delay (delivery -> acknowledgement received by SMTP), {samples} commands "
            f"while {min(in_queue)}-{max(in_queue)} jobs waited or ran (2 workers): "
            f"{statistics.median(loaded) * 1000:6.0f} ms median, max {max(loaded) * 1000:.0f} ms"
        )
        print(
            f"  baseline, same service, queue idle:     {statistics.median(idle) * 1000:6.0f} ms median, "
            f"max {max(idle) * 1000:.0f} ms"
        )
        failed = service.jobs.count("failed")
        if failed:
            print(f"  ({failed} job(s) failed: see BENCH_SERVICE_LOG)")
    finally:
        service.stop()
        sshd.stop()


def cheap_email(n: int, token: str) -> bytes:
    """One of the cheap kinds of mail, in a fixed rotation (2 in 5 answered)."""
    kind = n % 5
    if kind == 0:
        msg = command_message(f"[{token}] HELP", REQUESTER, f"<m{n}@x>")
    elif kind == 1:
        msg = command_message(f"[{token}] STATUS 20250101_000000_000000_aa", REQUESTER, f"<m{n}@x>")
    elif kind == 2:  # a wrong token from a whitelisted sender (counted, alert capped, then locked out)
        msg = command_message(f"[{n:016X}] HELP", "eve@example.test", f"<m{n}@x>")
    elif kind == 3:  # not authenticated by the receiving server
        msg = command_message(f"[{token}] HELP", REQUESTER, f"<m{n}@x>", results=None)
    else:  # not on the whitelist: ignored
        msg = command_message(f"[{token}] HELP", f"x{n}@example.test", f"<m{n}@x>")
    return msg.as_bytes()


def bench_memory(base: Path, emails: int, steps: int) -> None:
    service = Service(base / "mem", None)
    imap = None
    try:
        service.start()
        start_rss = service.rss_kib()
        imap = imaplib.IMAP4("127.0.0.1", service.dovecot.imap_port)
        imap.login(USER, PASSWORD)

        def unseen() -> int:
            imap.select("INBOX")
            return len(imap.search(None, "UNSEEN")[1][0].split())

        marks, done, started = [], 0, time.perf_counter()
        for target in range(emails, (steps + 1) * emails, emails):
            while done < target:
                block = min(100, target - done)
                for n in range(done, done + block):
                    imap.append("INBOX", None, None, cheap_email(n, service.token))
                done += block
                service.wait(lambda: unseen() == 0, "the block handled", poll=0.1)
            marks.append(service.rss_kib())
        elapsed = time.perf_counter() - started
        growth = ", ".join(f"{(b - a) / 1024:+.1f}" for a, b in zip(marks, marks[1:], strict=False))
        rss = marks[0] / 1024
        first = f"athome run resident memory (VmRSS): {rss:6.1f} MB after {emails:,} processed emails"
        if steps > 1:
            first += (
                f" (goal ≤ 120 MB), {marks[-1] / 1024:.1f} MB after {steps * emails:,}: "
                f"{growth} MB per {emails:,} more (goal ~0)"
            )
        else:
            first += " (goal ≤ 120 MB; --steps 2 or more measures the growth)"
        print(first)
        print(f"  baseline, right after start:  {start_rss / 1024:6.1f} MB")
        print(
            f"  ({steps * emails:,} emails in {elapsed:.0f} s, {elapsed / (steps * emails) * 1000:.0f} ms "
            f"each with delivery; {len(service.sink.messages)} replies and alerts sent)"
        )
    finally:
        if imap is not None:
            imap.logout()
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-jobs", type=int, default=20, help="jobs running during the measure")
    parser.add_argument("--samples", type=int, default=5, help="measured commands per case")
    parser.add_argument("--emails", type=int, default=1000, help="emails per memory step")
    parser.add_argument("--steps", type=int, default=3, help="memory steps of --emails each")
    parser.add_argument("--only", choices=("latency", "memory"), help="one of the two")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # figures only (a new server key is announced, etc.)
    base = servers.short_tmpdir("bsv-")
    try:
        if args.only in (None, "latency"):
            bench_latency(base, args.load_jobs, args.samples)
        if args.only in (None, "memory"):
            bench_memory(base, args.emails, args.steps)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
