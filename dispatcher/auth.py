"""Who may command athome: the sender whitelist and the subject tokens bound to senders.

Tokens are stored hashed in a JSON file outside the repository; a token in
clear exists only in the subject of a command email and, once, on the terminal
of whoever ran `athome token add` (or `rotate`). Each entry keeps two digests:
an HMAC of the token under the server key (found in one dictionary look-up,
so a wrong token costs microseconds, not a slow hash per entry) and a scrypt
hash with a salt of its own (checked for the one entry found, so a stolen
tokens file without the key cannot be brute-forced cheaply).

A token is bound to the senders that may use it (addresses or `@domain`); a
token used by another sender is refused exactly like an unknown one, so a
reply never reveals that a token exists for somebody else.
"""

from __future__ import annotations

import contextlib
import email.policy
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email

from dispatcher.errors import AthomeError, AuthError
from dispatcher.grammar import TOKEN_MAX, TOKEN_MIN

log = logging.getLogger(__name__)

NEW_TOKEN_HEX = 16  # `athome token add` makes 64-bit tokens
_TOKEN_RE = re.compile(rf"[0-9A-F]{{{TOKEN_MIN},{TOKEN_MAX}}}", re.ASCII)
# scrypt cost: ~20 ms per check on the reference machine, paid only for the one
# entry the HMAC look-up found.
_SCRYPT = {"n": 2**13, "r": 8, "p": 1}
# Conservative: what staff addresses look like, nothing a template, a shell or a
# YAML parser could read as syntax.
_ADDRESS = re.compile(r"[A-Za-z0-9._+\-]{1,64}@[A-Za-z0-9.\-]{1,189}", re.ASCII)
_KEY_CHECK = b"athome-ops server key check"
STORE_VERSION = 2
BACKUPS_KEPT = 20  # senders-file backups kept after a change
MAX_FROM_CHARS = 1024


def valid_address(addr: str) -> bool:
    """A conservative address: letters, digits, '.', '-', '_', '+' and one '@', with a
    domain that has a dot (email-validator's syntax rules, never a DNS look-up)."""
    if not addr or len(addr) > 254 or not _ADDRESS.fullmatch(addr):
        return False
    try:
        # No DNS, ever; test_environment also admits the reserved .test domain (RFC 2606)
        # that the loopback tests use. Other special-use names (.invalid, .local) stay refused.
        validate_email(addr, check_deliverability=False, allow_smtputf8=False, test_environment=True)
    except EmailNotValidError:
        return False
    return True


def unfold(value: str) -> str:
    """RFC 5322 unfolding: a CRLF (or LF) followed by white space is not part of the value."""
    return re.sub(r"\r?\n(?=[ \t])", "", value or "").replace("\r", "").replace("\n", "")


def sender_address(from_header: str) -> str:
    """The single address of a From header, lower-cased; several, none or a malformed
    header is an AuthError. Parsed the way mail clients and DMARC do (RFC 5322 with
    encoded words only in display names, email.policy.default), so an encoded word
    cannot smuggle an address; folded headers are unfolded first."""
    from_header = unfold(from_header)
    if len(from_header) > MAX_FROM_CHARS:
        # The standard parser slows down sharply on long address headers (seconds at
        # 20 kB): refuse before parsing. A real From is well under 200 characters.
        raise AuthError("sender", f"From header of {len(from_header)} characters")
    try:
        header = email.policy.default.header_factory("From", from_header)
        addresses = [a.addr_spec for a in header.addresses]
    except Exception as exc:  # the parser's own errors on hostile input
        raise AuthError("sender", f"unparsable From ({type(exc).__name__})") from None
    if header.defects:
        raise AuthError("sender", "malformed From header")
    if len(addresses) != 1:
        raise AuthError("sender", f"{len(addresses)} addresses in From")
    addr = addresses[0].strip().lower()
    if not valid_address(addr):
        raise AuthError("sender", "From address outside the accepted character set")
    return addr


def domain_of(address: str) -> str:
    return address.rsplit("@", 1)[-1].lower()


