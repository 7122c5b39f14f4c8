"""Mail in and out: IMAP (imap-tools) and SMTP for production, Maildir folders for the demo.

The only module that imports imap_tools. Inboxes fetch without marking
anything seen (BODY.PEEK); the service calls `ack()` only once the job, or
the rejection reply, is durably queued.
"""

from __future__ import annotations

import contextlib
import email.policy
import fcntl
import imaplib
import json
import logging
import mailbox
import os
import re
import smtplib
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, getaddresses, make_msgid, parseaddr
from pathlib import Path
from typing import Protocol

from dispatcher.config import IMAPSettings, SMTPSettings
from dispatcher.errors import PermanentTransportError, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """The headers of one message that the dispatcher decides on, unfolded (RFC 5322)."""

    uid: str
    message_id: str
    from_header: str  # every From header, unfolded, not decoded: several addresses are refused later
    subject: str  # decoded (RFC 2047), unfolded
    references: str = ""
    automated: str = ""  # why this looks like a machine's mail (bounce, auto-reply), or ""
    date: str = ""  # the Date header as written
    auth_results: tuple[str, ...] = ()  # every Authentication-Results header, topmost first
    # From/Date/Subject/Message-ID present more than once: DKIM signs the bottom-most copy,
    # we would read the topmost, so an added copy could change a signed message.
    duplicated: tuple[str, ...] = ()
    subject_cut: bool = False  # longer than MAX_RAW_SUBJECT: `subject` is its beginning only


_MSGID = re.compile(r"<[^<>\s]{1,250}>")
MAX_REFERENCES = 20
SET_ASIDE_KEYWORD = "$AthomeSetAside"  # IMAP keyword of a message that kept failing
FETCH_LIMIT = 500  # unseen messages read per pass, newest first: a flood cannot hide new mail
SINGLE_HEADERS = ("from", "date", "subject", "message-id")  # RFC 5322: at most one each
MSGID_TAG = "athome-ops"  # in our replies' Message-IDs: <....athome-ops@domain>


def answers_us(incoming: Incoming) -> bool:
    """The message replies to one of our own emails (it references our Message-ID)."""
    return f".{MSGID_TAG}@" in incoming.references


_ESCAPED = re.compile("[\udc80-\udcff]")


def _text(value) -> str:
    """A header value as text, whatever the parser made of it (str, Header, 8-bit bytes).

    Raw 8-bit bytes (RFC 6532 UTF-8 headers, as Gmail and Outlook send a display name
    like `Ana Conceição`) come from the parser as surrogate escapes: read them as UTF-8
    (anything else becomes U+FFFD, which no address accepts)."""
    if value is None:
        return ""
    try:
        text = str(value)
    except Exception:  # a Header with undecodable parts
        return repr(value)
    if _ESCAPED.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def unfold(value: str) -> str:
    """RFC 5322 unfolding: a CRLF (or LF) followed by white space is not part of the value."""
    return re.sub(r"\r?\n(?=[ \t])", "", value or "").replace("\r", "").replace("\n", "")


# A Subject is cut to this many characters before decoding: email's header parser is
# superlinear on some hostile forms (100 KB of encoded words: seconds each, read before any
# screening, every pass), and no command is near it (the grammar accepts 512 characters).
MAX_RAW_SUBJECT = 4096


def _decode(value) -> str:
    """An unstructured header (Subject) decoded as email.policy.default does (RFC 2047)."""
    text = unfold(_text(value))
    try:
        return str(email.policy.default.header_factory("Subject", text))
    except Exception:  # the parser's own errors on hostile input
        try:
            return str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError, TypeError):
            return text


def _msgids(value) -> list[str]:
    """The <...> tokens of a Message-ID/References/In-Reply-To value (unfolded, nothing else)."""
    return _MSGID.findall(_text(value).encode("ascii", "replace").decode())


def _automated(headers) -> str:
    auto = _text(headers.get("Auto-Submitted")).strip().lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = _text(headers.get("Precedence")).strip().lower()
    if precedence in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {precedence}"
    if _text(headers.get("Return-Path")).strip() == "<>":
        return "null Return-Path (a bounce)"
    local = parseaddr(_text(headers.get("From")))[1].split("@", 1)[0].lower()
    if local in ("mailer-daemon", "postmaster"):
        return f"From {local}"
    return ""


