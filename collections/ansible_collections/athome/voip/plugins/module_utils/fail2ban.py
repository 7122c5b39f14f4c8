# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helpers shared by the fail2ban_unban and fail2ban_ignoreip modules.

Runs on the target with Python 2.7, 3.6 and 3.11: no f-strings, no type hints,
standard library only. The parsers are pure functions (tests/test_fail2ban_module.py).

fail2ban-client prints list and dict answers as Python literals (`banned`,
`get JAIL banned`), read with ast.literal_eval, and tree answers (`status`,
`get JAIL ignoreip`) as lines starting with "|- " or "`- ".
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ast
import calendar
import glob
import io
import os
import re
import socket
import time

KNOWN = "%(known/ignoreip)s"
MANAGED_HEADER = (
    "# Managed by Ansible (athome-ops role fail2ban_whitelist). Manual edits are overwritten.\n"
    "# Each jail keeps the ignoreip it has elsewhere (%(known/ignoreip)s) plus the addresses below.\n"
)


class Fail2banError(Exception):
    """The client answered something we cannot use."""


def is_single_address(value):
    """True when value is one literal IPv4 or IPv6 address (no network, no name)."""
    if not value or not re.match(r"^[0-9A-Fa-f:.]+$", value):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
            return True
        except (socket.error, ValueError):
            continue
    return False


def _tree_items(text):
    """Items of a fail2ban tree answer: lines "|- x" / "`- x", indentation stripped."""
    items = []
    for line in text.splitlines():
        stripped = line.strip()
        for prefix in ("|- ", "`- "):
            if stripped.startswith(prefix):
                items.append(stripped[len(prefix):])
    return items


def parse_status_jails(text):
    """Jail names from `fail2ban-client status`."""
    for item in _tree_items(text):
        if item.startswith("Jail list:"):
            names = item.split(":", 1)[1].strip()
            return [n.strip() for n in names.split(",") if n.strip()]
    raise Fail2banError("no 'Jail list' in the status answer: %r" % (text[:200],))


def parse_status_banned(text):
    """Banned addresses from `fail2ban-client status JAIL` (every fail2ban version)."""
    for item in _tree_items(text):
        if item.startswith("Banned IP list:"):
            return item.split(":", 1)[1].split()
    raise Fail2banError("no 'Banned IP list' in the jail status answer: %r" % (text[:200],))


def parse_ignoreip(text):
    """Entries from `get JAIL ignoreip` / `set JAIL addignoreip|delignoreip`."""
    if "No IP address/network is ignored" in text:
        return []
    if "These IP addresses/networks are ignored" not in text:
        raise Fail2banError("unexpected ignoreip answer: %r" % (text[:200],))
    return _tree_items(text)


def _literal(text):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise Fail2banError("not a Python literal: %r" % (text[:200],))


def parse_banned_ip(text):
    """Jails from `fail2ban-client banned IP` (0.10.6+/0.11.2+): "[['asterisk', 'sshd']]"."""
    value = _literal(text)
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], list)):
        raise Fail2banError("unexpected 'banned' answer: %r" % (text[:200],))
    return [str(j) for j in value[0]]


def parse_get_banned_ip(text):
    """True/False from `get JAIL banned IP`: "1" or "0"."""
    value = _literal(text)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value in (0, 1):
        return bool(value)
    raise Fail2banError("unexpected 'get JAIL banned' answer: %r" % (text[:200],))


def config_files(conf_dir, exclude=None):
    """jail.conf, jail.d/*.conf, jail.local, jail.d/*.local in fail2ban's read order."""
    files = [os.path.join(conf_dir, "jail.conf")]
    files += sorted(glob.glob(os.path.join(conf_dir, "jail.d", "*.conf")))
    files.append(os.path.join(conf_dir, "jail.local"))
    files += sorted(glob.glob(os.path.join(conf_dir, "jail.d", "*.local")))
    exclude = os.path.realpath(exclude) if exclude else None
    return [f for f in files if os.path.isfile(f) and os.path.realpath(f) != exclude]