class SenderWhitelist:
    """Allowed senders: inline addresses plus a file (one per line, '#' comments),
    re-read whenever the file changes, so no restart is needed. An entry that is not
    a conservative address is ignored (and reported by `athome check`)."""

    def __init__(self, inline: list[str] | None = None, path: str | os.PathLike | None = None):
        self.inline = {a.strip().lower() for a in inline or [] if a.strip()}
        self.path = Path(path) if path else None
        self._mtime: float | None = None
        self._from_file: set[str] = set()
        self.rejected: list[str] = []

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
        addrs, rejected = set(), []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip().lower()
            for addr in (a.strip() for a in line.split(",")):
                if not addr:
                    continue
                if valid_address(addr):
                    addrs.add(addr)
                else:
                    rejected.append(f"{self.path}:{n}: {addr!r} is not an accepted address; ignored")
        for problem in rejected:
            log.error("senders file: %s", problem)
        self._from_file, self._mtime, self.rejected = addrs, mtime, rejected

    def addresses(self) -> set[str]:
        self._reload()
        return self.inline | self._from_file

    def allows(self, address: str) -> bool:
        return address.lower() in self.addresses()

    # changing the file (WHITELIST by email, `athome whitelist`) -----------------
    def add(self, address: str) -> bool:
        """Add an address to the senders file; False when it was already allowed."""
        address = address.strip().lower()
        if not valid_address(address):
            raise AthomeError(f"{address!r} is not an accepted address")
        with self._file_lock():
            if address in self.addresses():
                return False
            lines = self._lines()
            self._rewrite([*lines, address])
        return True

    def remove(self, address: str) -> bool:
        """Remove an address from the senders file; False when it was not in it. An inline
        address (in the config) cannot be removed here: AthomeError."""
        address = address.strip().lower()
        if address in self.inline:
            raise AthomeError(f"{address} is in the config file (auth.senders), not in the senders file")
        with self._file_lock():
            self._reload()
            if address not in self._from_file:
                return False
            kept = []
            for line in self._lines():
                body, hash_, comment = line.partition("#")
                parts = [a.strip() for a in body.split(",") if a.strip()]
                if address not in (a.lower() for a in parts):
                    kept.append(line)
                    continue
                rest = [a for a in parts if a.lower() != address]
                if rest or comment.strip():
                    kept.append(", ".join(rest) + (f"  {hash_}{comment}" if hash_ else ""))
            self._rewrite(kept)
        return True

    def _require_file(self) -> Path:
        if self.path is None:
            raise AthomeError("no senders file is configured (auth.senders_file)")
        return self.path

    def _lines(self) -> list[str]:
        path = self._require_file()
        return path.read_text().splitlines() if path.exists() else []

    @contextlib.contextmanager
    def _file_lock(self):
        path = self._require_file()
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _rewrite(self, lines: list[str]) -> None:
        """Replace the file atomically, after a timestamped backup of the list it replaces
        (the newest BACKUPS_KEPT are kept in <file>.backups/)."""
        path = self._require_file()
        if path.exists():
            backups = path.with_name(f"{path.name}.backups")
            backups.mkdir(mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
            shutil.copy2(path, backups / f"{path.name}.{stamp}")
            for old in sorted(backups.iterdir())[:-BACKUPS_KEPT]:
                old.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                st = path.stat()
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, st.st_mode & 0o777)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._mtime = None


# ------------------------------------------------------------------ the server key


class ServerKey:
    """The server-side secret for every HMAC athome computes (token look-up, message
    ledger, counters). Given by value (an environment variable) or by a file outside
    the repository, which `athome token add` creates (0600) when it does not exist."""

    def __init__(self, path: str | os.PathLike | None = None, value: str | None = None):
        self.path = Path(path) if path else None
        self._value = value.encode() if value else None

    def get(self, create: bool = False) -> bytes:
        if self._value is not None:
            return self._value
        if self.path is None:
            raise AthomeError("no server key configured (auth.key_file or auth.key_env)")
        try:
            data = self.path.read_bytes().strip()
        except FileNotFoundError:
            if not create:
                raise AthomeError(
                    f"server key {self.path} does not exist (`athome token add` creates it)"
                ) from None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = secrets.token_hex(32).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data + b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("created the server key %s (keep it: tokens cannot be checked without it)", self.path)
        if len(data) < 32:
            raise AthomeError(f"server key {self.path} is too short (at least 32 characters)")
        self._value = data
        return data

    def digest(self, *parts: str) -> str:
        """HMAC-SHA256 of the parts (NUL-separated), hex: names that reveal nothing."""
        return hmac.new(self.get(), "\0".join(parts).encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def check_value(self) -> str:
        return hmac.new(self.get(), _KEY_CHECK, hashlib.sha256).hexdigest()[:16]


# ------------------------------------------------------------------------ tokens


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


def valid_binding(sender: str) -> bool:
    """A token binding: an address, or '@domain' for every address of that domain."""
    if sender.startswith("@"):
        return valid_address("x" + sender)
    return valid_address(sender)


@dataclass
class TokenEntry:
    id: str
    description: str
    hash: str
    lookup: str = ""  # HMAC of the token under the server key
    senders: list[str] = field(default_factory=list)  # addresses or "@domain"
    enabled: bool = True
    commands: list[str] | None = None  # None: every non-admin command
    created: float = field(default_factory=time.time)
    expires: float | None = None
    legacy: bool = False  # came from the legacy tokens.json: known in clear, rotate it
    admin: bool = False

    def allows_sender(self, sender: str) -> bool:
        sender = sender.lower()
        return sender in self.senders or f"@{domain_of(sender)}" in self.senders

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now or time.time()) >= self.expires