def incoming_from_headers(uid: str, headers) -> Incoming:
    """Build an Incoming from an email.message.Message (headers are enough).

    Values are taken as written (`raw_items`, whatever policy parsed them) and unfolded;
    From and Subject are then read with email.policy.default, like mail clients do."""
    raw: dict[str, list[str]] = {}
    for name, value in headers.raw_items():
        raw.setdefault(name.lower(), []).append(unfold(_text(value)))

    def first(name: str) -> str:
        return raw.get(name, [""])[0]

    ids = _msgids(first("message-id"))
    message_id = ids[0] if ids else ""
    refs = _msgids(" ".join(raw.get("references", []))) or _msgids(first("in-reply-to"))
    refs = [r for r in refs if r != message_id][-(MAX_REFERENCES - 1) :]
    return Incoming(
        uid=str(uid),
        message_id=message_id,
        from_header=", ".join(raw.get("from", [])),
        subject=_decode(first("subject")[:MAX_RAW_SUBJECT]),
        subject_cut=len(first("subject")) > MAX_RAW_SUBJECT,
        references=" ".join([*refs, message_id]).strip(),
        automated=_automated(headers),
        date=first("date").strip(),
        auth_results=tuple(raw.get("authentication-results", [])),
        duplicated=tuple(h for h in SINGLE_HEADERS if len(raw.get(h, [])) > 1),
    )


def parse_all(items) -> list[Incoming]:
    """Incoming for each (uid, headers); a message whose headers cannot be read is skipped
    (and stays in the mailbox for a person to look at), never stopping the others."""
    found = []
    for uid, headers in items:
        try:
            found.append(incoming_from_headers(uid, headers))
        except Exception:
            log.exception("message %s has headers that cannot be read; left in the mailbox", uid)
    return found


class Inbox(Protocol):
    def fetch(self, limit: int = FETCH_LIMIT) -> list[Incoming]: ...
    def ack(self, uid: str) -> None: ...
    def set_aside(self, uid: str) -> None: ...
    def close(self) -> None: ...


class Sender(Protocol):
    def send(self, raw: bytes, mail_from: str, recipients: list[str]) -> None: ...


# ------------------------------------------------------------------- IMAP


IDLE_MAX = 25 * 60  # RFC 2177: re-issue IDLE well before 29 minutes
SESSION_MAX = 25 * 60  # and recycle the connection as often


class IMAPInbox:
    """An IMAP session: `with IMAPInbox(settings) as inbox: ...`; `wait()` blocks in IDLE."""

    def __init__(self, settings: IMAPSettings):
        self.settings = settings
        self.box = None

    def __enter__(self) -> IMAPInbox:
        from imap_tools import MailBox, MailBoxStartTls, MailBoxUnencrypted

        s = self.settings
        ctx = ssl.create_default_context(cafile=s.cafile or None)
        try:
            if s.security == "tls":
                box = MailBox(s.host, s.port, ssl_context=ctx, timeout=s.timeout)
            elif s.security == "starttls":
                box = MailBoxStartTls(s.host, s.port, ssl_context=ctx, timeout=s.timeout)
            else:
                box = MailBoxUnencrypted(s.host, s.port, timeout=s.timeout)
            self.box = box.login(s.user, s.password, s.folder)
        except Exception as exc:  # imaplib, socket and ssl errors alike
            raise TransportError(f"IMAP {s.host}:{s.port}: {type(exc).__name__}: {exc}") from exc
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, limit: int = FETCH_LIMIT) -> list[Incoming]:
        """The headers of the newest `limit` unseen messages (oldest first)."""
        from imap_tools import AND

        try:
            msgs = list(
                self.box.fetch(
                    AND(seen=False), mark_seen=False, headers_only=True, bulk=50, limit=limit, reverse=True
                )
            )[::-1]
        except Exception as exc:
            raise TransportError(f"IMAP fetch failed: {exc}") from exc
        return parse_all((m.uid, m.obj) for m in msgs if m.uid)

    def wait(self, timeout: float) -> bool:
        """Block in IMAP IDLE until the mailbox changes or `timeout` passes; True on a change.

        Works around imap-tools missing an EXISTS the server sent just before IDLE
        started (shared/recipes/04: it is buffered in imaplib, invisible to poll())."""

        client = self.box.client
        client.untagged_responses.pop("EXISTS", None)  # counts from SELECT / earlier commands
        self.box.idle.start()
        try:
            early = list(client.untagged_responses.pop("EXISTS", []))
            sock = client.sock
            old = sock.gettimeout()
            sock.settimeout(0)
            try:
                while True:
                    try:
                        early.append(client._get_line())
                    except (TimeoutError, BlockingIOError, OSError, imaplib.IMAP4.abort):
                        break
            finally:
                sock.settimeout(old)
            if early:
                return True
            return bool(self.box.idle.poll(timeout=min(timeout, IDLE_MAX)))
        finally:
            self.box.idle.stop()

    def ack(self, uid: str) -> None:
        from imap_tools import MailMessageFlags

        self.box.flag(uid, MailMessageFlags.SEEN, True)
        if self.settings.processed_folder:
            self.box.move(uid, self.settings.processed_folder)

    def set_aside(self, uid: str) -> None:
        """Flag it seen with the keyword $AthomeSetAside and move it to quarantine_folder
        (when set): out of the way, never mistaken for a handled message."""
        from imap_tools import MailMessageFlags

        self.box.flag(uid, (MailMessageFlags.SEEN, SET_ASIDE_KEYWORD), True)
        if self.settings.quarantine_folder:
            self.box.move(uid, self.settings.quarantine_folder)

    def close(self) -> None:
        if self.box is not None:
            try:
                self.box.logout()
            except Exception:  # the connection may already be gone
                log.debug("IMAP logout failed", exc_info=True)
            self.box = None


