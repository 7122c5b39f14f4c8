"""`athome legacy import`: the legacy system's configuration carried across in one step.

The legacy system (shared/DOMAIN.md) keeps its configuration in a few files of its
own git tree: the Python 3 master on the mailbox host (AUDIO2) and the Python 2
slave on the recordings host (AUDIO), which works its own queue:

  servers/servers_config.json   the servers: address, role, audios_from, fail2ban, MAC files
  security/tokens.json          the tokens, in clear ({"token", "description", "enabled"})
  config/monitor_config.txt     KEY=VALUE lines: mailbox, SMTP, WHITELIST=, queue, logs;
                                the slave's has MODE=slave and its recordings paths
  config/s3_config.json         the bucket, region and keys of the s3 recordings
  config/allowed_commands.json  the commands the master accepts

DOMAIN.md gives the shapes of tokens.json, of the WHITELIST= line and of the legacy
queue; the key names of the other files are the tables below (`MASTER_KEYS`,
`SLAVE_KEYS`, `SERVER_KEYS`, `S3_KEYS`): a key spelled otherwise in a real tree is a
one-line change there, and a key nobody knows is listed, never dropped silently.

`build()` reads the trees and computes everything in memory (pure apart from reading):
the files to write (inventory, athome.yml, senders.txt, athome.env.example), the
legacy tokens to import, what each legacy key became, the unknown keys and the
secrets found. Secret values are never kept in the plan: only their names and
where they were. `apply()` writes what differs: a file that exists and differs
is replaced only with --force (a timestamped backup is kept), so a second import
into the same directory changes nothing. Tokens go through
`TokenStore.import_legacy`, exactly as `athome token import`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatcher.auth import ServerKey, TokenStore, valid_address, valid_binding, weak_token
from dispatcher.config import AWS_SECRET_VARS
from dispatcher.errors import AthomeError
from dispatcher.grammar import TOKEN_MAX, TOKEN_MIN

MASTER_CONFIG = "config/monitor_config.txt"
SERVERS_FILE = "servers/servers_config.json"
TOKENS_FILE = "security/tokens.json"
S3_FILE = "config/s3_config.json"
COMMANDS_FILE = "config/allowed_commands.json"

# Names of environment variables (the same as config/athome.example.yml), not secrets.
IMAP_PASSWORD_ENV = "ATHOME_IMAP_PASSWORD"  # noqa: S105
SMTP_PASSWORD_ENV = "ATHOME_SMTP_PASSWORD"  # noqa: S105
# The legacy units that read the mailbox and work its queue (DOMAIN.md: every 3 minutes).
LEGACY_TIMERS = ("monitor_emails.timer", "queue_processor.timer")

# Legacy key -> what it becomes (shown in the plan). None: read by the importer itself.
MASTER_KEYS: dict[str, str | None] = {
    "MODE": None,
    "EMAIL_USER": "mail.imap.user, mail.from_address",
    "EMAIL_PASSWORD": f"secret: {IMAP_PASSWORD_ENV} in athome.env (a new one)",
    "IMAP_SERVER": "mail.imap.host",
    "IMAP_PORT": "mail.imap.port and security",
    "SMTP_SERVER": "mail.smtp.host",
    "SMTP_PORT": "mail.smtp.port and security",
    "SMTP_USER": "mail.smtp.user",
    "SMTP_PASSWORD": f"secret: {SMTP_PASSWORD_ENV} in athome.env (a new one)",
    "ADMIN_EMAIL": "mail.admin_addresses",
    "WHITELIST": "senders.txt (auth.senders_file)",
    "MAILBOX": "mail.imap.folder",
    "PROCESSED_FOLDER": "mail.imap.processed_folder",
    "MAX_RETRIES": "worker.max_attempts",
    "TIMEOUT": "worker.playbook_timeout",
    "QUEUE_DIR": "not reused: athome keeps its own queue in state_dir/queue",
    "LOG_DIR": "not reused: athome logs to the journal and audits to state_dir/audit",
    "LOG_FILE": "not reused: athome logs to the journal and audits to state_dir/audit",
    "LOG_LEVEL": "not reused: `athome -v` for debug output",
    "CHECK_INTERVAL": "not reused: athome waits in IMAP IDLE and answers within seconds",
    "SERVERS_CONFIG": None,
    "TOKENS_FILE": None,
    "S3_CONFIG": None,
    "TIMEZONE": "timezone",
    "BRAND": "brand",
}
SLAVE_KEYS: dict[str, str | None] = {
    "MODE": None,
    "SERVER_NAME": "which inventory host is the recordings host",
    "QUEUE_DIR": "recordings_legacy_queue_dir (recordings host)",
    "AUDIO_DIR": "recordings_root (recordings host)",
    "OUTPUT_DIR": "recordings_publish_dir (recordings host)",
    "DOWNLOAD_URL": "recordings_publish_base_url (recordings host)",
    "EMAIL_USER": "not needed by athome (the slave's own mail to requesters)",
    "EMAIL_PASSWORD": "secret of the slave's own mail: not needed by athome",
    "SMTP_SERVER": "not needed by athome (the slave's own mail to requesters)",
    "SMTP_PORT": "not needed by athome (the slave's own mail to requesters)",
    "SMTP_USER": "not needed by athome (the slave's own mail to requesters)",
    "SMTP_PASSWORD": "secret of the slave's own mail: not needed by athome",
    "CHECK_INTERVAL": "not reused: the slave's own schedule",
    "MAX_RETRIES": "not reused: the slave's own retries",
    "LOG_DIR": "not reused: the slave's own log",
    "LOG_FILE": "not reused: the slave's own log",
}
SERVER_KEYS = {
    "host",
    "port",
    "user",
    "type",
    "enabled",
    "audios_from",
    "fail2ban",
    "mac_files",
    "python",
    "description",
    "endpoints_def",
    "endpoints_sip",
    "ssh_password",
}
SERVER_TYPES = {"sip": "sip_servers", "audio": "recordings", "recordings": "recordings"}
ENDPOINT_KEYS = {"def_file", "sip_file", "monitor_command"}
S3_KEYS: dict[str, str | None] = {
    "aws_access_key_id": "secret: AWS_ACCESS_KEY_ID in athome.env (a new key)",
    "aws_secret_access_key": "secret: AWS_SECRET_ACCESS_KEY in athome.env (a new key)",
    "region": "recordings_s3_region",
    "bucket": "recordings_s3_bucket",
    "endpoint_url": "recordings_s3_endpoint_url",
    "results_bucket": "recordings_s3_results_bucket",
    "results_prefix": "recordings_s3_results_prefix",
    "link_expiration": "recordings_s3_url_expiry",
    "servers": "recordings_s3_prefix per server",
}
_SECRET_WORDS = re.compile(r"PASS|SECRET|ACCESS_KEY|KEY_ID|TOKEN|PRIVATE", re.IGNORECASE)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN_RE = re.compile(rf"[0-9A-Fa-f]{{{TOKEN_MIN},{TOKEN_MAX}}}")


class LegacyError(AthomeError):
    """A legacy file that cannot be read as it should: names the file and the line."""

    def __init__(self, path: Path, line: int | None, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass(frozen=True)
class Setting:
    value: str = field(repr=False)  # may be a secret: never printed
    line: int


@dataclass(frozen=True)
class Secret:
    name: str  # the legacy key
    where: str  # file:line
    goes_to: str  # what to do with a new one
    env: str = ""  # the athome environment variable that takes the new value, if any


@dataclass
class Tree:
    root: Path
    mode: str  # master | slave
    settings: dict[str, Setting]

    @property
    def config(self) -> Path:
        return self.root / MASTER_CONFIG


@dataclass
class Plan:
    """What an import would do; holds no secret value and no token in clear."""

    out: Path
    trees: list[Tree]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> content
    tokens_file: Path | None = None
    token_senders: list[str] = field(default_factory=list)
    token_commands: list[str] | None = None
    tokens: list[tuple[str, bool, bool]] = field(default_factory=list)  # (description, enabled, weak)
    mapping: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    env_names: list[str] = field(default_factory=list)  # env vars the config needs


# ------------------------------------------------------------------- reading


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LegacyError(path, None, exc.strerror or str(exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # the Python 2 slave's files


def read_settings(path: Path) -> dict[str, Setting]:
    """KEY=VALUE lines ('#' comments, optional quotes, optional `export`), keys upper-cased.
    A line that is not KEY=VALUE is an error naming the line, never quoting it (it may
    hold a password)."""
    out: dict[str, Setting] = {}
    for n, raw in enumerate(_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            raise LegacyError(path, n, "not a KEY=VALUE line (not shown here: it may hold a secret)")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        key = key.upper()
        if key in out:
            raise LegacyError(path, n, f"{key} is set twice (first on line {out[key].line})")
        out[key] = Setting(value, n)
    return out


def read_json(path: Path) -> tuple[Any, str]:
    text = _text(path)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise LegacyError(path, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None


def _json_line(text: str, *keys: str) -> int | None:
    """The line where the key path appears (each key, `"key":`, searched after the one before).
    A best effort for messages: JSON parsers keep no positions."""
    pos = 0
    for key in keys:
        found = re.compile(re.escape(json.dumps(key)) + r"\s*:").search(text, pos)
        if found is None:
            return None
        pos = found.start()
    return text.count("\n", 0, pos) + 1


def find_trees(paths: list[Path]) -> list[Tree]:
    """Each PATH is a legacy tree (it has config/monitor_config.txt or the servers file)
    or a directory holding several (the master's and the slave's, side by side)."""
    trees: list[Tree] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise LegacyError(path, None, "not a directory")
        candidates = [path] if _is_tree(path) else sorted(p for p in path.iterdir() if _is_tree(p))
        if not candidates:
            raise LegacyError(
                path, None, f"no legacy tree here (neither {MASTER_CONFIG} nor {SERVERS_FILE}, nor below)"
            )
        for root in candidates:
            settings = read_settings(root / MASTER_CONFIG) if (root / MASTER_CONFIG).is_file() else {}
            mode = settings["MODE"].value.strip().lower() if "MODE" in settings else "master"
            if mode not in ("master", "slave"):
                raise LegacyError(
                    root / MASTER_CONFIG, settings["MODE"].line, "MODE is neither master nor slave"
                )
            trees.append(Tree(root, mode, settings))
    masters = [t for t in trees if t.mode == "master"]
    if len(masters) != 1:
        raise AthomeError(
            f"expected one master tree (MODE=master or none), found {len(masters)}: "
            + ", ".join(str(t.root) for t in masters)
        )
    if len([t for t in trees if t.mode == "slave"]) > 1:
        raise AthomeError("more than one slave tree (MODE=slave): import one recordings host at a time")
    return trees


def _is_tree(path: Path) -> bool:
    return path.is_dir() and ((path / MASTER_CONFIG).is_file() or (path / SERVERS_FILE).is_file())


# ------------------------------------------------------------------- building


def _y(value: Any) -> str:
    """A YAML scalar or flow sequence (JSON is valid YAML): quotes wherever needed."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_y(v) for v in value) + "]"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./@:-]+", text) and not text[0].isdigit() else json.dumps(text)