# Why a token was refused: the stable code, and what the requester is told (pt-BR).
# 'not-bound' and 'disabled' are told the same as 'unknown': a reply never says
# whether a token exists for another sender.
TOKEN_PROBLEMS = {
    "missing": "token ausente: o assunto deve começar com [SEU TOKEN]",
    "malformed": "token em formato inválido",
    "unknown": "token desconhecido, desativado ou não autorizado para este remetente",
    "not-bound": "token desconhecido, desativado ou não autorizado para este remetente",
    "disabled": "token desconhecido, desativado ou não autorizado para este remetente",
    "expired": "token expirado: peça um novo ao administrador",
    "locked": "remetente bloqueado temporariamente após tentativas com token inválido",
}


def check_token(
    entries: Sequence[TokenEntry],
    lookup: Callable[[str], str],
    token: str | None,
    sender: str,
    now: float | None = None,
) -> TokenEntry:
    """The entry this token belongs to, for this sender; AuthError('token', code) with a
    code of TOKEN_PROBLEMS otherwise. One HMAC (`lookup`, under the server key), and one
    scrypt for the entry found. No I/O: `entries` is a snapshot of the tokens file."""
    if not token:
        raise AuthError("token", "missing")
    token = token.upper()
    if not _TOKEN_RE.fullmatch(token):
        raise AuthError("token", "malformed")
    digest = lookup(token)
    entry = next((e for e in entries if e.lookup and hmac.compare_digest(e.lookup, digest)), None)
    if entry is None:
        raise AuthError("token", "unknown")
    # The binding before the slow hash: a token of another sender costs what an unknown
    # one costs, so not even the time taken tells the requester that it exists.
    if not entry.allows_sender(sender):
        raise AuthError("token", "not-bound", entry.id)
    if not _verify(token, entry.hash):
        raise AuthError("token", "unknown")
    if not entry.enabled:
        raise AuthError("token", "disabled", entry.id)
    if entry.expired(now):
        raise AuthError("token", "expired", entry.id)
    return entry