# fail2ban's config parser lower-cases option names: "IgnoreIP =" is ignoreip too.
_IGNOREIP = re.compile(r"^ignoreip\s*[=:]\s*(.*)$", re.I)


def scan_ignoreip(texts):
    """Last `ignoreip` value per section over config texts in read order.

    Returns {section: [tokens]}; "DEFAULT" holds the default. A simple line
    scan (continuation lines included) that does not interpolate values.
    """
    found = {}
    for text in texts:
        section = None
        current = None
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith(("#", ";")):
                continue
            head = re.match(r"^\[([^\]]+)\]\s*$", line)
            if head:
                section = head.group(1)  # as fail2ban's parser reads it: "[sshd ]" is not sshd
                current = None
                continue
            if current is not None and line[:1] in (" ", "\t"):
                found[current].extend(line.split())
                continue
            current = None
            opt = _IGNOREIP.match(line)
            if opt and section is not None:
                found[section] = opt.group(1).split()
                current = section
    return found


def base_ignoreip(conf_dir, jails, exclude=None):
    """{jail: tokens or None}: the ignoreip each jail gets outside the managed file.

    None means no ignoreip is set for that jail anywhere (fail2ban then ignores
    nothing but itself, and %(known/ignoreip)s cannot be used).
    """
    texts = [read_text(path) for path in config_files(conf_dir, exclude)]
    found = scan_ignoreip(texts)
    result = {}
    for jail in jails:
        if jail in found:
            result[jail] = found[jail]
        elif "DEFAULT" in found:
            result[jail] = found["DEFAULT"]
        else:
            result[jail] = None
    return result


def read_text(path):
    """A config file as text whatever the target's locale (Python 3.6 under LANG=C would
    otherwise fail on an accented comment); None when it does not exist."""
    if not os.path.exists(path):
        return None
    with io.open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def later_overrides(conf_dir, path, jails):
    """Config files read after the managed one that set ignoreip for one of these jails
    (or DEFAULT): they would override the managed whitelist on the next reload."""
    files = config_files(conf_dir)
    real = os.path.realpath(path)
    names = [os.path.realpath(f) for f in files]
    if real not in names:
        return []
    found = []
    for f in files[names.index(real) + 1:]:
        sections = scan_ignoreip([read_text(f) or ""])
        if any(j in sections for j in jails):
            found.append(f)
    return found


def managed_jails(text):
    """The jail sections of the managed file (kept even while a jail is not running)."""
    return [m.group(1).strip() for m in re.finditer(r"^\[([^\]]+)\]\s*$", text or "", re.M)]


def parse_managed(text):
    """Addresses listed in the managed file, in first-seen order, without duplicates."""
    order = []
    for line in text.splitlines():
        m = _IGNOREIP.match(line)
        if m:
            for token in m.group(1).split():
                if token != KNOWN and token not in order:
                    order.append(token)
    return order


# When each managed address was added, as comment lines fail2ban ignores: "# added ADDR DATE".
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_STAMP_LINE = re.compile(r"^#\s*added\s+(\S+)\s+([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)\s*$", re.M)


def stamp(epoch):
    """An epoch time as the UTC date written in the managed file."""
    return time.strftime(STAMP_FORMAT, time.gmtime(epoch))


def parse_stamps(text):
    """{address: epoch seconds} from the "# added ADDR DATE" lines of the managed file; a date
    that is not one (a slip of a hand edit) counts as none."""
    found = {}
    for m in _STAMP_LINE.finditer(text or ""):
        try:
            found[m.group(1)] = calendar.timegm(time.strptime(m.group(2), STAMP_FORMAT))
        except ValueError:
            continue
    return found