def _port(tree: Tree, key: str, default: int) -> int:
    s = tree.settings.get(key)
    if s is None:
        return default
    if not s.value.isdigit() or not 0 < int(s.value) < 65536:
        raise LegacyError(tree.config, s.line, f"{key} is not a port number")
    return int(s.value)


def _addresses(tree: Tree, key: str, plan: Plan) -> list[str]:
    s = tree.settings.get(key)
    if s is None:
        return []
    out = []
    for addr in (a.strip().lower() for a in s.value.split(",")):
        if not addr:
            continue
        if valid_address(addr):
            out.append(addr)
        else:
            plan.notes.append(f"{tree.config}:{s.line}: {key}: {addr!r} is not an accepted address; left out")
    return sorted(set(out), key=out.index)


def _unknown_settings(tree: Tree, known: dict[str, str | None], plan: Plan) -> None:
    for key, s in tree.settings.items():
        where = f"{tree.config}:{s.line}"
        if key in known:
            if known[key]:
                plan.mapping.append(f"{where}: {key} -> {known[key]}")
            continue
        if _SECRET_WORDS.search(key):
            plan.secrets.append(Secret(key, where, "unknown to athome: rotate it wherever it is used"))
        plan.unknown.append(f"{where}: {key}")


def _master_config(tree: Tree, plan: Plan) -> dict[str, Any]:
    """The mail, admin and worker settings of the master's monitor_config.txt."""
    s, where = tree.settings, str(tree.config)
    _unknown_settings(tree, MASTER_KEYS, plan)
    get = lambda key, default="": s[key].value if key in s else default  # noqa: E731
    user = get("EMAIL_USER").strip()
    imap_port, smtp_port = _port(tree, "IMAP_PORT", 993), _port(tree, "SMTP_PORT", 587)
    mail = {
        "from_address": user,
        "admins": _addresses(tree, "ADMIN_EMAIL", plan),
        "imap_host": get("IMAP_SERVER"),
        "imap_port": imap_port,
        "imap_security": "tls" if imap_port == 993 else "starttls",
        "imap_user": user,
        "folder": get("MAILBOX", "INBOX") or "INBOX",
        "processed": get("PROCESSED_FOLDER"),
        "smtp_host": get("SMTP_SERVER"),
        "smtp_port": smtp_port,
        "smtp_security": "tls" if smtp_port == 465 else "starttls",
        "smtp_user": get("SMTP_USER", user) or user,
        "smtp_env": SMTP_PASSWORD_ENV if "SMTP_PASSWORD" in s else IMAP_PASSWORD_ENV,
    }
    for key, env in (("EMAIL_PASSWORD", IMAP_PASSWORD_ENV), ("SMTP_PASSWORD", SMTP_PASSWORD_ENV)):
        if key in s:
            plan.secrets.append(Secret(key, f"{where}:{s[key].line}", f"a NEW password in {env}", env))
    plan.env_names.append(IMAP_PASSWORD_ENV)
    if "SMTP_PASSWORD" in s:
        plan.env_names.append(SMTP_PASSWORD_ENV)
    else:
        plan.notes.append(
            f"{where}: no SMTP_PASSWORD: SMTP logs in with the IMAP password ({IMAP_PASSWORD_ENV})"
        )
    for key in ("EMAIL_USER", "IMAP_SERVER", "SMTP_SERVER"):
        if key not in s:
            plan.notes.append(f"{where}: {key} is missing: fill in its athome setting by hand")
    if user and not valid_address(user.lower()):
        raise LegacyError(tree.config, s["EMAIL_USER"].line, "EMAIL_USER is not an e-mail address")
    for key, port in (("IMAP_PORT", imap_port), ("SMTP_PORT", smtp_port)):
        if port not in (993, 143, 465, 587, 25):
            plan.notes.append(f"{where}: {key} {port} is unusual: check mail.*.security (guessed starttls)")
    worker = {}
    for key, name in (("MAX_RETRIES", "max_attempts"), ("TIMEOUT", "playbook_timeout")):
        if key in s:
            if not s[key].value.isdigit() or int(s[key].value) < 1:
                raise LegacyError(tree.config, s[key].line, f"{key} is not a positive whole number")
            worker[name] = int(s[key].value)
    mail["worker"] = worker
    mail["timezone"] = get("TIMEZONE", "America/Sao_Paulo")
    mail["brand"] = get("BRAND", "ATHome")
    return mail


