"""Both authentication layers: the sender whitelist and the subject token.

Tokens are stored hashed (scrypt, a salt per token) in a JSON file outside the
repository; a token in clear exists only in the subject of a command email
and, once, on the terminal of whoever ran `athome token add`. Checking a
token compares it against every enabled entry (hmac.compare_digest), so the
time taken does not depend on which entry matched or how much of it.
"""

from __future__ import annotations

import email.policy
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dispatcher.errors import AthomeError, AuthError

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"[0-9A-F]{8}", re.ASCII)
# scrypt cost: ~20 ms per check on the reference machine; 8 hex digits are a
# small space, so a stolen tokens file must not be cheap to reverse.
_SCRYPT = {"n": 2**13, "r": 8, "p": 1}
_ADDRESS = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+",
    re.ASCII,
)


def valid_address(addr: str) -> bool:
    return bool(_ADDRESS.fullmatch(addr or "")) and len(addr) <= 254


def sender_address(from_header: str) -> str:
    """The single address of a raw From header, lower-cased; several, none or a malformed
    header is an AuthError. Parsed the way mail clients and DMARC do (RFC 5322 with
    encoded words only in display names), so an encoded word cannot smuggle an address."""
    try:
        header = email.policy.default.header_factory("From", from_header or "")
        addresses = [a.addr_spec for a in header.addresses]
    except Exception as exc:  # the parser's own errors on hostile input
        raise AuthError("sender", f"unparsable From ({type(exc).__name__})") from None
    if header.defects:
        raise AuthError("sender", "malformed From header")
    if len(addresses) != 1:
        raise AuthError("sender", f"{len(addresses)} addresses in From")
    addr = addresses[0].strip().lower()
    if not valid_address(addr):
        raise AuthError("sender", "malformed From address")
    return addr


class SenderWhitelist:
    """Allowed senders: inline addresses plus a file (one per line, '#' comments),
    re-read whenever the file changes, so no restart is needed."""

    def __init__(self, inline: list[str] | None = None, path: str | os.PathLike | None = None):
        self.inline = {a.strip().lower() for a in inline or [] if a.strip()}
        self.path = Path(path) if path else None
        self._mtime: float | None = None
        self._from_file: set[str] = set()

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            # Being replaced (config management), or deleted by mistake: never treat it as
            # "nobody may send", which would drop commands silently.
            if self._mtime is not None:
                log.error("senders file %s is missing; keeping the last list read", self.path)
                return
            raise AthomeError(f"senders file {self.path} does not exist") from None
        if mtime == self._mtime:
            return
        addrs = set()
        for line in self.path.read_text().splitlines():
            line = line.split("#", 1)[0].strip().lower()
            if line:
                addrs.update(a.strip() for a in line.split(",") if a.strip())
        self._from_file, self._mtime = addrs, mtime

    def addresses(self) -> set[str]:
        self._reload()
        return self.inline | self._from_file

    def allows(self, address: str) -> bool:
        return address.lower() in self.addresses()