def expired_addresses(addresses, added, now, days, keep=None):
    """Addresses added more than `days` days before `now` (0 days: none), except `keep`.
    An address without a date never expires here (the module dates it first)."""
    if not days or days <= 0:
        return []
    limit = now - days * 86400
    return [a for a in addresses if a != keep and a in added and added[a] < limit]


def render_managed(addresses, jails, base, added=None):
    """Content of the managed jail.d file for these addresses and jails; `added` gives the
    date line of each address that has one ({address: epoch seconds})."""
    if not addresses:
        return MANAGED_HEADER
    parts = [MANAGED_HEADER]
    added = added or {}
    parts.extend("# added %s %s\n" % (a, stamp(added[a])) for a in addresses if a in added)
    for jail in sorted(jails):
        prefix = [KNOWN] if base.get(jail) is not None else []
        parts.append("\n[%s]\nignoreip = %s\n" % (jail, " ".join(prefix + list(addresses))))
    return "".join(parts)


class Client:
    """fail2ban-client with a fixed config dir / socket, run through AnsibleModule.run_command.

    The fallback of module_utils/fail2ban_socket.SocketClient, with the same methods."""

    name = "client"

    def __init__(self, module, executable, conf_dir, sock=None):
        self.module = module
        self.argv = [executable, "-c", conf_dir]
        if sock:
            self.argv += ["-s", sock]

    def run(self, *args):
        """(rc, stdout, stderr) of one client command."""
        return self.module.run_command(self.argv + list(args))

    def call(self, *args):
        rc, out, err = self.run(*args)
        if rc != 0:
            raise Fail2banError(
                "fail2ban-client %s failed (rc=%s): %s" % (" ".join(args), rc, (err or out).strip()[:300])
            )
        return out

    def close(self):
        pass

    def config_test(self, conf_dir):
        """None: the caller runs `fail2ban-client -t` (SocketClient does the test in its helper)."""
        return None

    def jails(self, wanted=None):
        if wanted:
            return list(wanted)
        return parse_status_jails(self.call("status"))

    def unban(self, jail, ip):
        self.call("set", jail, "unbanip", ip)

    def ignoreip(self, jail):
        return parse_ignoreip(self.call("get", jail, "ignoreip"))

    def ignoreip_change(self, jail, command, ip):
        """addignoreip/delignoreip; returns the jail's new ignore list."""
        return parse_ignoreip(self.call("set", jail, command, ip))

    def banned_in(self, ip, jails):
        """(jails banning ip, method used): `banned IP`, else per jail `get J banned IP`, else `status J`."""
        rc, out, err = self.run("banned", ip)
        if rc == 0:
            try:
                return [j for j in parse_banned_ip(out) if j in jails], "banned"
            except Fail2banError:
                pass
        result = []
        try:
            for jail in jails:
                rc, out, err = self.run("get", jail, "banned", ip)
                if rc != 0:
                    raise Fail2banError(out)
                if parse_get_banned_ip(out):
                    result.append(jail)
            return result, "get-banned"
        except Fail2banError:
            pass
        result = [j for j in jails if ip in parse_status_banned(self.call("status", j))]
        return result, "status"


# module.backup_local() names a copy <file>.<pid>.<YYYY-MM-DD@HH:MM:SS>~
_BACKUP_SUFFIX = re.compile(r"^\.[0-9]+\.([0-9]{4}-[0-9]{2}-[0-9]{2}@[0-9]{2}:[0-9]{2}:[0-9]{2})~$")


def backups_to_prune(names, base, keep):
    """Backup names of file `base` beyond the newest `keep` (0 keeps all), oldest first."""
    if keep <= 0:
        return []
    dated = []
    for name in names:
        if name.startswith(base):
            match = _BACKUP_SUFFIX.match(name[len(base):])
            if match:
                dated.append((match.group(1), name))
    dated.sort()
    return [name for _stamp, name in dated[:-keep]] if len(dated) > keep else []