def _servers(master: Tree, plan: Plan) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]], dict]:
    """(host vars, groups, endpoint settings) from servers_config.json."""
    path = master.root / SERVERS_FILE
    if not path.is_file():
        raise LegacyError(path, None, "missing: the inventory comes from it")
    data, text = read_json(path)
    servers = data.get("servers") if isinstance(data, dict) else data
    if isinstance(servers, list):  # [{"name": ..., ...}]
        by_name = {}
        for n, item in enumerate(servers, 1):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise LegacyError(path, _json_line(text, "servers"), f'server {n} has no "name"')
            by_name[item["name"]] = {k: v for k, v in item.items() if k != "name"}
        servers = by_name
    if not isinstance(servers, dict) or not servers:
        raise LegacyError(path, 1, 'expected {"servers": {"<id>": {...}}} with at least one server')
    if isinstance(data, dict):
        for key in data:
            if key not in ("servers", "endpoints"):
                plan.unknown.append(f"{path}:{_json_line(text, key)}: {key}")
    endpoints = data.get("endpoints", {}) if isinstance(data, dict) else {}
    if not isinstance(endpoints, dict):
        raise LegacyError(path, _json_line(text, "endpoints"), "endpoints is not an object")
    for key in endpoints:
        if key not in ENDPOINT_KEYS:
            plan.unknown.append(f"{path}:{_json_line(text, 'endpoints', key)}: endpoints.{key}")
    hostvars: dict[str, dict[str, Any]] = {}
    groups: dict[str, set[str]] = {
        g: set() for g in ("sip_servers", "fail2ban_servers", "mac_servers", "recordings")
    }
    for name, srv in servers.items():
        line = _json_line(text, name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise LegacyError(path, line, f"server id {name!r} cannot be an inventory host name")
        if not isinstance(srv, dict):
            raise LegacyError(path, line, f"server {name} is not an object")

        def bad(key: str, why: str, name=name) -> LegacyError:
            return LegacyError(path, _json_line(text, name, key), f"servers.{name}.{key}: {why}")

        for key in srv:
            if key not in SERVER_KEYS:
                plan.unknown.append(f"{path}:{_json_line(text, name, key)}: servers.{name}.{key}")
                if _SECRET_WORDS.search(key):
                    plan.secrets.append(
                        Secret(f"servers.{name}.{key}", f"{path}:{_json_line(text, name, key)}", "rotate it")
                    )
        hv: dict[str, Any] = {}
        host = srv.get("host")
        if not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
            raise bad("host", "missing, or not a host name or address")
        hv["ansible_host"] = host
        if "port" in srv:
            if (
                not isinstance(srv["port"], int)
                or isinstance(srv["port"], bool)
                or not 0 < srv["port"] < 65536
            ):
                raise bad("port", "not a port number")
            if srv["port"] != 22:
                hv["ansible_port"] = srv["port"]
        if "user" in srv:
            if not isinstance(srv["user"], str) or not re.fullmatch(r"[a-z_][a-z0-9_-]*", srv["user"]):
                raise bad("user", "not a user name")
            hv["ansible_user"] = srv["user"]
        if "python" in srv:
            hv["ansible_python_interpreter"] = str(srv["python"])
        enabled = srv.get("enabled", True)
        if not isinstance(enabled, bool):
            raise bad("enabled", "must be true or false")
        hv["enabled"] = enabled
        kind = srv.get("type", "sip")
        if kind not in SERVER_TYPES:
            raise bad("type", f"{kind!r} is not one of {', '.join(SERVER_TYPES)}")
        group = SERVER_TYPES[kind]
        groups[group].add(name)
        for flag, flag_group in (("fail2ban", "fail2ban_servers"), ("mac_files", "mac_servers")):
            value = srv.get(flag, False)
            if not isinstance(value, bool):
                raise bad(flag, "must be true or false")
            if value:
                if group != "sip_servers":
                    raise bad(flag, "only a SIP server has fail2ban or MAC files")
                groups[flag_group].add(name)
        if group == "sip_servers":
            src = srv.get("audios_from")
            if src not in ("audio", "s3"):
                raise bad("audios_from", f"{src!r} is neither 'audio' nor 's3'")
            hv["audios_from"] = src
        for key, var in (
            ("endpoints_def", "endpoint_mac_endpoints_def"),
            ("endpoints_sip", "endpoint_mac_endpoints_sip"),
        ):
            if key in srv:
                hv[var] = str(srv[key])
        if "ssh_password" in srv:
            plan.secrets.append(
                Secret(
                    f"servers.{name}.ssh_password",
                    f"{path}:{_json_line(text, name, 'ssh_password')}",
                    "not used: athome logs in with an SSH key; change that password on the server",
                )
            )
        if srv.get("description"):
            hv["_comment"] = str(srv["description"])
        hostvars[name] = hv
        plan.mapping.append(f"{path}:{line}: servers.{name} -> inventory host {name} ({group})")
    if not groups["recordings"] and any(h.get("audios_from") == "audio" for h in hostvars.values()):
        plan.notes.append(f"{path}: servers take audios_from 'audio' but no server has type 'audio'")
    return hostvars, groups, endpoints


def _slave(slave: Tree, hostvars: dict, groups: dict, plan: Plan) -> None:
    """The recordings host's paths, from the slave's monitor_config.txt."""
    s, where = slave.settings, str(slave.config)
    _unknown_settings(slave, SLAVE_KEYS, plan)
    for key in ("EMAIL_PASSWORD", "SMTP_PASSWORD"):
        if key in s:
            plan.secrets.append(
                Secret(
                    key,
                    f"{where}:{s[key].line}",
                    "the slave's own: change it in the slave's config (it keeps mailing links "
                    "while recordings_legacy_queue is true); athome does not need it",
                )
            )
    name = s["SERVER_NAME"].value if "SERVER_NAME" in s else ""
    if not name:
        hosts = sorted(groups["recordings"])
        if len(hosts) != 1:
            raise LegacyError(
                slave.config, None, "SERVER_NAME is missing and there is not one recordings host"
            )
        name = hosts[0]
    if name not in groups["recordings"]:
        raise LegacyError(
            slave.config, s["SERVER_NAME"].line, f"SERVER_NAME {name} is not a server of type 'audio'"
        )
    hv = hostvars[name]
    for key, var in (
        ("AUDIO_DIR", "recordings_root"),
        ("OUTPUT_DIR", "recordings_publish_dir"),
        ("DOWNLOAD_URL", "recordings_publish_base_url"),
    ):
        if key in s:
            value = s[key].value.rstrip("/")
            if not value:
                raise LegacyError(slave.config, s[key].line, f"{key} is empty")
            hv[var] = value
    if "QUEUE_DIR" in s:
        queue = s["QUEUE_DIR"].value.rstrip("/")
        hv["recordings_legacy_queue_dir"] = queue[: -len("/pending")] if queue.endswith("/pending") else queue
    # The slave's processor keeps running during the transition: hand it the requests.
    hv["recordings_legacy_queue"] = True
    plan.notes.append(
        f"{name}: recordings_legacy_queue is true: RAMAIS for audios_from 'audio' servers goes to the legacy "
        "processor's queue, as today; set it false once athome's own selection has been tried"
    )


def _s3(master: Tree, hostvars: dict, plan: Plan) -> None:
    path = master.root / S3_FILE
    s3_hosts = sorted(h for h, v in hostvars.items() if v.get("audios_from") == "s3")
    if not path.is_file():
        if s3_hosts:
            plan.notes.append(f"{path} is missing: set recordings_s3_* on {', '.join(s3_hosts)} by hand")
        return
    data, text = read_json(path)
    if not isinstance(data, dict):
        raise LegacyError(path, 1, "expected an object")
    for key in data:
        line = _json_line(text, key)
        if key not in S3_KEYS:
            plan.unknown.append(f"{path}:{line}: {key}")
            if _SECRET_WORDS.search(key):
                plan.secrets.append(Secret(key, f"{path}:{line}", "unknown to athome: rotate it"))
        elif S3_KEYS[key]:
            plan.mapping.append(f"{path}:{line}: {key} -> {S3_KEYS[key]}")
    for key, env in (
        ("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
        ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ):
        if key in data:
            plan.secrets.append(Secret(key, f"{path}:{_json_line(text, key)}", f"a NEW key in {env}", env))
            plan.env_names.append(env)
    per_server = data.get("servers", {})
    if not isinstance(per_server, dict):
        raise LegacyError(path, _json_line(text, "servers"), "servers is not an object")
    common = {}
    for key, var in (
        ("bucket", "recordings_s3_bucket"),
        ("region", "recordings_s3_region"),
        ("endpoint_url", "recordings_s3_endpoint_url"),
        ("results_bucket", "recordings_s3_results_bucket"),
        ("results_prefix", "recordings_s3_results_prefix"),
    ):
        if data.get(key):
            if not isinstance(data[key], str):
                raise LegacyError(path, _json_line(text, key), f"{key} is not a string")
            common[var] = data[key]
    if "link_expiration" in data:
        exp = data["link_expiration"]
        if not isinstance(exp, int) or isinstance(exp, bool) or not 0 < exp <= 7 * 86400:
            raise LegacyError(
                path, _json_line(text, "link_expiration"), "link_expiration: seconds, at most 7 days"
            )
        common["recordings_s3_url_expiry"] = exp
    if "recordings_s3_results_bucket" not in common and "recordings_s3_bucket" in common:
        common["recordings_s3_results_bucket"] = common["recordings_s3_bucket"]
        plan.notes.append(f"{path}: no results_bucket: the ZIPs go to the recordings bucket, under ramais/")
    for name, srv in per_server.items():
        line = _json_line(text, "servers", name)
        if name not in hostvars:
            raise LegacyError(path, line, f"servers.{name}: no such server in {SERVERS_FILE}")
        if not isinstance(srv, dict):
            raise LegacyError(path, line, f"servers.{name} is not an object")
        for key in srv:
            if key not in ("prefix", "bucket"):
                plan.unknown.append(f"{path}:{_json_line(text, 'servers', name, key)}: servers.{name}.{key}")
    for name in s3_hosts:
        srv = per_server.get(name, {})
        hv = hostvars[name]
        hv.update(common)
        if srv.get("bucket"):
            hv["recordings_s3_bucket"] = str(srv["bucket"])
        if srv.get("prefix"):
            hv["recordings_s3_prefix"] = str(srv["prefix"])


def _allowed_commands(master: Tree, plan: Plan) -> list[str] | None:
    from dispatcher.commands import COMMANDS

    path = master.root / COMMANDS_FILE
    if not path.is_file():
        return None
    data, text = read_json(path)
    items = data.get("allowed_commands", data.get("commands")) if isinstance(data, dict) else data
    if isinstance(data, dict):
        for key in data:
            if key not in ("allowed_commands", "commands"):
                plan.unknown.append(f"{path}:{_json_line(text, key)}: {key}")
    if isinstance(items, dict):  # {"RAMAIS": true, "CHECKIP": {"enabled": false}}
        items = [k for k, v in items.items() if (v.get("enabled", True) if isinstance(v, dict) else v)]
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise LegacyError(path, 1, 'expected {"allowed_commands": ["RAMAIS", ...]} or a list of names')
    names = []
    for c in items:
        if c.strip().upper() in COMMANDS:
            names.append(COMMANDS[c.strip().upper()].name)
        else:
            line = text.count("\n", 0, max(text.find(json.dumps(c)), 0)) + 1
            plan.unknown.append(f"{path}:{line}: command {c} (athome has no such command)")
    if not names:  # an empty scope would mean "every command" for a token
        raise LegacyError(path, 1, "no command athome knows is allowed: the tokens would run nothing")
    plan.mapping.append(f"{path}: allowed commands -> the imported tokens' scope: {', '.join(names)}")
    return sorted(set(names))


def _legacy_tokens(master: Tree, plan: Plan) -> None:
    """Checked here (file and entry) so a broken file stops the import before any write;
    imported later by TokenStore.import_legacy."""
    path = master.root / TOKENS_FILE
    if not path.is_file():
        plan.notes.append(f"{path} is missing: no token imported (athome token add)")
        return
    data, text = read_json(path)
    items = data.get("tokens") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise LegacyError(path, 1, 'expected {"tokens": [...]} or a list of tokens')
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            raise LegacyError(path, _nth_line(text, n), f'entry {n} is not an object with a "token" string')
        for key in item:
            if key not in ("token", "description", "enabled"):
                plan.unknown.append(f"{path}: entry {n}: {key}")
        desc = str(item.get("description", "")) or f"legacy entry {n}"
        token = item["token"].strip()
        if not _TOKEN_RE.fullmatch(token):
            plan.notes.append(f"{path}: entry {n} ({desc}): not {TOKEN_MIN}-{TOKEN_MAX} hex digits; skipped")
            continue
        enabled = item.get("enabled", True) is not False
        weak = weak_token(token)
        plan.tokens.append((desc, enabled and not weak, weak))
    plan.tokens_file = path


def _nth_line(text: str, n: int) -> int | None:
    """The line of the n-th element of the top-level token list (best effort)."""
    start = text.find("[")
    depth, count = 0, 0
    for i in range(start + 1 if start >= 0 else 0, len(text)):
        ch = text[i]
        if depth == 0 and not ch.isspace() and ch not in ",]":
            count += 1
            if count == n:
                return text.count("\n", 0, i) + 1
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return None


def build(paths: list[Path], out: Path, senders: list[str]) -> Plan:
    """Read the legacy trees; compute every file to write. Reads only."""
    trees = find_trees(paths)
    out = Path(out).absolute()
    plan = Plan(out=out, trees=trees)
    master = next(t for t in trees if t.mode == "master")
    slave = next((t for t in trees if t.mode == "slave"), None)
    if not master.settings:
        raise LegacyError(master.config, None, "missing: the mail settings come from it")
    mail = _master_config(master, plan)
    hostvars, groups, endpoints = _servers(master, plan)
    if slave is not None:
        _slave(slave, hostvars, groups, plan)
    elif groups["recordings"]:
        plan.notes.append("no slave tree (MODE=slave): set recordings_* on the recordings host by hand")
    _s3(master, hostvars, plan)
    scope = _allowed_commands(master, plan)
    _legacy_tokens(master, plan)

    whitelist = _addresses(master, "WHITELIST", plan)
    bad = [s for s in senders if not valid_binding(s.strip().lower())]
    if bad:
        raise AthomeError(f"--sender: not an address or @domain: {', '.join(bad)}")
    plan.token_senders = sorted({s.strip().lower() for s in senders}) or whitelist
    plan.token_commands = scope
    if plan.tokens and not senders:
        plan.notes.append(
            "no --sender: the legacy tokens are bound to every whitelisted sender, as the legacy "
            "accepted them; give --sender to bind them to fewer people"
        )
    if plan.tokens and not plan.token_senders:
        raise AthomeError("the tokens need at least one sender: give --sender (no WHITELIST= line found)")

    src = ", ".join(str(t.root.absolute()) for t in trees)
    header = f"# Imported by `athome legacy import` from {src}.\n"
    plan.files.update(_inventory_files(header, hostvars, groups, endpoints, plan))
    plan.files["senders.txt"] = (
        f"{header}# The legacy WHITELIST= line ({master.config}); one address a line.\n"
        + "".join(f"{a}\n" for a in whitelist)
    )
    plan.files["athome.yml"] = _config_text(header, mail, plan)
    plan.files["athome.env.example"] = _env_text(header, plan)
    plan.env_names = sorted(set(plan.env_names), key=plan.env_names.index)
    return plan


def _inventory_files(header, hostvars, groups, endpoints, plan: Plan) -> dict[str, str]:
    files = {}
    lines = ["---", header.rstrip(), "all:", "  children:"]
    for group, hosts in groups.items():
        lines.append(f"    {group}:")
        lines.append("      hosts:" if hosts else "      hosts: {}")
        lines += [f"        {h}:" for h in sorted(hosts)]
    files["inventory/hosts.yml"] = "\n".join(lines) + "\n"
    users = {hv.get("ansible_user") for hv in hostvars.values()}
    common_user = users.pop() if len(users) == 1 and None not in users else None
    all_vars = ["---", header.rstrip()]
    if common_user:
        all_vars.append(f"ansible_user: {_y(common_user)}")
    all_vars.append("ansible_python_interpreter: auto_silent")
    files["inventory/group_vars/all.yml"] = "\n".join(all_vars) + "\n"
    mac = ["---", header.rstrip()]
    def_file = endpoints.get("def_file")
    sip_file = endpoints.get("sip_file")
    if not (def_file and sip_file):
        mac.append("# Not in the legacy files: athome's defaults. Confirm them on each server.")
        plan.notes.append(
            "endpoint files of the MAC servers: athome's defaults (confirm them on each server)"
        )
    mac.append(f"endpoint_mac_endpoints_def: {_y(def_file or '/etc/asterisk/__ENDPOINTS__.DEF')}")
    mac.append(f"endpoint_mac_endpoints_sip: {_y(sip_file or '/etc/asterisk/endpoints_sip.def')}")
    monitor = endpoints.get("monitor_command") or ["/usr/local/bin/arimonitor", "reload"]
    if isinstance(monitor, str):
        monitor = monitor.split()
    mac.append("endpoint_mac_monitor_command: " + _y([str(x) for x in monitor]))
    files["inventory/group_vars/mac_servers.yml"] = "\n".join(mac) + "\n"
    for name, hv in sorted(hostvars.items()):
        body = ["---", header.rstrip()]
        if "_comment" in hv:
            body.append("# " + " ".join(str(hv["_comment"]).split()))
        for key, value in hv.items():
            if key == "_comment" or (key == "ansible_user" and value == common_user):
                continue
            if key == "recordings_legacy_queue":
                body.append("# Transition: true hands RAMAIS to the legacy processor on this host (README).")
            body.append(f"{key}: {_y(value)}")
        files[f"inventory/host_vars/{name}.yml"] = "\n".join(body) + "\n"
    return files


def _config_text(header: str, mail: dict, plan: Plan) -> str:
    gmail = "gmail.com" in mail["imap_host"] or "googlemail.com" in mail["imap_host"]
    ids = ["mx.google.com"] if gmail else []
    if not gmail:
        plan.notes.append(
            "auth.authentication_results.trusted_authserv_ids is empty: put your mail provider's "
            "authserv-id there (README, 'Sender authenticity')"
        )
    worker = mail["worker"]
    lines = [
        "---",
        header.rstrip(),
        "# Review, then install as /etc/athome/athome.yml (every key: config/athome.example.yml).",
        "# No secret is written here: the passwords are named by environment variables",
        "# (athome.env.example lists them).",
        "state_dir: /var/lib/athome      # the legacy QUEUE_DIR is not reused: athome's queue lives here",
        f"inventory: {_y(str(plan.out / 'inventory'))}   # change it when you move the inventory",
        f"brand: {_y(mail['brand'])}",
        f"timezone: {_y(mail['timezone'])}",
        "mail:",
        "  transport: imap",
        f"  from_address: {_y(mail['from_address'])}",
        f"  admin_addresses: {_y(mail['admins'])}",
        "  imap:",
        f"    host: {_y(mail['imap_host'])}",
        f"    port: {mail['imap_port']}",
        f"    security: {mail['imap_security']}",
        f"    user: {_y(mail['imap_user'])}",
        f"    password_env: {IMAP_PASSWORD_ENV}",
        f"    folder: {_y(mail['folder'])}",
        f"    processed_folder: {_y(mail['processed'])}",
        "  smtp:",
        f"    host: {_y(mail['smtp_host'])}",
        f"    port: {mail['smtp_port']}",
        f"    security: {mail['smtp_security']}",
        f"    user: {_y(mail['smtp_user'])}",
        f"    password_env: {mail['smtp_env']}",
        "auth:",
        "  senders: []",
        "  senders_file: senders.txt",
        "  tokens_file: tokens.json",
        "  key_file: athome.key",
        "  authentication_results:",
        "    required: true",
        f"    trusted_authserv_ids: {_y(ids)}",
        "commands:",
        "  max_window_days: 31",
        "  # The legacy ran MACCHANGE at once; athome can ask for a CONFIRMAR reply first:",
        "  # MACCHANGE:",
        "  #   confirm: true",
        "worker:",
    ]
    lines += [f"  {k}: {v}" for k, v in worker.items()] or ["  max_attempts: 3"]
    return "\n".join(lines) + "\n"


def _env_text(header: str, plan: Plan) -> str:
    lines = [
        header.rstrip(),
        "# The environment of the athome service: copy to /etc/athome/athome.env (root, mode 0600)",
        "# and fill in NEW values. The legacy system kept these secrets in clear in its config",
        "# files and in git: they are not copied here. Rotate each one first (a new app password,",
        "# a new S3 access key), then disable the old one.",
    ]
    by_env = {s.env: s for s in plan.secrets if s.env}
    for name in dict.fromkeys(plan.env_names):
        legacy = by_env.get(name)
        lines.append("")
        lines.append(f"# was {legacy.name} in {legacy.where}" if legacy else "# not in the legacy files")
        lines.append(f"{name}=")
    others = [s for s in plan.secrets if not s.env]
    if others:
        lines.append("")
        lines.append("# Also found in clear, not needed here: rotate them where they are used.")
        lines += [f"#   {s.name} in {s.where}" for s in others]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- applying


@dataclass
class Change:
    path: str
    action: str  # create | unchanged | replace | conflict
    detail: str = ""


def compare(plan: Plan, force: bool, expires_days: float) -> list[Change]:
    changes = []
    for rel, content in plan.files.items():
        target = plan.out / rel
        if not target.exists():
            changes.append(Change(rel, "create"))
        elif target.read_text() == content:
            changes.append(Change(rel, "unchanged"))
        else:
            changes.append(Change(rel, "replace" if force else "conflict", "exists and differs"))
    if plan.tokens_file is not None:
        changes.append(_tokens_change(plan, force, expires_days))
    return changes


def _tokens_change(plan: Plan, force: bool, expires_days: float) -> Change:
    store_path, key_path = plan.out / "tokens.json", plan.out / "athome.key"
    enabled = sum(1 for _, on, _ in plan.tokens if on)
    what = (
        f"{len(plan.tokens)} legacy tokens ({enabled} enabled, {len(plan.tokens) - enabled} disabled), "
        f"bound to {', '.join(plan.token_senders)}, expiring in {expires_days:g} days"
    )
    if not store_path.exists():
        return Change("tokens.json", "create", what)
    if not key_path.exists():
        raise AthomeError(f"{store_path} exists without its server key {key_path}: move it away first")
    missing = len(_missing_tokens(plan))
    if missing == 0:
        return Change("tokens.json", "unchanged", "every legacy token is already in it")
    return Change(
        "tokens.json", "replace" if force else "conflict", f"exists; {missing} legacy token(s) would be added"
    )


def _missing_tokens(plan: Plan) -> list[int]:
    """Indexes (in the legacy file) of valid legacy tokens not yet in DIR/tokens.json."""
    store = TokenStore(plan.out / "tokens.json", ServerKey(plan.out / "athome.key"))
    have = {e.lookup for e in store.entries()}
    data = json.loads(plan.tokens_file.read_text())
    items = data.get("tokens") if isinstance(data, dict) else data
    out = []
    for n, item in enumerate(items):
        token = item["token"].strip()
        if _TOKEN_RE.fullmatch(token) and store.lookup(token) not in have:
            out.append(n)
    return out


def _write(out: Path, rel: str, content: str) -> None:
    """Atomically; a file replaced is first copied to DIR/.backups/<rel>.<time> (outside the
    inventory, where ansible would read it)."""
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            backup = out / ".backups" / f"{rel}.{time.strftime('%Y%m%d_%H%M%S')}"
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def apply(plan: Plan, changes: list[Change], expires_days: float) -> list[str]:
    """Write every created or replaced file, then import the tokens; returns the notes of
    the token import (ids and states, never a token)."""
    for ch in changes:
        if ch.action in ("create", "replace") and ch.path in plan.files:
            _write(plan.out, ch.path, plan.files[ch.path])
    notes: list[str] = []
    if any(ch.path == "tokens.json" and ch.action in ("create", "replace") for ch in changes):
        store = TokenStore(plan.out / "tokens.json", ServerKey(plan.out / "athome.key"))
        notes = store.import_legacy(
            plan.tokens_file, plan.token_senders, expires_days=expires_days, commands=plan.token_commands
        )
    return notes


def check_result(out: Path, env_names: list[str]) -> tuple[int, str]:
    """`athome check` on the imported configuration, in a process of its own: the secrets
    it names are set to stand-ins (the new ones are not there yet), and S3 keys of this
    shell are not passed (config.load would move them into the state directory)."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_SECRET_VARS and k != "ATHOME_CONFIG"}
    for name in env_names:
        if name not in AWS_SECRET_VARS:
            env[name] = "stand-in-for-the-rotated-secret"
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(out / "athome.yml"), "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def run_import(
    paths: list[Path],
    out: Path,
    senders: list[str],
    dry_run: bool = False,
    force: bool = False,
    expires_days: float = 30,
    echo: Callable[[str], None] = print,
) -> int:
    plan = build(paths, out, senders)
    changes = compare(plan, force, expires_days)
    for tree in plan.trees:
        echo(f"legacy {tree.mode}: {tree.root}")
    echo(f"into: {plan.out}")
    echo("")
    echo("files:")
    for ch in changes:
        echo(f"  {ch.action.upper():<9} {ch.path}" + (f"  ({ch.detail})" if ch.detail else ""))
    echo("")
    echo("what each legacy setting became:")
    for line in plan.mapping:
        echo(f"  {line}")
    if plan.notes:
        echo("")
        echo("notes:")
        for line in plan.notes:
            echo(f"  {line}")
    if plan.unknown:
        echo("")
        echo(f"unknown keys, NOT imported ({len(plan.unknown)}): check whether they matter")
        for line in plan.unknown:
            echo(f"  {line}")
    if plan.secrets:
        echo("")
        echo(
            f"secrets found in clear ({len(plan.secrets)}): their values are NOT copied. They were "
            "stored in the legacy files and committed to git: ROTATE every one."
        )
        for s in plan.secrets:
            echo(f"  {s.name} ({s.where}) -> {s.goes_to}")
        echo(
            "  The new values go in /etc/athome/athome.env (root, 0600): "
            f"see {plan.out / 'athome.env.example'}"
        )
    conflicts = [ch for ch in changes if ch.action == "conflict"]
    todo = [ch for ch in changes if ch.action in ("create", "replace")]
    echo("")
    if dry_run:
        for ch in changes:
            if ch.action in ("replace", "conflict") and ch.path in plan.files:
                old = (plan.out / ch.path).read_text().splitlines(keepends=True)
                new = plan.files[ch.path].splitlines(keepends=True)
                echo("".join(difflib.unified_diff(old, new, f"{ch.path} (now)", f"{ch.path} (import)")))
        echo(
            "dry run: nothing written"
            + (f"; {len(conflicts)} file(s) would need --force" if conflicts else "")
        )
        return 1 if conflicts else 0
    if conflicts:
        echo(
            f"nothing written: {len(conflicts)} file(s) exist and differ "
            f"({', '.join(c.path for c in conflicts)}); "
            "review with --dry-run, then --force replaces them (the old ones go to .backups/)"
        )
        return 1
    if not todo:
        echo(f"nothing to do: {plan.out} already holds this import (no file changed)")
    else:
        plan.out.mkdir(parents=True, exist_ok=True)
        for line in apply(plan, changes, expires_days):
            echo(f"  token {line}")
        echo(f"written: {len(todo)} file(s) in {plan.out}")
    code, report = check_result(plan.out, plan.env_names)
    echo("")
    echo("athome check on the result (the secrets named in athome.env.example stood in for):")
    for line in report.splitlines():
        echo(f"  {line}")
    return 0 if code == 0 else 1


# ------------------------------------------------------------------- legacy timers


def legacy_timers(systemctl: str | None = None, root: Path = Path("/")) -> tuple[list[str], list[str]]:
    """(warnings, notes) about the legacy timers on this machine, for `athome check`.

    Two readers of one mailbox take each other's messages. With systemd running,
    `systemctl is-active` says; without it (a container, a chroot) the unit files
    and their enablement links are looked at, and the answer says it cannot tell
    whether they run."""
    systemctl = systemctl if systemctl is not None else shutil.which("systemctl")
    if systemctl and (root / "run/systemd/system").is_dir():
        try:
            proc = subprocess.run(
                [systemctl, "is-active", *LEGACY_TIMERS], capture_output=True, text=True, timeout=30
            )
            states = proc.stdout.split()
        except (OSError, subprocess.SubprocessError) as exc:
            return [], [f"legacy timers: cannot tell whether {', '.join(LEGACY_TIMERS)} run ({exc})"]
        if len(states) == len(LEGACY_TIMERS):
            active = [u for u, s in zip(LEGACY_TIMERS, states, strict=True) if s in ("active", "activating")]
            return [
                f"legacy timer {u} is active here: the legacy system reads the same mailbox; "
                f"`systemctl disable --now {u}` (README, 'Switching from the legacy system')"
                for u in active
            ], []
    found, enabled = [], []
    for unit in LEGACY_TIMERS:
        for d in ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system"):
            if (root / d / unit).exists():
                found.append(unit)
                break
        if (root / "etc/systemd/system/timers.target.wants" / unit).exists():
            enabled.append(unit)
    warnings = [
        f"legacy timer {u} is enabled here (systemd is not running, so whether it is active cannot be told): "
        f"`systemctl disable --now {u}` before athome reads the mailbox"
        for u in enabled
    ]
    if found and not enabled:
        why = f"installed but not enabled: {', '.join(found)}"
    else:
        why = "no unit file found" if not found else ""
    notes = [] if enabled else [f"legacy timers: cannot tell whether they run here (no systemd); {why}"]
    return warnings, notes