def _hash(token: str, salt: bytes) -> str:
    digest = hashlib.scrypt(token.upper().encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def _verify(token: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            token.upper().encode(), salt=bytes.fromhex(salt), dklen=32, n=int(n), r=int(r), p=int(p)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def weak_token(token: str) -> bool:
    """Trivially guessable: one repeated digit, a run (12345678), or a hex word."""
    t = token.upper()
    if len(set(t)) <= 2:
        return True
    digits = "0123456789ABCDEF"
    if t in digits or t in digits[::-1]:
        return True
    return t in {"DEADBEEF", "CAFEBABE", "BADC0FFE", "FEEDFACE", "C0FFEE00", "ABCDEF01", "8BADF00D"}


@dataclass
class TokenEntry:
    id: str
    description: str
    hash: str
    enabled: bool = True
    commands: list[str] | None = None  # None: every non-admin command
    created: float = field(default_factory=time.time)
    admin: bool = False


class TokenStore:
    """The hashed tokens file. Re-read when it changes on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mtime: float | None = None
        self._entries: list[TokenEntry] = []

    # reading ---------------------------------------------------------------
    def entries(self) -> list[TokenEntry]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text() or "[]")
                entries = [TokenEntry(**e) for e in data]
            except (OSError, ValueError, TypeError) as exc:
                if self._mtime is None:
                    raise AthomeError(f"tokens file {self.path} is unreadable: {exc}") from exc
                log.error("tokens file %s is unreadable (%s); keeping the last version read", self.path, exc)
                return list(self._entries)
            self._entries, self._mtime = entries, mtime
        return list(self._entries)

    def match(self, token: str) -> TokenEntry | None:
        """The enabled entry this token belongs to. Checks every entry (no early exit)."""
        if not _TOKEN_RE.fullmatch((token or "").upper()):
            return None
        found = None
        for entry in self.entries():
            if _verify(token, entry.hash) and entry.enabled and found is None:
                found = entry
        return found

    # writing ---------------------------------------------------------------
    def _save(self, entries: list[TokenEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:  # keep the owner (the service user) when root edits the file
            st = self.path.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(e) for e in entries], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._mtime = None

    def _next_id(self, entries: list[TokenEntry]) -> str:
        used = {e.id for e in entries}
        n = len(entries) + 1
        while f"t{n}" in used:
            n += 1
        return f"t{n}"

    def add(
        self,
        description: str,
        commands: list[str] | None = None,
        admin: bool = False,
        token: str | None = None,
    ) -> tuple[TokenEntry, str]:
        """Create a token; returns (entry, token in clear). The clear token is not stored."""
        entries = self.entries()
        if token is None:
            while True:
                token = secrets.token_hex(4).upper()
                if not weak_token(token):
                    break
        token = token.upper()
        if not _TOKEN_RE.fullmatch(token):
            raise AthomeError("a token is 8 hexadecimal digits")
        if any(_verify(token, e.hash) for e in entries):
            raise AthomeError("that token is already in the store")
        entry = TokenEntry(
            id=self._next_id(entries),
            description=description,
            hash=_hash(token, secrets.token_bytes(16)),
            commands=[c.upper() for c in commands] if commands else None,
            admin=admin,
        )
        self._save([*entries, entry])
        return entry, token

    def set_enabled(self, token_id: str, enabled: bool) -> TokenEntry:
        entries = self.entries()
        for e in entries:
            if e.id == token_id:
                e.enabled = enabled
                self._save(entries)
                return e
        raise AthomeError(f"no token with id {token_id}")

    def import_legacy(self, legacy_path: str | os.PathLike, allow_weak: bool = False) -> list[str]:
        """Import the legacy tokens.json ([{token, description, enabled}]); returns notes.

        Guessable tokens are imported disabled unless allow_weak."""
        notes = []
        data = json.loads(Path(legacy_path).read_text())
        for item in data:
            token = str(item.get("token", "")).upper()
            desc = str(item.get("description", ""))
            if not _TOKEN_RE.fullmatch(token):
                notes.append(f"skipped a malformed token ({desc or 'no description'})")
                continue
            enabled = bool(item.get("enabled", True))
            weak = weak_token(token)
            try:
                entry, _ = self.add(desc or "imported", token=token)
            except AthomeError:
                notes.append(f"skipped a duplicate token ({desc})")
                continue
            if weak and not allow_weak:
                enabled = False
                notes.append(f"{entry.id} ({desc}): guessable token imported DISABLED")
            if not enabled:
                self.set_enabled(entry.id, False)
            notes.append(f"{entry.id} ({desc}): imported, {'enabled' if enabled else 'disabled'}")
        return notes


@dataclass(frozen=True)
class Identity:
    sender: str
    token_id: str
    token_description: str
    admin: bool


def authenticate(
    from_header: str, token: str | None, whitelist: SenderWhitelist, store: TokenStore
) -> Identity:
    """Both layers. AuthError reasons: 'sender' (not whitelisted / malformed), 'token'."""
    sender = sender_address(from_header)
    if not whitelist.allows(sender):
        raise AuthError("sender", "not on the whitelist")
    if not token:
        raise AuthError("token", "missing")
    entry = store.match(token)
    if entry is None:
        raise AuthError("token", "invalid or disabled")
    return Identity(sender, entry.id, entry.description, entry.admin)


def may_run(identity: Identity, store: TokenStore, command: str, admin_only: bool) -> bool:
    if admin_only and not identity.admin:
        return False
    entry = next((e for e in store.entries() if e.id == identity.token_id), None)
    if entry is None:
        return False
    return entry.commands is None or command in entry.commands or command in ("HELP", "STATUS")
