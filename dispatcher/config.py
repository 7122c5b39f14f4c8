"""The configuration file: one YAML document, secrets only by reference.

`--config PATH` or ATHOME_CONFIG. Relative paths in the file are relative to
the file's own directory. Passwords are never written in the file: each
secret is named by `<name>_env` (an environment variable) or `<name>_file`
(a file outside the repository). `load()` reads the secrets once and removes
the environment variables from os.environ, so child processes (ansible,
ssh) and ansible-runner's artifacts never see them.

S3 keys are read by boto3 inside a playbook, so they must reach it without
sitting in any process's environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
/ AWS_SESSION_TOKEN found in os.environ are moved into
<state_dir>/aws/credentials (0600, profile `default`) and only the path is left
in AWS_SHARED_CREDENTIALS_FILE. `recordings.aws_credentials_file` names such a
file directly instead.

See config/athome.example.yml for every key with its meaning.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from dispatcher.errors import ConfigError

if TYPE_CHECKING:
    from dispatcher.gitinventory import GitSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
SECURITY = ("tls", "starttls", "plain")
# Secrets taken out of os.environ by load(), so a second load in the same process still finds them.
_TAKEN: dict[str, str] = {}
# The standard-chain variables that carry S3 secrets, and their names in a credentials file.
AWS_SECRET_VARS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


@dataclass
class IMAPSettings:
    host: str = ""
    port: int = 993
    security: str = "tls"
    user: str = ""
    password: str = field(default="", repr=False)
    folder: str = "INBOX"
    processed_folder: str = ""  # move handled messages there; empty: only flag them \Seen
    quarantine_folder: str = ""  # move messages set aside there; empty: only flag them
    cafile: str = ""
    timeout: int = 60


# Outgoing mail limits, counted in recipients (To + Cc of every message sent) over sliding
# windows. Google applies its limits "over a rolling 24-hour period": free Gmail about 500
# recipients a day (developer.nylas.com/docs/cookbook/email/gmail-smtp-settings: "Daily
# limit (personal) 500 messages"); Google Workspace 2,000 messages a day, 10,000 recipients
# in all, 100 per message sent over SMTP (support.google.com/a/answer/166852, "Gmail
# sending limits in Google Workspace"). Past a limit Google refuses all sending "for up to
# 24 hours", so athome stays below it: 450 a day leaves free Gmail room for a person using
# the account, 150 an hour keeps a morning's flood from spending the whole day.
MAX_RECIPIENTS_PER_HOUR = 150
MAX_RECIPIENTS_PER_DAY = 450


@dataclass
class SMTPSettings:
    host: str = ""
    port: int = 587
    security: str = "starttls"
    user: str = ""
    password: str = field(default="", repr=False)
    cafile: str = ""
    timeout: int = 60
    max_recipients_per_hour: int = MAX_RECIPIENTS_PER_HOUR  # 0: no hourly limit
    max_recipients_per_day: int = MAX_RECIPIENTS_PER_DAY  # 0: no daily limit
    # After a temporary failure (server down, 4xx) sending waits retry_first_seconds, then
    # twice as long after each further failure in a row, at most retry_max_seconds.
    retry_first_seconds: float = 15.0
    retry_max_seconds: float = 600.0


MAX_WINDOW_DAYS = 91  # RAMAIS windows: below the recordings module's own limit (92 days)


@dataclass
class Config:
    path: Path | None = None
    state_dir: Path = Path("/var/lib/athome")
    inventory: Path = REPO_ROOT / "inventory" / "production"
    inventory_git: GitSettings | None = None  # inventory.git: fetched, checked, then used
    transport: str = "imap"  # imap (IMAP in, SMTP out) | maildir (embedded, for the demo)
    imap: IMAPSettings = field(default_factory=IMAPSettings)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    maildir_inbox: Path | None = None
    maildir_outbox: Path | None = None
    from_address: str = ""
    admin_addresses: list[str] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    senders_file: Path | None = None
    tokens_file: Path = Path("/etc/athome/tokens.json")
    key_file: Path | None = None  # the server key for every HMAC (default: athome.key beside tokens_file)
    key_value: str = field(default="", repr=False)  # the same, from auth.key_env
    # Authentication-Results (RFC 8601) of the receiving mail server
    ar_required: bool = True
    trusted_authserv_ids: list[str] = field(default_factory=list)
    max_age_hours: float = 24.0  # a command older than this is refused (replays, old mail)
    max_future_minutes: float = 10.0
    lockout_failures: int = 5  # bad tokens per sender within lockout_window_minutes...
    lockout_window_minutes: float = 15.0
    lockout_cooldown_minutes: float = 15.0  # ...lock the sender out for this long
    flood_alert: int = 50  # bad tokens of all senders within the window: the admins are told once
    max_window_days: int = 31
    confirm: set[str] = field(default_factory=set)  # commands run only after a CONFIRMAR reply
    confirm_minutes: float = 30.0  # how long a confirmation code is valid
    max_attempts: int = 3
    retry_backoff: list[int] = field(default_factory=lambda: [60, 300, 900])
    playbook_timeout: int = 900
    artifacts_max_age_days: float = 14.0
    retention_days: float = 90.0
    poll_interval: float = 30.0
    concurrency: int = 2  # worker threads: jobs on different hosts at once (1: one job at a time)
    brand: str = "ATHome"
    timezone: str = "America/Sao_Paulo"  # times shown to requesters (zoneinfo name)
    down_after_minutes: float = 15.0  # athome status: mailbox not read for this long -> down
    degraded_after_minutes: float = 30.0  # a job or reply waiting this long -> degraded
    aws_credentials_file: Path | None = None  # what AWS_SHARED_CREDENTIALS_FILE points to, if set here
    secret_problems: list[str] = field(default_factory=list)

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "queue"

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def seen_dir(self) -> Path:
        return self.state_dir / "seen"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def run_dir(self) -> Path:
        """Private data dirs of the playbook runs in progress (removed after each run)."""
        return self.state_dir / "run"

    @property
    def aws_dir(self) -> Path:
        return self.state_dir / "aws"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def audit_dir(self) -> Path:
        return self.state_dir / "audit"

    @property
    def throttle_dir(self) -> Path:
        return self.state_dir / "throttle"

    def server_key(self):
        from dispatcher.auth import ServerKey

        if self.key_value:
            return ServerKey(value=self.key_value)
        return ServerKey(self.key_file or self.tokens_file.with_name("athome.key"))


def _secret(section: dict[str, Any], name: str, where: str, problems: list[str]) -> str:
    if name in section:
        problems.append(
            f"{where}.{name}: secrets are not accepted in the config file; "
            f"use {name}_env (environment variable) or {name}_file (a file outside the repo)"
        )
        return ""
    env_name = section.get(f"{name}_env")
    file_name = section.get(f"{name}_file")
    if env_name:
        value = os.environ.pop(env_name, None)
        if value is not None:
            _TAKEN[env_name] = value
        value = _TAKEN.get(env_name)
        if value is None:
            problems.append(f"{where}.{name}_env: environment variable {env_name} is not set")
            return ""
        return value
    if file_name:
        try:
            return Path(file_name).expanduser().read_text().strip()
        except OSError as exc:
            problems.append(f"{where}.{name}_file: cannot read {file_name}: {exc.strerror}")
            return ""
    return ""


def write_aws_credentials(path: str | os.PathLike, keys: dict[str, str]) -> Path:
    """Write a shared-credentials file (profile `default`) atomically, mode 0600 (its dir,
    if it has to be made, 0700).

    `keys` uses the file's names (aws_access_key_id, aws_secret_access_key, aws_session_token).
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    parser = configparser.RawConfigParser()
    parser["default"] = keys
    fd, tmp = tempfile.mkstemp(prefix=".credentials.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            parser.write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _cloud_credentials(cfg: Config, section: dict[str, Any], base: Path, problems: list[str]) -> None:
    """Take the S3 keys out of the environment (every ansible process would inherit them)
    and leave boto3 only the path of a 0600 credentials file (AWS_SHARED_CREDENTIALS_FILE)."""
    taken = {name: os.environ.pop(name) for name in AWS_SECRET_VARS if name in os.environ}
    explicit = _path(base, section.get("aws_credentials_file"))
    if explicit is not None:
        if taken:
            problems.append(
                f"recordings.aws_credentials_file: {', '.join(taken)} also set in the environment; "
                "give the S3 keys one way only"
            )
        if not os.access(explicit, os.R_OK):
            problems.append(f"recordings.aws_credentials_file: cannot read {explicit}")
        cfg.aws_credentials_file = explicit
    elif taken:
        missing = [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if n not in taken]
        if missing:
            problems.append(
                f"S3 credentials in the environment: {', '.join(taken)} without {', '.join(missing)}"
            )
            return
        target = cfg.aws_dir / "credentials"
        try:
            cfg.aws_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(cfg.aws_dir, 0o700)
            write_aws_credentials(target, {AWS_SECRET_VARS[n]: v for n, v in taken.items()})
        except OSError as exc:
            problems.append(f"S3 credentials: cannot write {target}: {exc.strerror}")
            return
        cfg.aws_credentials_file = target
    if cfg.aws_credentials_file is not None:
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(cfg.aws_credentials_file)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _addresses(value: Any, where: str, problems: list[str]) -> list[str]:
    """A YAML list of e-mail addresses (a bare string is a mistake: it is not split)."""
    from dispatcher.auth import valid_address

    if value in (None, ""):
        return []
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of addresses, e.g. [{value}]")
        return []
    out = []
    for item in value:
        addr = str(item).strip().lower()
        if not valid_address(addr):
            problems.append(f"{where}: {item!r} is not an e-mail address")
        else:
            out.append(addr)
    return out


def _number(section: dict[str, Any], key: str, default, where: str, problems: list[str], kind=int):
    value = section.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        problems.append(f"{where}.{key}: {value!r} is not a number")
        return default


def _smtp_limit_problems(smtp: SMTPSettings) -> list[str]:
    problems = []
    for key in ("max_recipients_per_hour", "max_recipients_per_day"):
        if getattr(smtp, key) < 0:
            problems.append(f"mail.smtp.{key}: must be 0 (no limit) or a positive number of recipients")
    hour, day = smtp.max_recipients_per_hour, smtp.max_recipients_per_day
    if hour > 0 and day > 0 and hour > day:
        problems.append(
            f"mail.smtp.max_recipients_per_hour ({hour}) is more than max_recipients_per_day ({day})"
        )
    if not 0 < smtp.retry_first_seconds <= smtp.retry_max_seconds:
        problems.append("mail.smtp: retry_first_seconds must be positive and at most retry_max_seconds")
    return problems


def _path(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (base / p)


def load(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config; ConfigError lists every problem found."""
    path = path or os.environ.get("ATHOME_CONFIG")
    if not path:
        raise ConfigError(["no configuration: pass --config PATH or set ATHOME_CONFIG"])
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return from_dict(data, base=path.resolve().parent, path=path)


def _inventory_git(cfg: Config, section: dict[str, Any], problems: list[str]) -> None:
    """inventory: {git: {url, branch, subdir, interval_seconds}}: jobs read the checkout
    in force, state_dir/inventory/current[/subdir] (see dispatcher/gitinventory.py)."""
    from dispatcher.gitinventory import GitInventory, GitSettings, url_problem

    unknown = set(section) - {"git"}
    git = section.get("git")
    if unknown or not isinstance(git, dict):
        problems.append("inventory: a path, or a mapping with one key, git: {url: ..., branch: ...}")
        return
    for key in set(git) - {"url", "branch", "subdir", "interval_seconds"}:
        problems.append(f"inventory.git: unknown key {key!r}")
    url = str(git.get("url") or "")
    problem = url_problem(url)
    if problem:
        problems.append(f"inventory.git: {problem}")
    subdir = str(git.get("subdir") or "").strip("/")
    if ".." in Path(subdir).parts:
        problems.append("inventory.git.subdir: must stay inside the repository")
    settings = GitSettings(
        url=url,
        branch=str(git.get("branch") or "main"),
        subdir=subdir,
        interval_seconds=_number(git, "interval_seconds", 60, "inventory.git", problems),
    )
    cfg.inventory_git = settings
    cfg.inventory = GitInventory(settings, cfg.state_dir / "inventory").path


def from_dict(data: dict[str, Any], base: Path, path: Path | None = None) -> Config:
    problems: list[str] = []
    known = {
        "state_dir",
        "inventory",
        "mail",
        "auth",
        "commands",
        "worker",
        "recordings",
        "brand",
        "timezone",
        "monitoring",
    }
    for key in data:
        if key not in known:
            problems.append(f"unknown key {key!r}")
    cfg = Config(path=path)
    cfg.state_dir = _path(base, data.get("state_dir")) or cfg.state_dir
    inv = data.get("inventory")
    if isinstance(inv, dict):
        _inventory_git(cfg, inv, problems)
    elif inv:
        cfg.inventory = _path(REPO_ROOT, inv) if not Path(inv).is_absolute() else Path(inv)
    cfg.brand = str(data.get("brand", cfg.brand))
    cfg.timezone = str(data.get("timezone", cfg.timezone))
    try:
        ZoneInfo(cfg.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        problems.append(f"timezone: {cfg.timezone!r} is not a time zone name (e.g. America/Sao_Paulo)")

    mail = data.get("mail") or {}
    cfg.transport = mail.get("transport", "imap")
    if cfg.transport not in ("imap", "maildir"):
        problems.append(f"mail.transport: {cfg.transport!r} is not imap or maildir")
    cfg.from_address = str(mail.get("from_address", ""))
    cfg.admin_addresses = _addresses(mail.get("admin_addresses"), "mail.admin_addresses", problems)
    if not cfg.from_address:
        problems.append("mail.from_address: missing (the address replies are sent from)")
    if not cfg.admin_addresses:
        problems.append("mail.admin_addresses: at least one administrator address is needed")
    if cfg.transport == "imap":
        imap = mail.get("imap") or {}
        smtp = mail.get("smtp") or {}
        cfg.imap = IMAPSettings(
            host=str(imap.get("host", "")),
            port=_number(imap, "port", 993, "mail.imap", problems),
            security=str(imap.get("security", "tls")),
            user=str(imap.get("user", "")),
            password=_secret(imap, "password", "mail.imap", problems),
            folder=str(imap.get("folder", "INBOX")),
            processed_folder=str(imap.get("processed_folder", "")),
            quarantine_folder=str(imap.get("quarantine_folder", "")),
            cafile=str(_path(base, imap.get("cafile")) or ""),
            timeout=_number(imap, "timeout", 60, "mail.imap", problems),
        )
        cfg.smtp = SMTPSettings(
            host=str(smtp.get("host", "")),
            port=_number(smtp, "port", 587, "mail.smtp", problems),
            security=str(smtp.get("security", "starttls")),
            user=str(smtp.get("user", "")),
            password=_secret(smtp, "password", "mail.smtp", problems),
            cafile=str(_path(base, smtp.get("cafile")) or ""),
            timeout=_number(smtp, "timeout", 60, "mail.smtp", problems),
            max_recipients_per_hour=_number(
                smtp, "max_recipients_per_hour", MAX_RECIPIENTS_PER_HOUR, "mail.smtp", problems
            ),
            max_recipients_per_day=_number(
                smtp, "max_recipients_per_day", MAX_RECIPIENTS_PER_DAY, "mail.smtp", problems
            ),
            retry_first_seconds=_number(smtp, "retry_first_seconds", 15.0, "mail.smtp", problems, float),
            retry_max_seconds=_number(smtp, "retry_max_seconds", 600.0, "mail.smtp", problems, float),
        )
        problems += _smtp_limit_problems(cfg.smtp)
        for name, s in (("imap", cfg.imap), ("smtp", cfg.smtp)):
            if not s.host:
                problems.append(f"mail.{name}.host: missing")
            if s.security not in SECURITY:
                problems.append(f"mail.{name}.security: {s.security!r} is not one of {SECURITY}")
            elif s.security == "plain" and s.host not in LOOPBACK_HOSTS:
                problems.append(
                    f"mail.{name}.security: plain sends the password in clear; "
                    f"only for a server on loopback, not {s.host}"
                )
        if not cfg.imap.user:
            problems.append("mail.imap.user: missing")
    else:
        md = mail.get("maildir") or {}
        cfg.maildir_inbox = _path(base, md.get("inbox"))
        cfg.maildir_outbox = _path(base, md.get("outbox"))
        if not cfg.maildir_inbox or not cfg.maildir_outbox:
            problems.append("mail.maildir: inbox and outbox paths are needed")

    auth = data.get("auth") or {}
    cfg.senders = _addresses(auth.get("senders"), "auth.senders", problems)
    cfg.senders_file = _path(base, auth.get("senders_file"))
    cfg.tokens_file = _path(base, auth.get("tokens_file")) or cfg.tokens_file
    if not cfg.senders and not cfg.senders_file:
        problems.append("auth: no senders and no senders_file: nobody could send a command")
    if "key" in auth:
        problems.append("auth.key: secrets are not accepted in the config file; use key_file or key_env")
    if auth.get("key_env"):
        cfg.key_value = _secret(auth, "key", "auth", problems)
    cfg.key_file = _path(base, auth.get("key_file"))
    ar = auth.get("authentication_results") or {}
    cfg.ar_required = bool(ar.get("required", True))
    ids = ar.get("trusted_authserv_ids") or []
    if not isinstance(ids, list):
        problems.append(
            "auth.authentication_results.trusted_authserv_ids: must be a list, e.g. [mx.google.com]"
        )
        ids = []
    cfg.trusted_authserv_ids = [str(i).strip().lower() for i in ids if str(i).strip()]
    if cfg.ar_required and not cfg.trusted_authserv_ids:
        problems.append(
            "auth.authentication_results: required, but trusted_authserv_ids is empty "
            "(the authserv-id of your mail provider, e.g. mx.google.com; see the README)"
        )
    fresh = auth.get("freshness") or {}
    cfg.max_age_hours = _number(fresh, "max_age_hours", cfg.max_age_hours, "auth.freshness", problems, float)
    cfg.max_future_minutes = _number(
        fresh, "max_future_minutes", cfg.max_future_minutes, "auth.freshness", problems, float
    )
    lock = auth.get("lockout") or {}
    cfg.lockout_failures = _number(lock, "failures", cfg.lockout_failures, "auth.lockout", problems)
    cfg.lockout_window_minutes = _number(
        lock, "window_minutes", cfg.lockout_window_minutes, "auth.lockout", problems, float
    )
    cfg.lockout_cooldown_minutes = _number(
        lock, "cooldown_minutes", cfg.lockout_cooldown_minutes, "auth.lockout", problems, float
    )
    cfg.flood_alert = _number(lock, "flood_alert", cfg.flood_alert, "auth.lockout", problems)
    if cfg.max_age_hours <= 0 or cfg.max_future_minutes < 0:
        problems.append("auth.freshness: max_age_hours must be positive and max_future_minutes not negative")
    if cfg.lockout_failures < 1 or cfg.flood_alert < 1:
        problems.append("auth.lockout: failures and flood_alert must be at least 1")
    if cfg.lockout_window_minutes <= 0 or cfg.lockout_cooldown_minutes <= 0:
        problems.append("auth.lockout: window_minutes and cooldown_minutes must be positive")

    mon = data.get("monitoring") or {}
    cfg.down_after_minutes = _number(
        mon, "down_after_minutes", cfg.down_after_minutes, "monitoring", problems, float
    )
    cfg.degraded_after_minutes = _number(
        mon, "degraded_after_minutes", cfg.degraded_after_minutes, "monitoring", problems, float
    )
    cmds = data.get("commands") or {}
    cfg.max_window_days = _number(cmds, "max_window_days", cfg.max_window_days, "commands", problems)
    if not 1 <= cfg.max_window_days <= MAX_WINDOW_DAYS:
        # The recordings module refuses windows over 92 days: the grammar must refuse first.
        days = cfg.max_window_days
        problems.append(f"commands.max_window_days: between 1 and {MAX_WINDOW_DAYS}, not {days}")
    cfg.confirm_minutes = _number(cmds, "confirm_minutes", cfg.confirm_minutes, "commands", problems, float)
    if cfg.confirm_minutes <= 0:
        problems.append("commands.confirm_minutes: must be positive")
    from dispatcher.commands import COMMANDS

    for name, section in cmds.items():
        if name in ("max_window_days", "confirm_minutes"):
            continue
        spec = COMMANDS.get(str(name).upper())
        if spec is None or not isinstance(section, dict):
            problems.append(f"commands.{name}: not a command (one of {', '.join(COMMANDS)}) with settings")
            continue
        if section.get("confirm"):
            if not spec.confirmable:
                problems.append(f"commands.{name}.confirm: {spec.name} cannot be confirmed by reply")
            cfg.confirm.add(spec.name)
    worker = data.get("worker") or {}
    cfg.max_attempts = _number(worker, "max_attempts", cfg.max_attempts, "worker", problems)
    backoff = worker.get("retry_backoff", cfg.retry_backoff)
    try:
        cfg.retry_backoff = [int(x) for x in backoff]
    except (TypeError, ValueError):
        problems.append(f"worker.retry_backoff: {backoff!r} is not a list of seconds")
    cfg.playbook_timeout = _number(worker, "playbook_timeout", cfg.playbook_timeout, "worker", problems)
    cfg.artifacts_max_age_days = _number(
        worker, "artifacts_max_age_days", cfg.artifacts_max_age_days, "worker", problems, float
    )
    cfg.poll_interval = _number(worker, "poll_interval", cfg.poll_interval, "worker", problems, float)
    cfg.retention_days = _number(worker, "retention_days", cfg.retention_days, "worker", problems, float)
    cfg.concurrency = _number(worker, "concurrency", cfg.concurrency, "worker", problems)
    if cfg.max_attempts < 1:
        problems.append("worker.max_attempts: must be at least 1")
    if cfg.concurrency < 1:
        problems.append("worker.concurrency: must be at least 1")
    if not cfg.retry_backoff:
        problems.append("worker.retry_backoff: give at least one delay in seconds")
    recordings = data.get("recordings") or {}
    if not isinstance(recordings, dict):
        problems.append("recordings: must be a mapping (aws_credentials_file: PATH)")
        recordings = {}
    for key in recordings:
        if key != "aws_credentials_file":
            problems.append(f"recordings: unknown key {key!r}")
    _cloud_credentials(cfg, recordings, base, problems)

    # Missing secrets are reported by `athome check`, but only block commands that use them.
    cfg.secret_problems = [p for p in problems if "_env" in p or "_file" in p or "password (" in p]
    hard = [p for p in problems if p not in cfg.secret_problems]
    if hard:
        raise ConfigError(problems)
    return cfg