class TokenStore:
    """The hashed tokens file. Re-read when it changes on disk."""

    def __init__(self, path: str | os.PathLike, key: ServerKey | None = None):
        self.path = Path(path)
        self.key = key or ServerKey(self.path.with_name("athome.key"))
        self._mtime: float | None = None
        self._entries: list[TokenEntry] = []
        self._key_check = ""

    # reading ---------------------------------------------------------------
    def _read(self) -> tuple[list[TokenEntry], str]:
        data = json.loads(self.path.read_text() or "[]")
        if isinstance(data, list):  # version 1: a bare list, no look-up digests, no senders
            items, check = data, ""
        elif isinstance(data, dict) and isinstance(data.get("tokens"), list):
            items, check = data["tokens"], str(data.get("key_check", ""))
        else:
            raise ValueError("neither a list nor {'tokens': [...]}")
        names = {f.name for f in fields(TokenEntry)}
        return [TokenEntry(**{k: v for k, v in e.items() if k in names}) for e in items], check

    def entries(self) -> list[TokenEntry]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime != self._mtime:
            try:
                entries, check = self._read()
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                if self._mtime is None:
                    raise AthomeError(f"tokens file {self.path} is unreadable: {exc}") from exc
                log.error("tokens file %s is unreadable (%s); keeping the last version read", self.path, exc)
                return list(self._entries)
            self._entries, self._key_check, self._mtime = entries, check, mtime
        return list(self._entries)

    def lookup(self, token: str) -> str:
        return self.key.digest("token", token.upper())

    def check(self, token: str | None, sender: str, now: float | None = None) -> TokenEntry:
        """The entry this token belongs to, for this sender (see `check_token`)."""
        return check_token(self.entries(), self.lookup, token, sender, now)

    def problems(self, now: float | None = None, soon_days: float = 7) -> tuple[list[str], list[str]]:
        """(problems, warnings) for `athome check`."""
        now = now or time.time()
        problems, warnings = [], []
        entries = self.entries()
        if entries and self._key_check:
            try:
                if not hmac.compare_digest(self._key_check, self.key.check_value()):
                    problems.append(
                        f"tokens file {self.path}: written under another server key; no token can match"
                    )
            except AthomeError as exc:
                problems.append(str(exc))
        for e in entries:
            if not e.enabled:
                continue
            if not e.lookup:
                problems.append(f"token {e.id} ({e.description}): made by an older version; rotate it")
            if not e.senders:
                problems.append(f"token {e.id} ({e.description}): bound to no sender; nobody can use it")
            if e.expired(now):
                warnings.append(f"token {e.id} ({e.description}): expired {_day(e.expires)}")
            elif e.expires is not None and e.expires - now < soon_days * 86400:
                warnings.append(f"token {e.id} ({e.description}): expires {_day(e.expires)}; rotate it")
            if e.legacy and not e.expired(now):
                warnings.append(
                    f"token {e.id} ({e.description}): a legacy token (known in clear); "
                    f"rotate it before {_day(e.expires) if e.expires else 'going live'}"
                )
        if not any(e.enabled and e.lookup and e.senders and not e.expired(now) for e in entries):
            problems.append(f"tokens file {self.path}: no usable token (athome token add)")
        return problems, warnings

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
        document = {
            "version": STORE_VERSION,
            "key_check": self.key.check_value(),
            "tokens": [asdict(e) for e in entries],
        }
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._mtime = None

    def _next_id(self, entries: list[TokenEntry]) -> str:
        used = {e.id for e in entries}
        n = len(entries) + 1
        while f"t{n}" in used:
            n += 1
        return f"t{n}"

    @staticmethod
    def _senders(senders: list[str]) -> list[str]:
        out = [s.strip().lower() for s in senders if s.strip()]
        bad = [s for s in out if not valid_binding(s)]
        if bad:
            raise AthomeError(f"not an address or @domain: {', '.join(bad)}")
        if not out:
            raise AthomeError("a token is bound to at least one sender (--sender ADDRESS or @domain)")
        return sorted(set(out))

    def _new_token(self, entries: list[TokenEntry], token: str | None, length: int) -> str:
        if token is None:
            if not TOKEN_MIN <= length <= TOKEN_MAX:
                raise AthomeError(f"a token has {TOKEN_MIN} to {TOKEN_MAX} hexadecimal digits")
            while True:
                token = secrets.token_hex((length + 1) // 2)[:length].upper()
                if not weak_token(token):
                    break
        token = token.upper()
        if not _TOKEN_RE.fullmatch(token):
            raise AthomeError(f"a token is {TOKEN_MIN} to {TOKEN_MAX} hexadecimal digits")
        digest = self.lookup(token)
        if any(e.lookup == digest or (not e.lookup and _verify(token, e.hash)) for e in entries):
            raise AthomeError("that token is already in the store")
        return token

    def add(
        self,
        description: str,
        senders: list[str],
        commands: list[str] | None = None,
        admin: bool = False,
        token: str | None = None,
        length: int = NEW_TOKEN_HEX,
        expires: float | None = None,
        legacy: bool = False,
        enabled: bool = True,
    ) -> tuple[TokenEntry, str]:
        """Create a token; returns (entry, token in clear). The clear token is not stored."""
        self.key.get(create=True)
        entries = self.entries()
        token = self._new_token(entries, token, length)
        entry = TokenEntry(
            id=self._next_id(entries),
            description=description,
            hash=_hash(token, secrets.token_bytes(16)),
            lookup=self.lookup(token),
            senders=self._senders(senders),
            commands=[c.upper() for c in commands] if commands else None,
            admin=admin,
            expires=expires,
            legacy=legacy,
            enabled=enabled,
        )
        self._save([*entries, entry])
        return entry, token

    def _update(self, token_id: str, change) -> TokenEntry:
        entries = self.entries()
        for e in entries:
            if e.id == token_id:
                change(e)
                self._save(entries)
                return e
        raise AthomeError(f"no token with id {token_id}")

    def set_enabled(self, token_id: str, enabled: bool) -> TokenEntry:
        return self._update(token_id, lambda e: setattr(e, "enabled", enabled))

    def rotate(self, token_id: str, length: int = NEW_TOKEN_HEX) -> tuple[TokenEntry, str]:
        """Replace a token by a new random one (same id, senders, commands); the old one
        stops working at once. Returns (entry, new token in clear)."""
        self.key.get(create=True)
        token = self._new_token(self.entries(), None, length)

        def change(e: TokenEntry) -> None:
            e.hash, e.lookup = _hash(token, secrets.token_bytes(16)), self.lookup(token)
            e.created, e.expires, e.legacy = time.time(), None, False

        return self._update(token_id, change), token

    def import_legacy(
        self,
        legacy_path: str | os.PathLike,
        senders: list[str],
        expires_days: float = 30,
        allow_weak: bool = False,
        commands: list[str] | None = None,
    ) -> list[str]:
        """Import the legacy tokens.json ({"tokens": [{token, description, enabled}]} or a
        bare list), bound to `senders`, expiring, marked legacy, scoped to `commands` when
        given (None: every non-admin command); returns notes.

        They were stored and committed in clear: guessable ones come in disabled unless
        allow_weak, and every one should be rotated before it expires."""
        path = Path(legacy_path)
        senders = self._senders(senders)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise AthomeError(f"{path}: {exc.strerror}") from None
        except ValueError as exc:
            raise AthomeError(f"{path}: not valid JSON: {exc}") from None
        items: Any = data.get("tokens") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise AthomeError(f'{path}: expected {{"tokens": [...]}} or a list of tokens')
        for n, item in enumerate(items, 1):
            if not isinstance(item, dict) or not isinstance(item.get("token", ""), str):
                raise AthomeError(
                    f'{path}: entry {n} is not an object with a "token" string ({type(item).__name__})'
                )
        notes = []
        expires = time.time() + expires_days * 86400
        for n, item in enumerate(items, 1):
            token = item.get("token", "").strip().upper()
            desc = str(item.get("description", "")) or f"legacy entry {n}"
            if not _TOKEN_RE.fullmatch(token):
                notes.append(f"entry {n} ({desc}): skipped, not {TOKEN_MIN}-{TOKEN_MAX} hex digits")
                continue
            enabled = item.get("enabled", True) is not False
            if weak_token(token) and not allow_weak and enabled:
                enabled = False
                notes.append(f"entry {n} ({desc}): guessable token imported DISABLED")
            try:
                entry, _ = self.add(
                    desc, senders, commands, token=token, expires=expires, legacy=True, enabled=enabled
                )
            except AthomeError as exc:
                notes.append(f"entry {n} ({desc}): skipped, {exc}")
                continue
            notes.append(
                f"{entry.id} ({desc}): imported {'enabled' if enabled else 'disabled'}, legacy, "
                f"bound to {', '.join(senders)}, expires {_day(expires)}"
            )
        return notes


def _day(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts)) if ts else "never"


@dataclass(frozen=True)
class Identity:
    """Who sent a command: the authenticated sender and the token that vouched for them."""

    sender: str
    token_id: str
    token_description: str
    admin: bool
    commands: tuple[str, ...] | None = None  # the token's scope; None: every non-admin command

    @classmethod
    def of(cls, sender: str, entry: TokenEntry) -> Identity:
        scope = None if entry.commands is None else tuple(entry.commands)
        return cls(sender, entry.id, entry.description, entry.admin, scope)


def may_run(identity: Identity, command: str, permission: str) -> bool:
    """`permission` is the command's (commands.ALWAYS / TOKEN / ADMIN)."""
    if permission == "admin":
        return identity.admin
    if permission == "always":
        return True
    return identity.commands is None or command in identity.commands
