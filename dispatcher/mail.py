"""Mail in and out: IMAP (imap-tools) and SMTP for production, Maildir folders for the demo.

The only module that imports imap_tools. Inboxes fetch without marking
anything seen (BODY.PEEK); the service calls `ack()` only once the job, or
the rejection reply, is durably queued.
"""

from __future__ import annotations

import email.policy
import imaplib
import logging
import mailbox
import os
import re
import smtplib
import ssl
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


_MSGID = re.compile(r"<[^<>\s]{1,250}>")
MAX_REFERENCES = 20
SET_ASIDE_KEYWORD = "$AthomeSetAside"  # IMAP keyword of a message that kept failing
FETCH_LIMIT = 500  # unseen messages read per pass, newest first: a flood cannot hide new mail
SINGLE_HEADERS = ("from", "date", "subject", "message-id")  # RFC 5322: at most one each
MSGID_TAG = "athome-ops"  # in our replies' Message-IDs: <....athome-ops@domain>


def answers_us(incoming: Incoming) -> bool:
    """The message replies to one of our own emails (it references our Message-ID)."""
    return f".{MSGID_TAG}@" in incoming.references


def _text(value) -> str:
    """A header value as text, whatever the parser made of it (str, Header, 8-bit bytes)."""
    if value is None:
        return ""
    try:
        return str(value)
    except Exception:  # a Header with undecodable parts
        return repr(value)


def unfold(value: str) -> str:
    """RFC 5322 unfolding: a CRLF (or LF) followed by white space is not part of the value."""
    return re.sub(r"\r?\n(?=[ \t])", "", value or "").replace("\r", "").replace("\n", "")


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
        subject=_decode(first("subject")),
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


class SMTPSender:
    def __init__(self, settings: SMTPSettings):
        self.settings = settings

    def send(self, raw: bytes, mail_from: str, recipients: list[str]) -> None:
        s = self.settings
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
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
            code = getattr(exc, "smtp_code", None)
            if isinstance(exc, smtplib.SMTPRecipientsRefused):
                codes = [c for c, _ in exc.recipients.values()]
                code = min(codes) if codes else None
            error = PermanentTransportError if code and code >= 500 else TransportError
            raise error(f"SMTP {s.host}:{s.port}: {type(exc).__name__}: {exc}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TransportError(f"SMTP {s.host}:{s.port}: {type(exc).__name__}: {exc}") from exc
        if refused:
            log.warning("SMTP refused some recipients: %s", sorted(refused))


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
