"""The inventory as the dispatcher sees it: hosts, groups and the host vars commands need.

Loaded with ansible's own InventoryManager, so group_vars, host_vars and every
inventory format behave exactly as they do for `ansible-playbook`. The view
is reloaded when any file under the inventory path changes: ops edit the
inventory in git, pull, and the next command sees the change, no restart.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatcher.errors import ConfigError
from dispatcher.grammar import HostFacts, ParseContext

log = logging.getLogger(__name__)

AUDIOS_FROM = ("audio", "s3")
KNOWN_GROUPS = ("sip_servers", "fail2ban_servers", "mac_servers", "recordings")
REQUIRED_VARS = {
    "mac_servers": ("endpoint_mac_endpoints_def", "endpoint_mac_endpoints_sip"),
    "recordings": ("recordings_root", "recordings_publish_dir", "recordings_publish_base_url"),
}
S3_VARS = ("recordings_s3_bucket", "recordings_s3_results_bucket")


@dataclass(frozen=True)
class Host:
    name: str
    groups: frozenset[str]
    vars: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def enabled(self) -> bool:
        value = self.vars.get("enabled", True)
        return value if isinstance(value, bool) else str(value).lower() in ("true", "yes", "1")


@dataclass
class Inventory:
    path: Path
    hosts: dict[str, Host]

    def group(self, name: str, enabled_only: bool = True) -> list[Host]:
        return sorted(
            (h for h in self.hosts.values() if name in h.groups and (h.enabled or not enabled_only)),
            key=lambda h: h.name,
        )

    def parse_context(self, max_window_days: int) -> ParseContext:
        return ParseContext(
            hosts={h.name: HostFacts(h.name, h.groups, h.enabled) for h in self.hosts.values()},
            max_window_days=max_window_days,
        )

    def problems(self) -> list[str]:
        """Everything wrong with the inventory for the dispatcher, in one pass."""
        found = []
        for group in KNOWN_GROUPS:
            if not any(group in h.groups for h in self.hosts.values()):
                found.append(f"group {group} is missing or empty")
        for h in sorted(self.hosts.values(), key=lambda h: h.name):
            enabled = h.vars.get("enabled", True)
            if not isinstance(enabled, bool):
                found.append(f"{h.name}: enabled must be true or false, not {enabled!r}")
            if "sip_servers" in h.groups:
                src = h.vars.get("audios_from")
                if src not in AUDIOS_FROM:
                    found.append(f"{h.name}: audios_from is {src!r}; expected one of {AUDIOS_FROM}")
                elif src == "audio" and not self.group("recordings"):
                    found.append(f"{h.name}: audios_from is 'audio' but no enabled host in recordings")
            for group in ("fail2ban_servers", "mac_servers"):
                if group in h.groups and "sip_servers" not in h.groups:
                    found.append(f"{h.name}: in {group} but not in sip_servers")
            # Facts a command cannot guess: they must be stated per host (or group).
            for group, keys in REQUIRED_VARS.items():
                if group in h.groups and h.enabled:
                    missing = [k for k in keys if not h.vars.get(k)]
                    if missing:
                        found.append(f"{h.name}: in {group} but {', '.join(missing)} not set")
            if "sip_servers" in h.groups and h.enabled and h.vars.get("audios_from") == "s3":
                missing = [k for k in S3_VARS if not h.vars.get(k)]
                if missing:
                    found.append(f"{h.name}: audios_from is 's3' but {', '.join(missing)} not set")
        return found


def _files_signature(path: Path) -> tuple:
    if path.is_file():
        st = path.stat()
        return ((str(path), st.st_mtime_ns, st.st_size),)
    sig = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            sig.append((p, st.st_mtime_ns, st.st_size))
    return tuple(sorted(sig))


def load(path: str | os.PathLike) -> Inventory:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    path = Path(path)
    if not path.exists():
        raise ConfigError([f"inventory {path} does not exist"])
    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(path)])
    variables = VariableManager(loader=loader, inventory=manager)
    hosts = {}
    for host in manager.get_hosts(ignore_restrictions=True):
        groups = frozenset(g.name for g in host.get_groups() if g.name not in ("all", "ungrouped"))
        hv = variables.get_vars(host=host, include_hostvars=False)
        keep = {k: v for k, v in hv.items() if not k.startswith("ansible_") or k == "ansible_host"}
        keep = {
            k: v
            for k, v in keep.items()
            if k
            not in (
                "groups",
                "group_names",
                "inventory_hostname",
                "inventory_hostname_short",
                "inventory_dir",
                "inventory_file",
                "omit",
                "playbook_dir",
            )
        }
        hosts[host.name] = Host(host.name, groups, keep)
    if not hosts:
        raise ConfigError([f"inventory {path} has no hosts"])
    return Inventory(path, hosts)


def check(path: str | os.PathLike, deployment: bool = True) -> list[str]:
    """Everything `athome check` finds wrong with the inventory at `path` ([] when none).
    `deployment`: a real site, where placeholder addresses (.invalid) must be replaced."""
    problems: list[str] = []
    try:
        inv = load(path)
    except ConfigError as exc:
        return list(exc.problems)
    except Exception as exc:  # ansible's own parse errors
        return [f"{path}: {exc}"]
    problems += inv.problems()
    if deployment:
        problems += [
            f"{h.name}: ansible_host {h.vars['ansible_host']} is a placeholder"
            for h in inv.hosts.values()
            if h.enabled and str(h.vars.get("ansible_host", "")).endswith(".invalid")
        ]
    return problems


class InventoryWatcher:
    """Returns the current inventory, reloading it when its files change."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._sig: tuple | None = None
        self._inv: Inventory | None = None
        self._lock = threading.Lock()  # intake and the workers read it from their threads

    def get(self) -> Inventory:
        with self._lock:
            return self._get()

    def _get(self) -> Inventory:
        # The resolved path too: an inventory from git is switched by a symlink swap.
        sig = (os.path.realpath(self.path), *_files_signature(self.path)) if self.path.exists() else ()
        if self._inv is None or sig != self._sig:
            try:
                inv = load(self.path)
            except Exception as exc:
                if self._inv is None:
                    raise
                # A half-written file during `git pull`, or a bad push: keep serving the last good one.
                log.error("inventory %s does not load (%s); keeping the last good version", self.path, exc)
                return self._inv
            if self._inv is not None:
                log.info("inventory %s changed: reloaded (%d hosts)", self.path, len(inv.hosts))
            self._inv, self._sig = inv, sig
        return self._inv