# ---------------------------------------------------------------- Maildir


def open_maildir(path: str | Path) -> mailbox.Maildir:
    """A Maildir, created if needed; safe when two processes create it at once."""
    for sub in ("tmp", "new", "cur"):
        Path(path, sub).mkdir(parents=True, exist_ok=True)
    return mailbox.Maildir(str(path), create=False)


class MaildirInbox:
    """A local Maildir as the mailbox (embedded default): unseen = no 'S' flag.

    Read and flagged with plain directory operations (a rename into cur/ with the
    flag in the name, as mail clients do) rather than mailbox.Maildir, which
    rewrites a whole message to change a flag."""

    def __init__(self, path: str | Path):
        self.box = open_maildir(path)  # for adding mail (the demo, the tests)
        self.path = Path(path)
        self._where: dict[str, Path] = {}

    def __enter__(self) -> MaildirInbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, limit: int = FETCH_LIMIT) -> list[Incoming]:
        """The headers of the newest `limit` unseen messages (oldest first)."""
        self.box.clean()
        items, self._where, unseen = [], {}, []
        for sub in ("new", "cur"):
            for name in os.listdir(self.path / sub):
                uid, _, info = name.partition(":")
                if not name.startswith(".") and not (info.startswith("2,") and "S" in info[2:]):
                    unseen.append((uid, sub, name))
        for uid, sub, name in sorted(unseen)[-limit:]:
            path = self.path / sub / name
            try:
                with open(path, "rb") as f:
                    items.append((uid, BytesHeaderParser(policy=email.policy.default).parse(f)))
            except FileNotFoundError:  # taken by another reader meanwhile
                continue
            self._where[uid] = path
        return parse_all(items)

    def set_aside(self, uid: str) -> None:
        """Maildir has no keywords: seen and flagged (S, F), which a handled message never is."""
        self._flag(uid, "FS")

    def ack(self, uid: str) -> None:
        self._flag(uid, "S")

    def _flag(self, uid: str, add: str) -> None:
        path = self._where.pop(uid)
        _, _, info = path.name.partition(":")
        flags = "".join(sorted(set(info[2:] if info.startswith("2,") else "") | set(add)))
        os.rename(path, self.path / "cur" / f"{uid}:2,{flags}")

    def close(self) -> None:
        self.box.close()


