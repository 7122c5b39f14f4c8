"""The dispatcher's two loops: intake (mail -> durable job + confirmation) and work
(job -> playbook -> result reply), plus the outgoing mail queue they share.

Intake order for one message, each step idempotent so a crash anywhere is
repaired by the next pass (the message stays unseen until the last step):

  1. seen/<key>        remember the message (key = Message-ID digest) and its request id
  2. queue/pending/ID  the job (or, for a rejection/HELP/STATUS, no job)
  3. outbox/pending/   the confirmation or the rejection reply (id derived from 1)
  4. mailbox           flag the message \\Seen (and move it, if configured)

Work order for one job: claim (rename into processing/), run the playbook,
save the result in the job record (checkpoint), queue the result reply, move
the job to done/ or failed/. A job whose result was saved is completed with
that result without running its playbook again, whatever interrupted it.

Each job and each reply is isolated: a record the worker cannot handle (a
payload it does not understand, a reply that cannot be rendered) is moved to
quarantine/ with an ERROR naming its id, and the others go on. An OSError (a
full disk) is the system's, not the record's: the pass stops, the record stays
where it can be picked up again, and the recovery at the start of the next
pass puts back what the failure left in processing/.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from dispatcher import commands, decide, gitinventory, grammar, logs, mailauth, runner
from dispatcher.audit import AuditLog
from dispatcher.auth import (
    Identity,
    SenderWhitelist,
    TokenStore,
    domain_of,
    sender_address,
)
from dispatcher.commands import Command
from dispatcher.config import Config
from dispatcher.errors import AthomeError, AuthError, PermanentTransportError, TransportError
from dispatcher.health import Health
from dispatcher.hostlocks import HostLocks
from dispatcher.inventory import InventoryWatcher
from dispatcher.jobqueue import DirQueue, Job, _crash_point, disk_full, new_request_id
from dispatcher.mail import (
    DAY,
    FETCH_LIMIT,
    HOUR,
    SESSION_MAX,
    IMAPInbox,
    Incoming,
    MaildirInbox,
    MaildirSender,
    RecipientsDeferred,
    SendLedger,
    SMTPSender,
    build_message,
)
from dispatcher.replies import Replies
from dispatcher.sdnotify import Notifier, Progress, Watchdog
from dispatcher.throttle import Failure, Throttle

log = logging.getLogger(__name__)

OUTBOX_MAX_ATTEMPTS = 10_000  # an SMTP outage delays replies; it never drops them
OUTBOX_STALE_AFTER = 900  # seconds a reply may sit in outbox/processing before it is re-sent
MAX_INTAKE_FAILURES = 5  # passes that fail on one message before it is set aside
MAX_TOKEN_ALERTS_PER_HOUR = 5  # "Token Invalido" mails per sender; more are only logged
MAX_REFUSALS_PER_HOUR = 5  # other refusals (unauthenticated, stale, locked out) per sender
# Refusals of unauthenticated mail, all claimed senders together: forging From costs nothing,
# so without it forgeries in the names of the whole whitelist could spend the outgoing limit.
MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR = 20
LAST_RANK = 3  # their place in the outbox when the outgoing limit binds: after everything else
PRIORITY_BUDGET = 0.5  # seconds of suspect mail handled before the pass fetches again
GENUINE_PER_SENDER = 3  # messages of one sender handled first in a pass; more wait with the suspect
PRUNE_EVERY = 3600  # seconds between retention sweeps of the work loop
# What the worker reads in a job's payload, and in a reply's: without them it is quarantined.
JOB_FIELDS = {"command": str, "params": dict, "command_text": str, "requester": str}
REPLY_FIELDS = {"raw": str, "rcpt": list}
ADMIN_KINDS = ("security_alert", "token_invalid", "admin_notice")  # mail to the admins, not a requester


def payload_problem(payload: dict[str, Any], fields: dict[str, type]) -> str:
    """Why the worker cannot handle this payload ('' when it can)."""
    wrong = [
        f"{name} ({'missing' if name not in payload else type(payload[name]).__name__})"
        for name, kind in fields.items()
        if not isinstance(payload.get(name), kind)
    ]
    return "payload field(s) missing or of the wrong type: " + ", ".join(wrong) if wrong else ""


def _decode_reply(payload: dict[str, Any]) -> tuple[bytes, str]:
    """The message of a queued reply, or why it can never be sent."""
    problem = payload_problem(payload, REPLY_FIELDS)
    if problem:
        return b"", problem
    if not payload["rcpt"] or not all(isinstance(r, str) for r in payload["rcpt"]):
        return b"", "rcpt is not a list of addresses"
    try:
        return base64.b64decode(payload["raw"], validate=True), ""
    except ValueError as exc:
        return b"", f"raw is not base64: {exc}"


def _reply_rank(job: Job) -> int:
    """The order replies go in when the outgoing mail limit binds (see `_claim_reply`):
    the notice that replies are held, then requesters', then the admins', and last the
    replies that anyone could cause (refusals of unauthenticated mail, `LAST_RANK`)."""
    if job.payload.get("kind") == "admin_notice" and job.id.startswith("outbox-held-"):
        return 0
    rank = job.payload.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool):
        return rank
    return 2 if job.payload.get("kind") in ADMIN_KINDS else 1


def _window(seconds: int) -> str:
    return {HOUR: "hour", DAY: "day"}.get(seconds, f"{seconds}s")


def _window_pt(seconds: int) -> str:
    return {HOUR: "última hora", DAY: "últimas 24 horas"}.get(seconds, f"{seconds} s")


class Dispatcher:
    def __init__(self, cfg: Config, inbox_factory=None, sender=None):
        self.cfg = cfg
        self.jobs = DirQueue(cfg.queue_dir, cfg.max_attempts)
        self.outbox = DirQueue(cfg.outbox_dir, OUTBOX_MAX_ATTEMPTS)
        cfg.seen_dir.mkdir(parents=True, exist_ok=True)
        self.inventory = InventoryWatcher(cfg.inventory)
        self.git_inventory = (
            gitinventory.GitInventory(
                cfg.inventory_git, cfg.state_dir / "inventory", on_rejected=self._inventory_rejected
            )
            if cfg.inventory_git
            else None
        )
        self.whitelist = SenderWhitelist(cfg.senders, cfg.senders_file)
        self.key = cfg.server_key()
        self.auth_store = TokenStore(cfg.tokens_file, self.key)
        self.key.get()  # fail at start, not at the first command, when the key is missing
        self.throttle = Throttle(
            cfg.throttle_dir,
            name=lambda who: self.key.digest("throttle", who)[:40],
            limit=cfg.lockout_failures,
            window=cfg.lockout_window_minutes * 60,
            cooldown=cfg.lockout_cooldown_minutes * 60,
        )
        self.replies = Replies(cfg.brand, cfg.timezone)
        self._inbox_factory = inbox_factory or self._default_inbox
        self._sender = sender or self._default_sender()
        # Outgoing mail: the limit (SMTP only) and the backoff after the server failed.
        self.mail_ledger = None
        if cfg.transport == "imap" and (cfg.smtp.max_recipients_per_hour or cfg.smtp.max_recipients_per_day):
            self.mail_ledger = SendLedger(
                cfg.state_dir / "outbox-ledger.json",
                cfg.smtp.max_recipients_per_hour,
                cfg.smtp.max_recipients_per_day,
                seed=self._sent_recently,
            )
        self._smtp_first, self._smtp_max = cfg.smtp.retry_first_seconds, cfg.smtp.retry_max_seconds
        self._smtp_retry_at = self._smtp_failing_since = self._held_since = 0.0
        self._smtp_failures = 0
        self._outbox_mutex = threading.Lock()
        self._locks: list[int] = []
        self._roles: set[str] = set()  # the state/<role>.lock files this process holds
        self._pruned_at = float("-inf")
        # The parallel workers: host locks and jobs in flight (one mutex), and one
        # housekeeping pass (recovery of replies, sending, pruning, waiting jobs) at a time.
        self.host_locks = HostLocks(
            publish=lambda locks: self.health.note(locks=locks, locks_pid=os.getpid())
        )
        self._housekeeping = threading.Lock()
        self.audit = AuditLog(cfg.audit_dir)
        self.health = Health(cfg.state_dir / "health.json")
        self.policy = decide.Policy(
            ar_required=cfg.ar_required,
            trusted_authserv_ids=tuple(cfg.trusted_authserv_ids),
            max_age=timedelta(hours=cfg.max_age_hours),
            max_future=timedelta(minutes=cfg.max_future_minutes),
            confirm=frozenset(cfg.confirm),
            local_time=self.replies.local_time,
        )
        self.progress = Progress()  # the loops' heartbeats, for systemd's watchdog (run_forever)

    # ------------------------------------------------------------- plumbing

    def _default_inbox(self):
        if self.cfg.transport == "maildir":
            return MaildirInbox(self.cfg.maildir_inbox)
        return IMAPInbox(self.cfg.imap)

    def _default_sender(self):
        if self.cfg.transport == "maildir":
            return MaildirSender(self.cfg.maildir_outbox)
        return SMTPSender(self.cfg.smtp)

    def lock(self, role: str) -> None:
        """Hold state/<role>.lock for the life of this process, or raise AthomeError.

        One process works the queue at a time ("work"), one reads the mailbox
        ("intake"): a manual `athome work --once` next to the service is refused
        instead of requeueing the service's running jobs.
        """
        path = self.cfg.state_dir / f"{role}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AthomeError(f"another athome process holds {path} ({role} is already running)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._locks.append(fd)
        self._roles.add(role)

    def recover(self) -> list[str]:
        """Settle what a crash left behind; only the holder of the work lock may."""
        # Holding both locks (`athome run`), no other process can be sending a reply: one
        # left in outbox/processing was being sent when a process died, and goes out now
        # (not OUTBOX_STALE_AFTER later: a requester would wait 15 minutes for it).
        alone = {"intake", "work"} <= self._roles
        actions = self.jobs.recover() + (self.outbox.recover() if alone else self._recover_outbox())
        # A killed run's private data dir holds its extravars and recorded environment.
        scrubbed = runner.scrub_private_dirs(self.cfg.run_dir)
        if scrubbed:
            actions.append(f"removed {scrubbed} private data dir(s) left by an interrupted playbook run")
        return actions

    def _recover_outbox(self) -> list[str]:
        # A reply being sent by another process right now is younger than this;
        # one older was claimed by a process that died. Run at start and every work pass.
        return self.outbox.recover(min_age=OUTBOX_STALE_AFTER)

    def _sent_recently(self) -> list[tuple[float, int, str]]:
        """(time, recipients, id) of the replies sent in the last day, from their outbox
        records: what the outgoing mail ledger starts from when it is missing."""
        since = time.time() - DAY
        found = []
        for entry in os.scandir(self.outbox.root / "done"):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                if not entry.name.endswith(".json") or entry.stat().st_mtime < since:
                    continue
                record = json.loads(Path(entry.path).read_bytes())
                at = max(h["at"] for h in record["history"] if h.get("event") == "done")
                if at > since:
                    found.append((float(at), len(record["payload"]["rcpt"]), record["id"]))
        return found

    def prune(self) -> dict[str, int]:
        """Drop what is older than worker.retention_days: finished jobs, sent replies, seen markers."""
        days = self.cfg.retention_days
        removed = {
            "jobs": self.jobs.prune(("done", "failed"), days),
            "replies": self.outbox.prune(("done", "failed"), days),
            "seen": 0,
            "artifacts": runner.prune_artifacts(self.cfg.artifacts_dir, self.cfg.artifacts_max_age_days),
        }
        # The ledger of seen messages outlives the freshness window, so a replayed message
        # is refused as a duplicate while it is fresh and as too old once it is pruned.
        keep = max(days * 86400, (self.cfg.max_age_hours * 3600 + self.cfg.max_future_minutes * 60) * 2)
        cutoff = time.time() - keep
        removed["throttle"] = self.throttle.prune(max(keep, 86400))
        for marker in self.cfg.seen_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if marker.stat().st_mtime < cutoff:
                    marker.unlink()
                    removed["seen"] += 1
        if any(removed.values()):
            log.info("retention: removed %s", removed)
        return removed

    # --------------------------------------------------------------- intake

    def poll_once(self) -> dict[str, int]:
        """Intake passes until every unseen message is handled; then send what is due."""
        total: dict[str, int] = {}
        with self._inbox_factory() as inbox:
            while True:
                counts = self._intake_pass(inbox)
                for k, v in counts.items():
                    total[k] = total.get(k, 0) + v
                if not counts.get("deferred"):
                    total.pop("deferred", None)  # a deferred message is fetched again: count it once
                    total["fetched"] = sum(total[k] for k in ("queued", "replied", "ignored", "failed"))
                    return total

    def intake_forever(self, stop: threading.Event) -> None:
        """Intake until `stop`: over IMAP one session at a time, waking up in IDLE as soon
        as mail arrives (fetch, then IDLE, then fetch again: IDLE alone is never trusted);
        elsewhere (Maildir) a pass every poll_interval. Errors reconnect after a pause.

        Every step beats `self.progress` (the systemd watchdog); waits are bounded to
        leave time for the next beat. A loop that dies does not retire: it is stuck."""
        beat = self.progress.beat
        while not stop.is_set():
            beat("connecting to the mailbox")
            try:
                with self._inbox_factory() as inbox:
                    opened = time.monotonic()
                    while not stop.is_set() and time.monotonic() - opened < SESSION_MAX:
                        beat("reading the mailbox")
                        if self._intake_pass(inbox).get("deferred"):
                            continue  # suspect mail left for the next pass: fetch again now
                        wait = self.progress.bounded(self.cfg.poll_interval)
                        beat("waiting for mail", busy_for=wait)
                        if hasattr(inbox, "wait"):
                            inbox.wait(wait)
                        else:
                            stop.wait(wait)
            except Exception as exc:  # a dropped connection, a server restart...
                log.error(
                    "intake: %s: %s; reconnecting in %ss", type(exc).__name__, exc, self.cfg.poll_interval
                )
                self.health.error("intake", f"{type(exc).__name__}: {exc}")
                wait = self.progress.bounded(self.cfg.poll_interval)
                until = time.monotonic() + self.cfg.poll_interval
                while not stop.is_set() and time.monotonic() < until:
                    beat("reconnecting after an error", busy_for=wait)
                    stop.wait(min(wait, until - time.monotonic()))
        self.progress.retire()

    def _intake_pass(self, inbox) -> dict[str, int]:
        """Handle the unseen messages, likely-genuine ones first: a flood of forged or
        guessed commands must not delay a colleague's confirmation. After the first
        group the replies go out; suspect mail is then handled for at most
        PRIORITY_BUDGET seconds before the next fetch looks for new genuine mail."""
        counts = {"fetched": 0, "queued": 0, "replied": 0, "ignored": 0, "failed": 0}
        messages = inbox.fetch(limit=FETCH_LIMIT)
        counts["fetched"] = len(messages)
        genuine, suspect, per_sender = [], [], collections.Counter()
        for msg in messages:
            sender = self._looks_genuine(msg)
            per_sender[sender] += 1
            ok = sender and per_sender[sender] <= GENUINE_PER_SENDER
            (genuine if ok else suspect).append(msg)
        for msg in genuine:
            self._handle(inbox, msg, counts)
        if genuine:
            self.flush_outbox()
        started = time.monotonic()
        for n, msg in enumerate(suspect):
            self._handle(inbox, msg, counts)  # at least one per pass: every pass makes progress
            if time.monotonic() - started > PRIORITY_BUDGET and n + 1 < len(suspect):
                counts["deferred"] = len(suspect) - n - 1
                break
        self.flush_outbox()
        if len(messages) >= FETCH_LIMIT:
            counts["deferred"] = counts.get("deferred", 0) + 1  # more may wait beyond the limit
        if counts["fetched"]:
            log.info("intake pass: %s", counts)
            self.host_locks.poke()  # a job may have been queued (or confirmed): wake a worker
        self.health.ok("intake")
        return counts

    def _looks_genuine(self, msg: Incoming) -> str:
        """Cheap triage (no token check): the sender when it is whitelisted, authenticated
        and not locked out, else ''."""
        try:
            if msg.duplicated:
                return ""
            sender = sender_address(msg.from_header)
            if not self.whitelist.allows(sender) or self.throttle.locked_until(sender):
                return ""
            return sender if not self.cfg.ar_required or self._sender_verdict(msg, sender).ok else ""
        except Exception:
            return ""

    @logs.scoped  # its lines carry the request id _intake finds for the message
    def _handle(self, inbox, msg: Incoming, counts: dict[str, int]) -> None:
        try:
            outcome = self._intake(msg)
        except Exception as exc:
            # Left unseen: the next pass tries again; the other messages go on.
            counts["failed"] += 1
            shared = self._shared_state_problem(exc)
            if shared:
                # Not the message's fault: never counted against it, never set aside for it.
                log.error("could not handle message uid %s: %s; it stays unseen", msg.uid, shared)
                self.health.error("intake", shared)
                return
            if self._count_failure(msg) < MAX_INTAKE_FAILURES:
                log.exception("could not handle message uid %s; it stays unseen", msg.uid)
                return
            log.exception(
                "setting message uid %s aside after %d failed passes (Message-ID %s)",
                msg.uid,
                MAX_INTAKE_FAILURES,
                msg.message_id or "none",
            )
            self._set_aside(inbox, msg, exc)
            return
        counts[outcome] += 1
        _crash_point("intake-before-ack")
        try:
            inbox.ack(msg.uid)
        except Exception:  # e.g. processed_folder missing: the seen marker prevents a rerun
            log.exception("could not flag or move message uid %s", msg.uid)

    def _shared_state_problem(self, exc: BaseException) -> str:
        """Why no message could be handled now ('' when the fault may be the message's):
        a full state disk, or a senders file, tokens file or inventory that cannot be read."""
        if disk_full(exc):
            return f"the state disk is full ({exc})"
        checks = (
            ("senders file", self.whitelist.addresses),
            ("tokens file", self.auth_store.entries),
            ("inventory", self.inventory.get),
        )
        for what, check in checks:
            try:
                check()
            except Exception as problem:
                return f"the {what} cannot be read ({type(problem).__name__}: {problem})"
        return ""

    def _set_aside(self, inbox, msg: Incoming, exc: BaseException) -> None:
        """A message that keeps failing on its own: flagged and moved out of the way
        (imap.quarantine_folder), never to processed_folder; the admins are told (capped)."""
        try:
            inbox.set_aside(msg.uid)
        except Exception:
            log.exception("could not set message uid %s aside; it stays where it is", msg.uid)
        folder = getattr(getattr(inbox, "settings", None), "quarantine_folder", "") or ""
        self.audit.record(
            "message",
            uid=msg.uid,
            subject=grammar.mask_subject(msg.subject),
            outcome="set aside",
            reason=f"{type(exc).__name__}: {grammar.mask_text(str(exc))}"[:300],
        )
        if not self._mail_allowed("set-aside", "*", MAX_REFUSALS_PER_HOUR):
            return
        self._alert_admins(
            f"aside-{self._message_key(msg)[:24]}",
            "uma mensagem foi deixada de lado",
            [
                ("Remetente (From)", " ".join(msg.from_header.split())[:200]),
                ("Assunto", grammar.mask_subject(msg.subject)),
                ("Message-ID", msg.message_id or "(nenhum)"),
                ("Erro", f"{type(exc).__name__}: {grammar.mask_text(str(exc))}"[:300]),
            ],
            f"O tratamento falhou {MAX_INTAKE_FAILURES} vezes seguidas por causa desta mensagem. Ela foi "
            + (f"movida para a pasta {folder} " if folder else "marcada (palavra-chave $AthomeSetAside) ")
            + "e não será mais tentada; nada foi executado. O log do serviço tem o erro completo.",
        )
        self.flush_outbox()

    def _mail_allowed(self, kind: str, who: str, limit: int) -> bool:
        """At most `limit` mails of `kind` about `who` per hour; more are only logged."""
        if self.throttle.allow(kind, who, limit):
            return True
        log.debug("%s mails about %s over %d/hour: not mailed", kind, who, limit)
        return False

    def _message_key(self, msg: Incoming) -> str:
        """The message's identity in the ledger: Message-ID + From address + Date (as a
        time) + the masked subject with its white space collapsed, as an HMAC under the
        server key (the subject carries a token: never a plain hash). Normalised because
        DKIM's relaxed canonicalisation lets a copy change white space and still verify:
        such a copy has the same key. Another command reusing a Message-ID has another."""
        try:
            sender = sender_address(msg.from_header)
        except AuthError:
            sender = " ".join(msg.from_header.split())
        try:
            sent = str(int(parsedate_to_datetime(msg.date).timestamp()))
        except (TypeError, ValueError, IndexError, OverflowError):
            sent = " ".join(msg.date.split())
        subject = " ".join(grammar.mask_subject(msg.subject).split())
        return self.key.digest("message", msg.message_id, sender, sent, subject)[:48]

    def _count_failure(self, msg: Incoming) -> int:
        """How many passes failed on this message (kept beside its seen marker)."""
        path = self.cfg.seen_dir / f"{self._message_key(msg)}.failures"
        try:
            n = int(path.read_text()) + 1
        except (FileNotFoundError, ValueError):
            n = 1
        path.write_text(str(n))
        return n

    def _marker(self, msg: Incoming) -> Path:
        return self.cfg.seen_dir / self._message_key(msg)

    def _context(self, msg: Incoming) -> decide.Context:
        """What `decide` needs to know about this message's world, read now: the
        whitelist, the tokens, the inventory, the From address's lock-out and, when the
        subject carries a confirmation code, the requests waiting for one."""
        try:
            claimed = sender_address(msg.from_header)
        except AuthError:
            claimed = ""
        waiting: tuple[decide.Waiting, ...] = ()
        if grammar.lenient_token(msg.subject).token is None and grammar.find_confirmation(msg.subject):
            waiting = tuple(
                decide.Waiting(
                    job.id,
                    self._code(job),
                    job.payload.get("requester", ""),
                    float(job.payload["confirm"].get("expires", 0)),
                    job.payload.get("command_text", ""),
                )
                for job in self.jobs.list("waiting")
                if (job.payload.get("confirm") or {}).get("nonce")
            )
        return decide.Context(
            now=datetime.now(timezone.utc),
            policy=self.policy,
            senders=frozenset(self.whitelist.addresses()),
            tokens=self.auth_store.entries(),
            token_lookup=self.auth_store.lookup,
            parse_context=self.inventory.get().parse_context(self.cfg.max_window_days),
            locked_until=self.throttle.locked_until(claimed) if claimed else 0.0,
            waiting=waiting,
        )

    def _intake(self, msg: Incoming) -> str:
        """Decide (pure), then, under the message's request id, carry the decision out."""
        decision = decide.decide(msg, self._context(msg))
        if decision.action is decide.Action.IGNORE:
            # No ledger entry, no reply (no backscatter to forged or unknown senders).
            quiet = msg.automated or decision.reason.startswith("a reply to our own mail")
            (log.info if quiet else log.warning)("ignored message uid %s: %s", msg.uid, decision.reason)
            self.audit.record(
                "message",
                uid=msg.uid,
                sender=" ".join(msg.from_header.split())[:200],
                subject=grammar.mask_subject(msg.subject),
                outcome="ignored",
                reason=decision.reason,
            )
            return "ignored"
        sender = decision.sender
        marker = self._marker(msg)
        decided = marker.with_name(f"{marker.name}.decided")
        try:
            noted = json.loads(marker.read_text())
            request_id, confirmed_id = noted["request_id"], noted.get("confirms")
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            request_id = confirmed_id = None
        if request_id and decided.exists():
            # The same message again (delivered twice, copied back, replayed): handled once.
            log.warning("ignored message uid %s: a copy of request %s, already handled", msg.uid, request_id)
            self._audit_message(
                msg, sender, request_id, "ignored", reason="a copy of a message already handled"
            )
            return "ignored"
        if request_id is None:
            request_id = new_request_id()
            self._write_marker(marker, request_id)
        logs.set_request_id(request_id)
        _crash_point("intake-after-marker")
        job = self.jobs.find(request_id)
        confirmed = self._confirmed_by(confirmed_id, request_id)
        if job is not None:
            # Queued before a crash: only its confirmation may be missing. The decision
            # taken now is not used: it could refuse (a Date grown stale) what was accepted.
            self._queue_ack(job, msg)
            outcome = "queued"
            audit = {"reason": "confirmed again after a crash", "command": job.payload["command_text"]}
        elif confirmed is not None:
            # A CONFIRMAR that took its job out of waiting/ before a fault: its code is spent
            # now, so deciding again would answer "not accepted" while the job runs.
            self._queue_ack(confirmed, msg, confirmed=True)
            outcome = "queued"
            audit = {"reason": "confirmation acknowledged again after a fault", "job": confirmed.id}
        else:
            outcome, audit = self._execute(msg, request_id, decision)
        self._audit_message(msg, sender, request_id, outcome, **audit)
        # Not fsync'd: if a crash loses it, the message is decided again under the same
        # request id (above), which queues and answers nothing twice.
        decided.write_text(outcome)
        return outcome

    def _audit_message(self, msg: Incoming, sender: str, request_id: str, outcome: str, **fields) -> None:
        self.audit.record(
            "message",
            key=self._message_key(msg)[:16],  # the ledger's HMAC: the same message, the same key
            uid=msg.uid,
            sender=sender,
            subject=grammar.mask_subject(msg.subject),
            request_id=request_id,
            outcome=outcome,
            **fields,
        )

    def _confirmed_by(self, job_id: str | None, request_id: str) -> Job | None:
        """The job this CONFIRMAR message (request_id) took out of waiting/, if it did."""
        if not job_id:
            return None
        job = self.jobs.find(job_id)
        if job is None or job.state == "waiting":
            return None  # noted, then the fault came before the resume: decide it again
        done = any(h.get("event") == "confirmed" and h.get("by") == request_id for h in job.history)
        return job if done else None

    def _write_marker(self, marker: Path, request_id: str, **extra: str) -> None:
        """The request id, durably: every later write is idempotent by it."""
        tmp = marker.with_name(f".{marker.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"request_id": request_id, "at": time.time(), **extra}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, marker)
        fd = os.open(marker.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sender_verdict(self, msg: Incoming, sender: str) -> mailauth.Verdict:
        return mailauth.verify_sender_cached(
            tuple(msg.auth_results[:1]), domain_of(sender), tuple(self.cfg.trusted_authserv_ids)
        )

    def _execute(self, msg: Incoming, request_id: str, d: decide.Decision) -> tuple[str, dict[str, Any]]:
        """Carry a decision out: the outcome for the ledger ('queued', 'replied' or
        'ignored') and the audit record's fields. Every write happens here."""
        A = decide.Action
        sender, masked, audit = d.sender, d.masked, d.audit()
        if d.action is A.UNAUTHENTICATED:
            return self._refuse_unauthenticated(msg, request_id, d), audit
        if d.action is A.REFUSE:
            log.warning("refused %s from %s: %s", request_id, sender, d.reason)
            return self._refuse(msg, request_id, sender, masked, **d.reply), audit
        if d.action is A.BAD_TOKEN:
            return self._refuse_token(msg, request_id, d), audit
        if d.action is A.CONFIRM:
            with self.jobs.waiting(d.job_id) as job:
                if job is not None:  # not expired or confirmed meanwhile
                    # Noted first, so this message decided again after a fault (the ack
                    # below not written, the message not flagged) is not taken for a bad code.
                    self._write_marker(self._marker(msg), request_id, confirms=job.id)
                    job.payload["phase"] = "run"
                    self.jobs.resume(job, by=request_id)
            if job is not None:
                log.info("%s confirmed by %s (message %s)", job.id, sender, request_id)
                _crash_point("confirm-after-resume")
                self._queue_ack(job, msg, confirmed=True)
                return "queued", audit
            d = decide.bad_code(d)
            audit = d.audit()
        if d.action is A.BAD_CODE:
            failure = self.throttle.failure(sender)
            log.warning(
                "refused %s from %s: confirmation code not accepted (%d in the window)",
                request_id,
                sender,
                failure.count,
            )
            return self._refuse(msg, request_id, sender, masked, **d.reply), audit
        if d.action is A.REJECT:
            log.info("rejected %s from %s: %s", request_id, sender, d.reason)
            self._queue_reply(
                f"{request_id}-reply",
                "rejected",
                to=[sender],
                msg=msg,
                thread=masked,
                subject=masked,
                command_name=d.command_name,
                request_id=request_id,
                **d.reply,
            )
            return "replied", audit
        identity, cmd = d.identity, d.command
        assert identity is not None and cmd is not None  # noqa: S101 - decide() sets both from here on
        if d.action is A.DENY:
            log.warning("denied %s %s to %s (token %s)", request_id, cmd.name, sender, identity.token_id)
            self._queue_reply(
                f"{request_id}-reply",
                "denied",
                to=[sender],
                msg=msg,
                thread=masked,
                command=cmd.text,
                command_name=cmd.name,
                request_id=request_id,
            )
            return "replied", audit
        if d.action is A.ANSWER:
            self._answer_directly(cmd, identity, msg, request_id, masked)
            return "replied", audit
        payload = {
            "command": cmd.name,
            "params": cmd.params,
            "command_text": cmd.text,
            "requester": sender,
            "token_id": identity.token_id,
            "message_id": msg.message_id,
            "references": msg.references,
            "subject": masked,  # the replies' thread (the token masked)
        }
        if d.check_first:
            payload["phase"] = "check"  # a check run first; the real one after CONFIRMAR
        job = self.jobs.put(payload, job_id=request_id)
        _crash_point("intake-after-job")
        log.info("queued %s %s for %s (token %s)", job.id, cmd.text, sender, identity.token_id)
        self._queue_ack(job, msg)
        return "queued", audit

    def _queue_ack(self, job: Job, msg: Incoming, confirmed: bool = False) -> None:
        """The confirmation of a queued job (idempotent by its id), or of its CONFIRMAR:
        that one answers the CONFIRMAR message and refers to the command's too, so it
        joins the request's conversation whatever the requester's client put in References."""
        references = msg.references
        if confirmed:
            chain = [*job.payload.get("references", "").split(), *msg.references.split()]
            references = " ".join(dict.fromkeys(chain))
        self._queue_reply(
            f"{job.id}-{'confirmed' if confirmed else 'ack'}",
            "ack",
            to=[job.payload["requester"]],
            in_reply_to=msg.message_id,
            references=references,
            thread=self._thread(job),
            request_id=job.id,
            command=job.payload["command_text"],
            command_name=job.payload["command"],
            position=max(1, self.jobs.position(job.id)),
            confirm=job.payload.get("phase") == "check",
            confirmed=confirmed,
        )

    @staticmethod
    def _thread(job: Job) -> str:
        """The masked subject of the command a job came from: every reply about it is
        `Re: <this>`, one conversation in the requester's mail client."""
        return job.payload.get("subject") or job.payload.get("command_text", "")

    # ------------------------------------------------------- confirmations

    def _code(self, job: Job) -> str:
        """A waiting job's one-time code: derived from the server key, the job and a nonce
        kept in it (so a lost reply can be sent again), never stored itself."""
        digest = bytes.fromhex(self.key.digest("confirm", job.id, job.payload["confirm"]["nonce"]))
        bits = int.from_bytes(digest[:5], "big")
        return "".join(
            grammar.CODE_ALPHABET[(bits >> (5 * i)) & 31] for i in reversed(range(grammar.CODE_CHARS))
        )

    def _ask_confirmation(self, job: Job, result: runner.PlaybookResult) -> None:
        """After a check run that would change something: wait for CONFIRMAR <code>."""
        expires = time.time() + self.cfg.confirm_minutes * 60
        job.payload["phase"] = "confirm"
        job.payload["confirm"] = {
            "nonce": secrets.token_hex(8),
            "expires": expires,
            "check": result.to_dict(),
        }
        self.jobs.wait(job, expires=expires)  # durable before the code leaves
        self._queue_confirm_request(job)
        self.audit.record(
            "confirmation-requested",
            request_id=job.id,
            sender=job.payload["requester"],
            command=job.payload["command_text"],
            command_name=job.payload["command"],
            expires=expires,
        )

    def _queue_confirm_request(self, job: Job) -> None:
        payload = job.payload
        code = self._code(job)
        self._queue_reply(
            f"{job.id}-confirm",
            "confirm",
            to=[payload["requester"]],
            in_reply_to=payload.get("message_id", ""),
            references=payload.get("references", ""),
            # The code in the subject: a plain reply to this mail confirms. (So this one
            # mail, and the answer to it, form a conversation of their own.)
            thread=f"{self._thread(job)} — {grammar.CONFIRM_WORD} {code}",
            request_id=job.id,
            command=payload["command_text"],
            command_name=payload["command"],
            code=code,
            expires=self.replies.local_time(payload["confirm"]["expires"]),
            result=payload["confirm"]["check"],
        )

    def _sweep_waiting(self) -> None:
        """Waiting jobs: past their time they fail with a reply; one whose confirmation
        request was lost in a crash gets it again."""
        now = time.time()
        for listed in self.jobs.list("waiting"):
            confirm = listed.payload.get("confirm") or {}
            if confirm.get("expires", 0) > now:
                if self.outbox.find(f"{listed.id}-confirm") is None:
                    self._queue_confirm_request(listed)
                continue
            with self.jobs.waiting(listed.id) as job:
                if job is None:
                    continue  # confirmed (or expired by another process) since the listing
                job.result = {
                    "outcome": "failed",
                    "playbook": {
                        "status": "failed",
                        "hosts": {},
                        "errors": ["a confirmação não chegou a tempo: nada foi alterado"],
                    },
                }
                self.audit.record(
                    "confirmation-expired", request_id=job.id, sender=job.payload.get("requester")
                )
                self._settle(job)

    # ------------------------------------------------------------ refusals

    def _refuse(
        self,
        msg: Incoming,
        request_id: str,
        sender: str,
        masked: str,
        headline: str,
        problem: str,
        advice: str,
        cap: str = "refusal",
        rank: int | None = None,
    ) -> str:
        """A refusal to the requester alone, capped per sender (a flood gets no flood back).
        Forgeries have their own cap, so they cannot silence the real sender's refusals."""
        if not self._mail_allowed(cap, sender, MAX_REFUSALS_PER_HOUR):
            return "ignored"
        self._queue_reply(
            f"{request_id}-reply",
            "refused",
            to=[sender],
            msg=msg,
            thread=masked,
            rank=rank,
            subject=masked,
            headline=headline,
            problem=problem,
            advice=advice,
            request_id=request_id,
        )
        return "replied"

    def _inventory_rejected(self, sha: str, described: str, problems: list[str]) -> None:
        """A pushed inventory commit failed the checks: one mail per commit (its id)."""
        in_force = self.git_inventory.revision() if self.git_inventory else ""
        self._alert_admins(
            f"inventory-{sha[:20]}",
            f"revisão do inventário recusada: {sha[:12]}",
            [
                ("Commit", described),
                ("Em uso", in_force[:12] or "nenhuma (o serviço ainda não tem inventário)"),
                *(("Problema", p[:300]) for p in problems[:10]),
            ],
            "Esta revisão não será usada. Os comandos continuam com a revisão em uso. Corrija o "
            "inventário e faça um novo push: a próxima revisão que passar nas verificações "
            "(as mesmas de athome check) entra em uso sozinha.",
        )

    def _alert_admins(self, reply_id: str, headline: str, rows: list[tuple[str, str]], advice: str) -> None:
        self._queue_reply(
            reply_id,
            "security_alert",
            to=self.cfg.admin_addresses,
            headline=headline,
            rows=rows,
            advice=advice,
        )

    def _refuse_unauthenticated(self, msg: Incoming, request_id: str, d: decide.Decision) -> str:
        """A whitelisted From that the receiving server did not authenticate: forged, or sent
        through a path that breaks DKIM. Nothing runs; the admins get one alert and the
        claimed sender a reply (both capped per sender)."""
        sender, masked = d.sender, d.masked
        log.warning("refused %s claiming to be %s: not authenticated (%s)", request_id, sender, d.verdict)
        if self._mail_allowed("unauthenticated-alert", sender, 1):
            self._alert_admins(
                f"{request_id}-alert",
                f"mensagem não autenticada em nome de {sender}",
                [
                    ("Remetente (From)", sender),
                    ("Assunto", masked),
                    ("Message-ID", msg.message_id or "(nenhum)"),
                    ("Verificação", d.verdict),
                ],
                "O servidor de e-mail não confirmou (DMARC/DKIM) que a mensagem veio do domínio do "
                "remetente. Se foi mesmo enviada por ele, veja no README o que fazer; se não, alguém "
                "está forjando o endereço. Alertas iguais para este remetente ficam suspensos por 1 hora.",
            )
        if not self._mail_allowed("refusal-unauthenticated-all", "*", MAX_UNAUTHENTICATED_REFUSALS_PER_HOUR):
            return "ignored"
        return self._refuse(
            msg,
            request_id,
            sender,
            masked,
            "Comando recusado: mensagem não autenticada",
            "não foi possível confirmar que a mensagem foi enviada por este endereço "
            "(o servidor de e-mail não a autenticou por DKIM/DMARC)",
            "Se foi você quem enviou, mande o comando direto da sua conta de e-mail corporativa, sem "
            "encaminhar nem usar outro serviço de envio, e avise os administradores se o erro continuar. "
            "Se não foi você, avise os administradores: alguém está usando o seu endereço.",
            cap="refusal-unauthenticated",
            rank=LAST_RANK,
        )

    def _refuse_token(self, msg: Incoming, request_id: str, d: decide.Decision) -> str:
        """A bad token from an authenticated, whitelisted sender: count it (lock-out), tell
        the admins with the requester in copy (the legacy "Token Invalido"), capped."""
        sender, masked, exc = d.sender, d.masked, d.token_error
        assert exc is not None  # noqa: S101 - a BAD_TOKEN decision carries its error
        code = exc.detail
        if code == "missing":
            # Ordinary mail without a token is no guess: it must not let anyone who can
            # re-send a colleague's signed mail lock that colleague out.
            failure = Failure(0, 0.0, False, self.throttle.total())
        else:
            failure = self.throttle.failure(sender)
        log.warning(
            "rejected %s from %s: token %s%s (%d in the window; %d from all senders)",
            request_id,
            sender,
            code,
            f" ({exc.token_id})" if exc.token_id else "",
            failure.count,
            failure.total,
        )
        if failure.started_lockout:
            until = self.replies.local_time(failure.locked_until)
            self._alert_admins(
                f"{request_id}-lockout",
                f"remetente {sender} bloqueado por tokens inválidos",
                [
                    ("Remetente", sender),
                    (
                        "Tentativas",
                        f"{self.cfg.lockout_failures} em {self.cfg.lockout_window_minutes:g} minutos",
                    ),
                    ("Bloqueado até", until),
                    ("Último assunto", masked),
                ],
                "Durante o bloqueio, os comandos deste remetente são recusados sem verificar o token. "
                "Para desbloquear antes: athome token unlock " + sender,
            )
        if code == "not-bound" and self._mail_allowed("token-of-another", sender, 1):
            # A real token from the wrong address: leaked, shared or stolen. The admins
            # learn whose it is; the requester (in copy of the usual alert) never does.
            self._alert_admins(
                f"{request_id}-misuse",
                f"token de outra pessoa usado por {sender}",
                [("Remetente", sender), ("Token usado", exc.token_id), ("Assunto", masked)],
                "O token existe, mas não está vinculado a este remetente: foi compartilhado, vazou ou "
                f"foi roubado. Troque-o (athome token rotate {exc.token_id}) e converse com o dono.",
            )
        if failure.total >= self.cfg.flood_alert:
            if self._mail_allowed("flood-alert", "*", 1):
                self._alert_admins(
                    f"{request_id}-flood",
                    "muitas tentativas com token inválido",
                    [
                        ("Tentativas", f"{failure.total} em {self.cfg.lockout_window_minutes:g} minutos"),
                        ("Último remetente", sender),
                    ],
                    "Os avisos de token inválido estão suspensos por 1 hora; "
                    "o log do serviço registra cada tentativa.",
                )
            return "ignored"
        if not self._mail_allowed("token-alert", sender, MAX_TOKEN_ALERTS_PER_HOUR):
            return "ignored"
        self._queue_reply(
            f"{request_id}-reply",
            "token_invalid",
            to=self.cfg.admin_addresses,
            cc=[sender],
            msg=msg,
            thread="",  # the legacy subject, "Erro - Token Invalido": admins filter on it
            sender=sender,
            subject=masked,
            problem=d.reply["problem"],
            lockout_failures=self.cfg.lockout_failures,
            lockout_window=f"{self.cfg.lockout_window_minutes:g}",
            lockout_cooldown=f"{self.cfg.lockout_cooldown_minutes:g}",
        )
        return "replied"

    def _answer_directly(
        self, cmd: Command, identity: Identity, msg: Incoming, request_id: str, masked: str
    ) -> None:
        """A command without a playbook: its spec answers (HELP, STATUS, WHITELIST)."""
        sender = identity.sender
        ctx = commands.AnswerContext(
            sender=sender,
            admin=identity.admin,
            request_id=request_id,
            specs=list(commands.COMMANDS.values()),
            jobs=self.jobs,
            whitelist=self.whitelist,
            store=self.auth_store,
            audit=self.audit,
        )
        answer = commands.spec_for(cmd.name).answer(cmd, ctx)
        self._queue_reply(
            f"{request_id}-reply",
            answer.template,
            to=[sender],
            msg=msg,
            thread=masked,
            request_id=request_id,
            **answer.values,
        )

    # -------------------------------------------------------------- replies

    def _queue_reply(
        self,
        reply_id: str,
        kind: str,
        *,
        to: list[str],
        msg: Incoming | None = None,
        cc: list[str] | None = None,
        in_reply_to: str = "",
        references: str = "",
        thread: str | None = None,
        rank: int | None = None,
        **values: Any,
    ) -> None:
        """Render and queue one reply. `thread`: the masked subject of the request it is
        about (its subject becomes `Re: <thread>`); by default that of `msg`; '' for a
        subject of its own (the status). `rank`: its place when the outgoing limit binds
        (`_reply_rank`), when not the one of its kind."""
        values.setdefault("request_id", "")
        if thread is None:
            thread = grammar.mask_subject(msg.subject) if msg else ""
        rendered = self.replies.render(kind, thread=thread, **values)
        raw = build_message(
            from_address=self.cfg.from_address,
            to=to,
            cc=cc,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            in_reply_to=(msg.message_id if msg else in_reply_to),
            references=(msg.references if msg else references),
            brand=self.cfg.brand,
        )
        payload = {"raw": base64.b64encode(raw).decode(), "rcpt": [*to, *(cc or [])], "kind": kind}
        if rank is not None:
            payload["rank"] = rank
        self.outbox.put(payload, job_id=reply_id)

    def flush_outbox(self, stop: threading.Event | None = None) -> int:
        """Send the due replies within the outgoing mail limit, in order (`_reply_rank`);
        return how many were sent. Nothing is ever dropped for a fault that is not the
        message's own:

        - over the limit (mail.smtp.max_recipients_per_hour/_per_day): the rest stays
          queued and goes as the window allows (`_claim_reply`, `_note_held`);
        - the server unavailable (down, 421, a 4xx to MAIL or DATA, a 5xx about the
          account): the pass stops and sending waits, twice as long after each failure in
          a row (`_smtp_failed`); a 421 "try later" is honoured the same way;
        - some recipients refused for now (4xx to RCPT): that reply waits, for them only,
          and the others go on;
        - refused for good (5xx to RCPT or DATA): that reply is failed, the others go on;
        - a record that holds no sendable message: quarantined, the others go on."""
        sent = 0
        while stop is None or not stop.is_set():
            if time.time() < self._smtp_retry_at:
                return sent  # the server failed a moment ago: not before its backoff
            item, held, need = self._claim_reply()
            if item is None:
                self._note_held(held, need)
                return sent
            raw, problem = _decode_reply(item.payload)
            if problem:
                self.outbox.quarantine(item, problem)
                continue
            rcpt = item.payload["rcpt"]
            key = f"{item.id}#{item.attempts}"  # a re-send after a crash counts again
            ready = self.mail_ledger.reserve(key, len(rcpt)) if self.mail_ledger else 0.0
            if ready:  # another process took the last places meanwhile
                self.outbox.release(item, "outgoing mail limit")
                self._note_held(self.outbox.count("pending"), len(rcpt))
                return sent
            try:
                self._sender.send(raw, self.cfg.from_address, rcpt)
            except PermanentTransportError as exc:
                self._settle_reservation(key, 0)
                log.error("reply %s refused for good, not retried: %s", item.id, exc)
                self.health.error("outbox", f"reply {item.id} refused for good: {exc}")
                self.outbox.finish(item, success=False, reason=str(exc))
                continue
            except RecipientsDeferred as exc:
                self._settle_reservation(key, len(exc.delivered))
                self._smtp_ok()
                delay = min(self._smtp_max, self._smtp_first * 2 ** max(0, item.attempts - 1))
                log.warning(
                    "reply %s: %s deferred by the server (%s); tried again for them in %.0fs",
                    item.id,
                    ", ".join(exc.deferred),
                    exc,
                    delay,
                )
                item.payload["rcpt"] = exc.deferred
                item.payload["delivered"] = [*item.payload.get("delivered", []), *exc.delivered]
                self.outbox.retry_later(item, delay, str(exc))
                continue
            except TransportError as exc:
                self._settle_reservation(key, 0)
                retry_at = self._smtp_failed(exc, item.id)
                self.outbox.retry_later(item, max(0.0, retry_at - time.time()), str(exc))
                with self._outbox_mutex:  # it is due when sending resumes: it goes first again
                    self._smtp_retry_at = max(self._smtp_retry_at, item.not_before)
                return sent
            self._smtp_ok()
            # Keep who got what and when, not the message itself (links, addresses).
            item.payload["bytes"] = len(raw)
            item.payload["raw"] = ""
            self.outbox.finish(item)
            sent += 1
            log.info("sent reply %s (%s) to %s", item.id, item.payload.get("kind"), ", ".join(rcpt))
        return sent

    def _claim_reply(self) -> tuple[Job | None, int, int]:
        """The next reply to send, when the limit lets it go now: (reply, 0, 0). Otherwise
        (None, replies held back by the limit, recipients of the next one), or (None, 0, 0)
        when no reply is due.

        Order: the notice that the limit holds mail back first (it explains the delay),
        then the replies to requesters, then the admins' alerts, then refusals of
        unauthenticated mail (anyone can cause those), oldest first in each.
        When the limit binds it is usually a flood of refusals and alerts: a colleague
        waiting for a confirmation or a result must not wait behind them (as intake
        handles likely-genuine mail first). A reply that does not fit blocks the ones
        after it: nothing overtakes it and it is not starved by smaller ones."""
        usage = self.mail_ledger.usage() if self.mail_ledger else None
        if usage is not None and not usage.fits(1):
            return None, self.outbox.count("pending"), 1
        blocked = 0
        for rank in range(LAST_RANK + 1):

            def accept(job: Job, rank: int = rank) -> bool:
                nonlocal blocked
                if blocked or _reply_rank(job) != rank:
                    return False
                rcpt = job.payload.get("rcpt")
                if usage is not None and isinstance(rcpt, list) and not usage.fits(len(rcpt)):
                    blocked = len(rcpt)
                    return False
                return True

            item = self.outbox.claim(accept=accept)
            if item is not None:
                return item, 0, 0
            if blocked:
                return None, self.outbox.count("pending"), blocked
        return None, 0, 0

    def _settle_reservation(self, key: str, count: int) -> None:
        if self.mail_ledger:
            self.mail_ledger.settle(key, count)

    def _smtp_failed(self, exc: TransportError, reply_id: str) -> float:
        """The server (or the account) failed: no reply is tried before the backoff, twice as
        long after each failure in a row. Returns when sending may try again."""
        with self._outbox_mutex:
            self._smtp_failures += 1
            failures = self._smtp_failures
            delay = min(self._smtp_max, self._smtp_first * 2 ** (failures - 1))
            now = time.time()
            self._smtp_retry_at = now + delay
            self._smtp_failing_since = self._smtp_failing_since or now
            self.health.note(
                smtp_failing={
                    "since": self._smtp_failing_since,
                    "failures": failures,
                    "retry_at": self._smtp_retry_at,
                    "error": str(exc)[:300],
                }
            )
        log.warning(
            "reply %s not sent (%s); sending waits %.1fs (failure %d in a row)",
            reply_id,
            exc,
            delay,
            failures,
        )
        return self._smtp_retry_at

    def _smtp_ok(self) -> None:
        """The server took a message: the backoff is over."""
        if not self._smtp_failures:
            return
        with self._outbox_mutex:
            failures, self._smtp_failures = self._smtp_failures, 0
            since, self._smtp_failing_since = self._smtp_failing_since, 0.0
            self._smtp_retry_at = 0.0
            self.health.note(smtp_failing=None)
        if failures:
            log.info("SMTP: sending again after %d failure(s) over %.0fs", failures, time.time() - since)

    def _note_held(self, held: int, need: int = 1) -> None:
        """A stretch of time when the limit holds replies back gets one warning in the log,
        a note for `athome status`, and (at most once a day, across restarts) a notice to
        the admins, which waits for the limit like any reply but goes first."""
        with self._outbox_mutex:
            now = time.time()
            if not held:
                if self._held_since:
                    log.info(
                        "outgoing mail limit: replies go out again (held back for %.0fs)",
                        now - self._held_since,
                    )
                    self._held_since = 0.0
                    self.health.note(outbox_held=None)
                return
            usage = self.mail_ledger.usage(now)
            next_at = usage.next_at(need)
            started = not self._held_since
            self._held_since = self._held_since or now
            self.health.note(outbox_held={"since": self._held_since, "replies": held, "next_at": next_at})
            if not started:
                return
            sent = ", ".join(f"{usage.sent(w)}/{n} in the last {_window(w)}" for w, n in usage.limits)
            log.warning(
                "outgoing mail limit reached (recipients sent: %s): %d repl(ies) wait in the outbox, the "
                "next can go in %.0fs; none is dropped",
                sent,
                held,
                max(0.0, next_at - now),
            )
            if not self.mail_ledger.alert_due(now=now):
                return
        self._queue_reply(
            f"outbox-held-{new_request_id(now)}",
            "admin_notice",
            to=self.cfg.admin_addresses,
            headline="respostas retidas pelo limite de envio de e-mail",
            rows=[
                ("Respostas na fila", str(held)),
                *(
                    (f"Enviados ({_window_pt(w)})", f"{usage.sent(w)} de {n} destinatários")
                    for w, n in usage.limits
                ),
                ("Próximo envio", self.replies.local_time(next_at)),
            ],
            advice="Nenhuma resposta foi descartada: elas saem em ordem assim que o limite permitir "
            "(mail.smtp.max_recipients_per_hour / max_recipients_per_day). Veja athome status. "
            "Este aviso é enviado no máximo uma vez por dia.",
        )

    # ----------------------------------------------------------------- work

    def work_once(self, max_jobs: int | None = None, stop: threading.Event | None = None) -> int:
        """Run due jobs until none is left that can start (or max_jobs, or `stop` is set);
        then send replies. Returns how many jobs were run or completed (quarantined ones
        are not counted). Several workers (threads) may run it at once: each job holds
        locks on the hosts it touches (`HostLocks`), so jobs on different hosts run at
        once and two jobs never touch the same host at once.

        An OSError (a full disk) ends the pass; nothing is lost: the next pass starts
        with the recovery that puts back what the failure left in processing/."""
        self._recover_jobs()
        if self._housekeeping.acquire(blocking=False):
            try:
                self._sweep_waiting()
            finally:
                self._housekeeping.release()
        done = 0
        while (max_jobs is None or done < max_jobs) and not (stop and stop.is_set()):
            job = self.host_locks.claim(self.jobs, self._hosts_of)
            if job is None:
                break
            try:
                done += self._work_on(job)
            finally:
                self.host_locks.release(job.id)
        if self._housekeeping.acquire(blocking=False):  # another worker is at it: once is enough
            try:
                self._recover_outbox()
                self.flush_outbox(stop)
                if time.monotonic() - self._pruned_at > PRUNE_EVERY:
                    self.prune()
                    self._pruned_at = time.monotonic()
            finally:
                self._housekeeping.release()
        self.health.ok("work")
        return done

    def _recover_jobs(self) -> None:
        """Recovery on every pass, not only at start: a job that a failed write left in
        processing/ (a give-back on a full disk) goes back to pending/ as soon as space
        returns. Only this process works the queue (work lock), and the jobs its workers
        hold are kept out of it; claims wait meanwhile (the host locks' mutex), so a job
        in flight is never recovered from under its worker."""
        with self.host_locks.quiet() as in_flight:
            self.jobs.recover(skip=in_flight)
            completed = self.jobs.completed_in_processing(skip=in_flight)
            for job in completed:
                self.host_locks.hold(job.id)  # one worker settles it
        for job in completed:
            try:
                self._settle(job)
            finally:
                self.host_locks.release(job.id)

    def _hosts_of(self, job: Job) -> frozenset[str]:
        """The hosts a pending job's playbook will touch, as the inventory resolves them
        now. None for a job that runs nothing (its result is saved, its command is gone,
        its payload is unusable: it is settled or quarantined at once)."""
        spec = commands.COMMANDS.get(job.payload.get("command"))
        if job.result is not None or spec is None or payload_problem(job.payload, JOB_FIELDS):
            return frozenset()
        inventory = self.inventory.get()  # a fault of the inventory is the pass's, not the job's
        cmd = Command(job.payload["command"], job.payload["params"], job.payload["command_text"])
        try:
            return frozenset(spec.hosts(cmd, inventory))
        except Exception as exc:  # its params do not say: lock every host, it runs alone
            log.warning("%s: its hosts are unknown (%s); it locks every host", job.id, exc)
            return frozenset(inventory.hosts) | {commands.CONTROLLER}

    @logs.for_job
    def _work_on(self, job: Job) -> int:
        """Run one claimed job to its end (settled, given back or abandoned); 1 when it
        counts as run or completed."""
        problem = payload_problem(job.payload, JOB_FIELDS)
        if problem:
            self.jobs.quarantine(job, problem)
            return 0
        if job.result is not None:
            # Given back with its result saved (by an older version): final, never run again.
            self._settle(job)
            return 1
        try:
            self._run(job)
        except Exception as exc:  # never leave a claimed job behind
            if disk_full(exc) and job.result is None:
                # The controller's disk, not the job: no attempt spent, and the pass
                # ends (the next one starts with the recovery if this fails too).
                with contextlib.suppress(OSError):
                    self.jobs.release(job, f"the state disk is full: {exc}")
                raise
            log.exception("%s: the worker failed around the playbook", job.id)
            self._give_back(job, f"{type(exc).__name__}: {exc}")
            return 1
        if job.state == "processing":  # its result is saved (else it went back to pending/)
            self._settle(job)
        return 1

    def _give_back(self, job: Job, reason: str) -> None:
        """After an error of the worker itself: retry later, or fail it with a reply. A job
        with a result is completed with that result: a result is final, it is never
        replaced by this failure and the playbook never runs again for it."""
        try:
            if job.result is None and job.attempts < job.max_attempts:
                self.jobs.retry_later(job, self._backoff(job), reason=reason)
                return
            if job.result is None:
                job.result = {
                    "outcome": "failed",
                    "playbook": {"status": "failed", "hosts": {}, "errors": [reason]},
                }
            self.jobs.checkpoint(job)  # again: the failure may have been this very write
            self._settle(job)
        except Exception:
            # Left in processing/: the recovery at the start of the next pass settles it
            # (a result it could not save is lost, and the job runs again: at least once).
            log.exception("%s: could not give the job back; the next pass will", job.id)

    def _backoff(self, job: Job) -> int:
        return self.cfg.retry_backoff[min(job.attempts, len(self.cfg.retry_backoff)) - 1]

    def _run(self, job: Job) -> None:
        payload = job.payload
        if payload.get("command") not in commands.COMMANDS:
            # Queued by an older version that knew this command: answer, do not loop on it.
            job.result = {
                "outcome": "failed",
                "playbook": {
                    "status": "failed",
                    "hosts": {},
                    "errors": [f"o comando {payload.get('command')} não existe mais nesta versão"],
                },
            }
            self.jobs.checkpoint(job)
            return
        spec = commands.spec_for(payload["command"])
        cmd = Command(payload["command"], payload["params"], payload["command_text"])
        # The inventory in force now, resolved once: an inventory from git switched meanwhile
        # (a symlink swap) does not change what this run reads.
        inventory_path = Path(self.cfg.inventory).resolve()
        revision = gitinventory.revision(inventory_path)
        log.info(
            "running %s %s (attempt %d/%d, inventory %s)",
            job.id,
            cmd.text,
            job.attempts,
            job.max_attempts,
            revision[:12] or "not in git",
        )
        timeout = spec.run_timeout or self.cfg.playbook_timeout
        self.progress.beat(f"running {job.id}", busy_for=timeout)  # progress while within its timeout
        try:
            check = payload.get("phase") == "check"
            result = runner.run_playbook(
                spec.playbook,
                inventory=inventory_path,
                check=check,
                diff=check,
                extravars=spec.extravars(cmd, job.id, payload["requester"]),
                limit=spec.limit(cmd),
                timeout=timeout,
                artifacts_dir=self.cfg.artifacts_dir,
                ident=f"{job.id}-{job.attempts}" + ("-check" if check else ""),
                private_root=self.cfg.run_dir,
            )
        except Exception as exc:  # the runner itself broke: treat as transient
            if disk_full(exc):
                raise  # it could not write its own files: the controller's fault, not the job's
            log.exception("running %s failed before the playbook could report", job.id)
            result = runner.PlaybookResult(
                spec.playbook, "failed", -1, errors=[f"{type(exc).__name__}: {exc}"]
            )
            transient = True
        else:
            result = spec.relevant(result)
            transient = spec.transient(cmd, result)
        _crash_point("work-after-run")
        if transient and job.attempts < job.max_attempts:
            delay = self._backoff(job)
            log.warning("%s: transient failure (%s); retry in %ss", job.id, result.status, delay)
            self.jobs.retry_later(
                job, delay, reason=f"{result.status}: {result.unreachable or result.errors}"
            )
            return
        if (
            payload.get("phase") == "check"
            and result.succeeded
            and any(h.report.get("changed") for h in result.hosts.values())
        ):
            self._ask_confirmation(job, result)
            return
        job.result = {
            "outcome": spec.outcome(cmd, result),
            "playbook": result.to_dict(),
            "attempts_spent": transient,
            "inventory_revision": revision,
        }
        self.jobs.checkpoint(job)
        _crash_point("work-after-checkpoint")

    @logs.for_job
    def _settle(self, job: Job) -> None:
        """Complete a job whose result is saved, isolated from the others: a job that cannot
        be completed is quarantined. An OSError (a full disk) is raised, the job stays in
        processing/ with its result, and a later pass completes it."""
        problem = payload_problem(job.payload, JOB_FIELDS)
        try:
            if problem:
                raise AthomeError(problem)
            self._complete(job)
        except OSError:
            raise
        except Exception as exc:
            if not problem:
                log.exception("%s: cannot be completed", job.id)
            self.jobs.quarantine(job, f"cannot be completed: {exc}")

    def _complete(self, job: Job) -> None:
        """Queue the result reply and finish the job; a reply that cannot be rendered falls
        back to the generic template, then to a bare one, so the job never stays stuck.
        Raises when not even the bare reply can be queued (the caller quarantines it)."""
        payload = job.payload
        spec = commands.COMMANDS.get(payload["command"])
        outcome = job.result.get("outcome", "failed")
        playbook = job.result.get("playbook") or {"hosts": {}, "errors": ["interrompido"], "status": "failed"}
        # A job an operator re-queued gets a new reply (ids are idempotent otherwise).
        requeued = sum(1 for h in job.history if h.get("event") == "requeued by operator")
        reply_id = f"{job.id}-result" + (f"-{requeued}" if requeued else "")
        values = dict(
            request_id=job.id,
            command=payload["command_text"],
            command_name=payload["command"],
            params=payload["params"],
            outcome=outcome,
            result=playbook,
            inventory_revision=job.result.get("inventory_revision", ""),
        )
        preferred = spec.template if spec and self.replies.has(spec.template) else "result"
        for template in dict.fromkeys((preferred, "result", "bare")):
            try:
                self._queue_reply(
                    reply_id,
                    template,
                    to=[payload["requester"]],
                    in_reply_to=payload.get("message_id", ""),
                    references=payload.get("references", ""),
                    thread=self._thread(job),
                    **values,
                )
                break
            except OSError:
                raise  # not the template's fault (a full disk): the job stays, completed later
            except Exception:
                log.exception("%s: reply template %s failed", job.id, template)
        else:
            raise AthomeError("no reply could be rendered, not even the bare one")
        _crash_point("work-after-reply")
        self.jobs.finish(job, success=outcome != "failed", outcome=outcome)
        hosts = playbook.get("hosts") or {}
        self.audit.record(
            "result",
            request_id=job.id,
            sender=payload["requester"],
            command=payload["command_text"],
            command_name=payload["command"],
            playbook=playbook.get("playbook") or (spec.playbook if spec else ""),
            outcome=outcome,
            attempts=job.attempts,
            inventory_revision=job.result.get("inventory_revision", ""),
            hosts={h: r.get("status") for h, r in hosts.items() if isinstance(r, dict)},
            changed=sorted(
                h for h, r in hosts.items() if isinstance(r, dict) and r.get("status") == "changed"
            ),
            errors=playbook.get("errors"),
        )
        log.info("finished %s: %s", job.id, outcome)

    # ----------------------------------------------------------------- loop

    def work_forever(self, stop: threading.Event) -> None:
        """`worker.concurrency` workers until `stop` is set; each finishes its current job.
        An idle worker waits for poll_interval, or less when a host lock is released or
        intake queues a job. Each worker beats `self.progress` (the systemd watchdog) every
        pass and every bounded wait; a playbook is progress within its run timeout (_run)."""
        beat = self.progress.beat

        def pause(seconds: float, doing: str) -> None:
            until = time.monotonic() + seconds
            while not stop.is_set() and time.monotonic() < until:
                beat(doing, busy_for=self.progress.bounded(seconds))
                stop.wait(min(self.progress.bounded(seconds), until - time.monotonic()))

        def worker() -> None:
            while not stop.is_set():
                beat("working the queue")
                since = self.host_locks.generation
                try:
                    self.work_once(stop=stop)
                except (AthomeError, OSError) as exc:
                    log.error("work pass failed: %s", exc)
                    self.health.error("work", str(exc))
                    pause(self.cfg.poll_interval, "waiting after an error")  # a full disk: not before
                    continue
                except Exception as exc:
                    log.exception("work pass crashed; continuing")
                    self.health.error("work", f"{type(exc).__name__}: {exc}")
                    pause(self.cfg.poll_interval, "waiting after an error")
                    continue
                if not stop.is_set():
                    wait = self.progress.bounded(self.cfg.poll_interval)
                    beat("idle", busy_for=wait)
                    self.host_locks.wait(since, wait)
            self.progress.retire()

        workers = [
            threading.Thread(target=worker, name=f"work-{n + 1}", daemon=True)
            for n in range(self.cfg.concurrency)
        ]
        for t in workers:
            t.start()
        stop.wait()
        self.host_locks.poke()  # wake the idle ones
        longest = max([self.cfg.playbook_timeout, *(s.run_timeout or 0 for s in commands.COMMANDS.values())])
        deadline = time.monotonic() + longest + 30
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def run_forever(self, stop: threading.Event, notifier: Notifier | None = None) -> None:
        """Intake and the workers in threads until `stop` is set (SIGTERM).

        Under systemd (`notifier`, Type=notify): READY=1 once both loops run (the queue
        was recovered before), STATUS= with what each loop does, STOPPING=1 on SIGTERM,
        and WATCHDOG=1 every half watchdog interval while every loop keeps beating. With
        an inventory from git, a third thread fetches it (not watched: a stuck fetch is
        bounded by git's own timeout, and the revision in force keeps serving)."""
        if self.git_inventory is not None:  # the first fetch before intake and the workers
            try:
                self.git_inventory.sync()
            except AthomeError as exc:  # the last good revision (if any) serves meanwhile
                log.error("%s", exc)
                self.health.error("inventory", str(exc))
            threading.Thread(
                target=self.git_inventory.forever, args=(stop, self.health), name="inventory", daemon=True
            ).start()
        notifier = notifier or Notifier({})
        self.progress.allowance = notifier.watchdog_interval
        stopping = threading.Event()

        def describe() -> str:
            doing = self.progress.doing()
            busy = [f"{n} {d}" for n, d in doing.items() if n.startswith("work-") and d.startswith("running")]
            read = self.health.read().get("intake_ok")
            ago = f"{time.time() - read:.0f} s ago" if isinstance(read, (int, float)) else "not yet"
            return (
                ("stopping: finishing running jobs; " if stopping.is_set() else "")
                + f"intake {doing.get('intake') or 'stopped'}, mailbox read {ago}; "
                + f"{len(busy)}/{self.cfg.concurrency} workers busy"
                + (f" ({', '.join(busy)})" if busy else "")
                + f"; queue: {self.jobs.count('pending')} pending, {self.jobs.count('waiting')} waiting"
            )

        watchdog = Watchdog(notifier, self.progress, describe)
        slowest = max(self.cfg.imap.timeout, self.cfg.smtp.timeout)
        if notifier.watchdog_interval and slowest >= notifier.watchdog_interval / 2:
            log.warning(
                "mail timeouts (%ss) are not well below half of WatchdogSec (%gs): a slow server "
                "may get the service restarted; raise WatchdogSec",
                slowest,
                notifier.watchdog_interval,
            )
        intake = threading.Thread(target=self.intake_forever, args=(stop,), name="intake", daemon=True)
        work = threading.Thread(target=self.work_forever, args=(stop,), name="work", daemon=True)
        intake.start()
        work.start()

        def started(loops: set[str]) -> bool:
            return "intake" in loops and sum(n.startswith("work-") for n in loops) >= self.cfg.concurrency

        with contextlib.suppress(KeyboardInterrupt):
            if self.progress.wait_started(started, stop):
                notifier.ready(describe())
                while not stop.is_set():
                    watchdog.tick()
                    stop.wait(watchdog.interval)
        stop.set()
        stopping.set()
        notifier.stopping(describe())
        log.info("stopping: the workers finish their current jobs")
        # The workers finish their current jobs (still watched: a job is progress within
        # its timeout); intake may sit in IDLE and has nothing half-done (every step is
        # idempotent), so it is not waited for long.
        while work.is_alive():
            work.join(timeout=watchdog.interval)
            if work.is_alive():
                watchdog.tick()
        intake.join(timeout=5)
        notifier.close()