class MaildirSender:
    """Delivers outgoing mail into a local Maildir (the demo's 'outbox')."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        open_maildir(path)

    def send(self, raw: bytes, mail_from: str, recipients: list[str]) -> None:
        box = open_maildir(self.path)
        key = box.add(raw)
        log.info("delivered reply to %s into %s (%s)", ", ".join(recipients), self.path, key)


# ------------------------------------------------------------------- SMTP


class RecipientsDeferred(TransportError):
    """The server refused some recipients for now (4xx to RCPT, e.g. 450 mailbox busy, 452
    too many recipients) and took the message for the others (`delivered`, maybe none): the
    reply is tried again later for `deferred` only (RFC 5321 4.5.3.1.10). The other replies
    may go meanwhile: the fault is this message's, not the server's."""

    def __init__(self, message: str, deferred: list[str], delivered: list[str]):
        super().__init__(message)
        self.deferred = deferred
        self.delivered = delivered


# RFC 3463 X.4.5 "mail system congestion": Gmail's "550 5.4.5 Daily user sending quota
# exceeded". A 5xx about the whole account, never about one message.
_SYSTEM_STATUS = re.compile(rb"\b[45]\.4\.5\b")


def _smtp_text(code, text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(str(text).split())}"


class SMTPSender:
    """Sends one message per connection. What goes wrong is told apart by whose it is:

    - the server's or the account's (connection refused or dropped, a timeout, 421 at any
      step, any 4xx to MAIL or DATA, a refused greeting, HELO or login, 5xx to MAIL FROM
      such as a spent sending quota): TransportError, try every reply later; a 5xx here is
      the same for every reply, so it must not drop them all;
    - some recipients' for now (4xx to RCPT): RecipientsDeferred;
    - this message's for good (5xx to RCPT for every recipient, 5xx to DATA):
      PermanentTransportError. A 5xx for some recipients only is logged; the others got it."""

    def __init__(self, settings: SMTPSettings):
        self.settings = settings

    def send(self, raw: bytes, mail_from: str, recipients: list[str]) -> None:
        s = self.settings
        where = f"SMTP {s.host}:{s.port}"
        ctx = ssl.create_default_context(cafile=s.cafile or None)
        try:
            if s.security == "tls":
                client = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=ctx)
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            with client:
                if s.security == "starttls":
                    client.starttls(context=ctx)
                if s.user:
                    client.login(s.user, s.password)
                refused = client.sendmail(mail_from, recipients, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            raise _refused(exc.recipients, [], where) from exc
        except smtplib.SMTPDataError as exc:
            text = _smtp_text(exc.smtp_code, exc.smtp_error)
            said = exc.smtp_error if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error).encode()
            if exc.smtp_code >= 500 and not _SYSTEM_STATUS.search(said):
                raise PermanentTransportError(f"{where}: message refused: {text}") from exc
            raise TransportError(f"{where}: DATA: {text}") from exc
        except smtplib.SMTPResponseException as exc:  # greeting, HELO, STARTTLS, AUTH, MAIL FROM
            raise TransportError(
                f"{where}: {type(exc).__name__}: {_smtp_text(exc.smtp_code, exc.smtp_error)}"
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TransportError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if refused:
            delivered = [r for r in recipients if r not in refused]
            error = _refused(refused, delivered, where)
            if isinstance(error, RecipientsDeferred):
                raise error


def _refused(refused: dict, delivered: list[str], where: str) -> TransportError:
    """What a refusal of recipients means (smtplib's {address: (code, text)})."""
    codes = {r: code for r, (code, _) in refused.items()}
    texts = "; ".join(f"{r}: {_smtp_text(c, t)}" for r, (c, t) in refused.items())
    if 421 in codes.values():  # "service not available, closing channel": the whole server
        return TransportError(f"{where}: RCPT: {texts}")
    deferred = [r for r, code in codes.items() if 400 <= code < 500]
    gone = [r for r in codes if r not in deferred]
    if gone:
        log.warning("%s refused for good: %s", where, texts)
    if deferred:
        return RecipientsDeferred(f"{where}: RCPT: {texts}", deferred, delivered)
    return PermanentTransportError(f"{where}: every recipient refused: {texts}")


# ------------------------------------------------------ outgoing mail limit

HOUR, DAY = 3600, 86400


@dataclass(frozen=True)
class Usage:
    """The recipients sent in the last day (time, count), and what the limits let go now."""

    entries: tuple[tuple[float, int], ...]
    limits: tuple[tuple[int, int], ...]  # (window seconds, recipients), only those in force
    now: float

    def sent(self, window: int) -> int:
        return sum(n for t, n in self.entries if t > self.now - window)

    def next_at(self, count: int) -> float:
        """When `count` more recipients may go (<= now: at once). A window that has sent
        nothing takes any message, even one with more recipients than its limit."""
        ready = self.now
        for window, limit in self.limits:
            inside = sorted((t, n) for t, n in self.entries if t > self.now - window)
            used = sum(n for _, n in inside)
            for t, n in inside:
                if used == 0 or used + count <= limit:
                    break
                used -= n
                ready = max(ready, t + window)
        return ready

    def fits(self, count: int) -> bool:
        return self.next_at(count) <= self.now


class SendLedger:
    """Recipients sent over sliding windows, for the outgoing mail limit.

    `state/outbox-ledger.json`: [time, recipients, key] of every message sent in the last
    day, and when the admins were last told that the limit held mail back. Every thread
    and process that sends reserves a message's recipients before it goes, under an flock,
    so two senders cannot both take the last place; the file is replaced atomically
    (tmp + fsync + rename). A reservation whose send failed is given back (`settle`); a
    crash between the two leaves it counted: the count errs towards sending less.
    A missing or unreadable ledger is rebuilt from `seed()` (the sent replies' records)."""

    def __init__(self, path: str | os.PathLike, per_hour: int, per_day: int, seed=None):
        self.path = Path(path)
        self.limits = tuple((w, n) for w, n in ((HOUR, per_hour), (DAY, per_day)) if n > 0)
        self._seed = seed
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def _locked(self):
        with self._mutex:
            fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict) or not isinstance(data.get("sent"), list):
                raise ValueError("not a ledger")
            sent = [(float(t), int(n), str(k)) for t, n, k in data["sent"]]
            return {"sent": sent, "alerted_at": float(data.get("alerted_at", 0))}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            log.warning("outgoing mail ledger %s unreadable (%s): counted from the outbox", self.path, exc)
        sent = [(float(t), int(n), str(k)) for t, n, k in (self._seed() if self._seed else [])]
        return {"sent": sent, "alerted_at": 0.0}

    def _save(self, data: dict, now: float) -> None:
        data["sent"] = [e for e in data["sent"] if e[0] > now - DAY]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                st = self.path.parent.stat()
                if os.geteuid() == 0 and st.st_uid != 0:  # root's CLI: the service user still reads it
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def usage(self, now: float | None = None) -> Usage:
        """What was sent and what may go now (read without the lock: the file is replaced whole)."""
        now = time.time() if now is None else now
        if not self.path.exists():  # counted once from the outbox, then kept
            with self._locked():
                data = self._load()
                self._save(data, now)
        with self._mutex:
            data = self._load()
        return Usage(tuple((t, n) for t, n, _ in data["sent"]), self.limits, now)

    def reserve(self, key: str, count: int, now: float | None = None) -> float:
        """Count `count` recipients under `key` if the limits let them go now: 0.0; else
        nothing is counted and the time when they could go is returned."""
        now = time.time() if now is None else now
        with self._locked():
            data = self._load()
            ready = Usage(tuple((t, n) for t, n, _ in data["sent"]), self.limits, now).next_at(count)
            if ready > now:
                return ready
            data["sent"].append((now, count, key))
            self._save(data, now)
        return 0.0

    def settle(self, key: str, count: int) -> None:
        """A reserved message reached `count` recipients (0: none, the send failed)."""
        now = time.time()
        with self._locked():
            data = self._load()
            data["sent"] = [(t, count if k == key else n, k) for t, n, k in data["sent"]]
            data["sent"] = [e for e in data["sent"] if e[1] > 0]
            self._save(data, now)

    def alert_due(self, every: float = DAY, now: float | None = None) -> bool:
        """True at most once per `every` seconds, across restarts (the admins' notice)."""
        now = time.time() if now is None else now
        with self._locked():
            data = self._load()
            if data["alerted_at"] > now - every:
                return False
            data["alerted_at"] = now
            self._save(data, now)
        return True


# ---------------------------------------------------------------- building


def build_message(
    *,
    from_address: str,
    to: list[str],
    cc: list[str] | None = None,
    subject: str,
    text: str,
    html: str,
    in_reply_to: str = "",
    references: str = "",
    brand: str = "ATHome",
) -> bytes:
    """A multipart/alternative reply (text + HTML), threaded under the command."""
    msg = EmailMessage()
    msg["From"] = f"{brand} <{from_address}>"
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(idstring=MSGID_TAG, domain=from_address.rsplit("@", 1)[-1] or None)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=SMTP_POLICY)


def recipients_of(raw: bytes) -> list[str]:
    headers = BytesHeaderParser().parsebytes(raw)
    fields = (headers.get_all("To") or []) + (headers.get_all("Cc") or [])
    return [a for _, a in getaddresses(fields) if a]
