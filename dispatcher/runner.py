"""The ansible-runner bridge: run one playbook for one job, collect per-host results.

The only module that imports ansible_runner. Every run gets a fresh private
data dir, mode 0700 (reusing one leaks extravars between jobs: ansible-runner
#493, #1440), `suppress_env_files=True`, a timeout, and an artifact dir that is
scrubbed of the environment ansible-runner records (the `command` file holds
the whole process environment).

Extravars never go on the command line (every local user reads
/proc/<pid>/cmdline): they are written to <private data dir>/env/extravars,
mode 0600, which ansible-runner passes as `-e @file`. Every string in them is
tagged `!unsafe`, so text from an email (`{{ 7*7 }}@example.com`) reaches the
playbook as it is and is never templated. The dispatcher keeps its private
data dirs under state/run/ (not /tmp), so what a killed run leaves behind is
found and removed at the next start (`scrub_private_dirs`).

Playbooks report what they did with `ansible.builtin.set_stats` under the key
`athome_report`, one entry per host (`aggregate: true` merges them). That is
what ops see under CUSTOM STATS when they run a playbook by hand, and what the
reply templates show.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner
import yaml

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK_DIR = REPO_ROOT / "playbooks"
REPORT_KEY = "athome_report"

# Files ansible-runner leaves in an artifact dir that can carry the environment
# (`command` records it whole) or facts; they are removed after every run.
_SENSITIVE_ARTIFACTS = ("command", "env", "fact_cache")
RUN_PREFIX = "athome-run-"
# ssh's ControlPath is <dir>/<10 hex>, plus a 17-character suffix while the master starts,
# and a socket path holds at most 107 bytes: when <pdd>/cp-XXXXXXXX would be longer than
# this, the run's sockets go to a dir in the system tmp instead (sockets only, no secret).
_MAX_CONTROL_DIR = 79


class _Unsafe(str):
    """A string written with the `!unsafe` tag: Ansible uses it as it is, never templates it."""


class _ExtravarsDumper(yaml.SafeDumper):
    pass


_ExtravarsDumper.add_representer(
    _Unsafe, lambda dumper, s: dumper.represent_scalar("!unsafe", str(s), style="'")
)
_RESOLVER = yaml.resolver.Resolver()


def _plain_text(value: str) -> bool:
    """The text a YAML loader reads as a string when it resolves tags itself. ansible-core
    2.19 resolves the value of an `!unsafe` scalar again, quoted or not: `!unsafe '0010'`
    came back as the octal integer 8 (a MAC 010203040506 as 1108099398). A text that
    resolves to a number, a boolean, null or a date cannot hold a template either."""
    return _RESOLVER.resolve(yaml.ScalarNode, value, (True, False)) == "tag:yaml.org,2002:str"


def _unsafe(value):
    """Tag every string value (in nested dicts and lists too) that a loader keeps as text;
    the others are written quoted. Keys stay plain."""
    if isinstance(value, str):
        return _Unsafe(value) if _plain_text(value) else value
    if isinstance(value, dict):
        return {k: _unsafe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unsafe(v) for v in value]
    return value


def write_extravars(private_data_dir: str | os.PathLike, extravars: dict) -> Path:
    """Write <private_data_dir>/env/extravars (YAML, mode 0600), every string `!unsafe`."""
    env_dir = Path(private_data_dir) / "env"
    env_dir.mkdir(mode=0o700, exist_ok=True)
    path = env_dir / "extravars"
    text = yaml.dump(_unsafe(dict(extravars)), Dumper=_ExtravarsDumper, allow_unicode=True, sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _private_data_dir(private_root: str | os.PathLike | None) -> str:
    """A fresh 0700 dir: under private_root (created 0700) or, without one, in the system tmp."""
    if private_root is None:
        return tempfile.mkdtemp(prefix=RUN_PREFIX)
    root = Path(private_root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return tempfile.mkdtemp(prefix=RUN_PREFIX, dir=root)


@dataclass
class HostResult:
    host: str
    status: str = "ok"  # ok | changed | failed | unreachable | skipped
    report: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "changed", "skipped")


@dataclass
class PlaybookResult:
    playbook: str
    status: str  # successful | failed | timeout | canceled
    rc: int
    hosts: dict[str, HostResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # play-level errors (no host)
    elapsed: float = 0.0

    @property
    def succeeded(self) -> bool:
        # No host at all (an inventory that matched nothing) is not a success.
        return (
            self.status == "successful" and bool(self.hosts) and all(h.succeeded for h in self.hosts.values())
        )

    @property
    def unreachable(self) -> list[str]:
        return sorted(h for h, r in self.hosts.items() if r.status == "unreachable")

    @property
    def failed(self) -> list[str]:
        return sorted(h for h, r in self.hosts.items() if r.status == "failed")

    def without(self, names: tuple[str, ...]) -> PlaybookResult:
        """Drop hosts that are not part of the answer; their errors stay as play errors."""
        hosts = {h: r for h, r in self.hosts.items() if h not in names}
        errors = list(self.errors)
        for name in names:
            if name in self.hosts:
                errors.extend(self.hosts[name].errors)
        return PlaybookResult(self.playbook, self.status, self.rc, hosts, errors, self.elapsed)

    def to_dict(self) -> dict:
        return {
            "playbook": self.playbook,
            "status": self.status,
            "rc": self.rc,
            "elapsed": round(self.elapsed, 3),
            "errors": self.errors,
            "hosts": {
                h: {"status": r.status, "report": r.report, "errors": r.errors}
                for h, r in sorted(self.hosts.items())
            },
        }


def base_envvars(control_path_dir: str | None = None) -> dict[str, str]:
    """Environment for ansible-playbook: UTF-8 locale, pipelining, isolated ssh sockets."""
    env = {
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        # A broken inventory must fail the run, not turn into "no hosts matched".
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    if control_path_dir:
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = control_path_dir
    return env


def run_playbook(
    playbook: str,
    *,
    inventory: str | os.PathLike,
    extravars: dict | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    timeout: int = 900,
    forks: int = 20,
    artifacts_dir: str | os.PathLike | None = None,
    ident: str | None = None,
    envvars: dict[str, str] | None = None,
    private_root: str | os.PathLike | None = None,
) -> PlaybookResult:
    """Run playbooks/<playbook> and return what happened on each host.

    `artifacts_dir` keeps the (scrubbed) stdout and job events of the run under
    artifacts_dir/<ident>; without it nothing is kept. `private_root` is where
    the run's private data dir is made (removed after the run); without it,
    the system's tmp.
    """
    started = time.monotonic()
    path = PLAYBOOK_DIR / playbook
    if not path.is_file():
        raise FileNotFoundError(f"no playbook {path}")
    cmdline = []
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    # ansible-runner starts `ansible-playbook` from PATH: make it the one next
    # to this interpreter even when the venv is not activated.
    bindir = os.path.dirname(sys.executable)
    pdd = _private_data_dir(private_root)
    cp_parent = pdd if len(os.path.join(pdd, "cp-XXXXXXXX")) <= _MAX_CONTROL_DIR else None
    cp_dir = tempfile.mkdtemp(prefix="cp-" if cp_parent else "athome-cp-", dir=cp_parent)
    try:
        # ansible-runner adds `-e @<pdd>/env/extravars` itself when the file exists.
        write_extravars(pdd, extravars or {})
        env = base_envvars(cp_dir)
        env.update(envvars or {})
        env["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        artifact_root = os.path.join(pdd, "artifacts")
        runner = ansible_runner.run(
            private_data_dir=pdd,
            project_dir=str(REPO_ROOT),
            playbook=str(path),
            inventory=str(Path(inventory).resolve()),
            limit=limit,
            forks=forks,
            cmdline=" ".join(cmdline) or None,
            envvars=env,
            artifact_dir=artifact_root,
            ident=ident,
            quiet=True,
            suppress_env_files=True,
            timeout=timeout,
        )
        result = _collect(playbook, runner)
        _close_control_masters(cp_dir)
        if artifacts_dir is not None:
            _keep_artifacts(Path(runner.config.artifact_dir), Path(artifacts_dir))
    finally:
        shutil.rmtree(pdd, ignore_errors=True)
        shutil.rmtree(cp_dir, ignore_errors=True)
    result.elapsed = time.monotonic() - started
    log.info(
        "playbook %s finished: status=%s rc=%s hosts=%s in %.1fs",
        playbook,
        result.status,
        result.rc,
        {h: r.status for h, r in result.hosts.items()},
        result.elapsed,
    )
    return result


def _collect(playbook: str, runner) -> PlaybookResult:
    result = PlaybookResult(playbook=playbook, status=runner.status, rc=runner.rc)
    stats = runner.stats or {}

    def host(name: str) -> HostResult:
        return result.hosts.setdefault(name, HostResult(name))

    for name in stats.get("processed", {}):
        host(name)
    for name in stats.get("changed", {}):
        host(name).status = "changed"
    for name in stats.get("failures", {}):
        host(name).status = "failed"
    for name in stats.get("dark", {}):
        host(name).status = "unreachable"
    for ev in runner.events:
        kind = ev.get("event")
        data = ev.get("event_data", {})
        if kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res", {}) or {}
            msg = res.get("msg") or res.get("stderr") or res.get("module_stderr") or "failed"
            host(data.get("host", "?")).errors.append(f"{data.get('task', '').strip()}: {msg}")
        elif kind == "playbook_on_stats":
            report = (data.get("artifact_data") or {}).get(REPORT_KEY) or {}
            for name, entry in report.items():
                host(name).report = entry if isinstance(entry, dict) else {"value": entry}
        elif kind == "error" or (kind == "verbose" and "ERROR!" in ev.get("stdout", "")):
            result.errors.append(ev.get("stdout", "").strip())
    if runner.status == "timeout":
        result.errors.append("the playbook ran past its time limit and was stopped")
    if result.rc != 0 and not result.hosts and not result.errors:
        # ansible-playbook failed before any host (syntax, inventory, assert on
        # localhost...): keep the tail of its output for the reply and the log.
        tail = [line for line in runner.stdout.read().splitlines() if line.strip()][-5:]
        result.errors.append("\n".join(tail) or f"ansible-playbook exited with {result.rc}")
    return result


def _close_control_masters(cp_dir: str) -> None:
    """End the ControlPersist ssh masters this run opened (they hold sockets in cp_dir)."""
    for sock in Path(cp_dir).glob("*"):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
            capture_output=True,
            timeout=10,
            check=False,
        )


def _keep_artifacts(src: Path, dest_root: Path) -> None:
    dest = dest_root / src.name
    for name in _SENSITIVE_ARTIFACTS:
        target = src / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()
    dest_root.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)


def scrub_private_dirs(root: str | os.PathLike) -> int:
    """Remove the private data dirs a killed run left under root; returns how many went.

    They hold the run's extravars and, in artifacts/*/command, its environment. Only
    for the process that runs the playbooks there, before it runs any (at start).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.glob(RUN_PREFIX + "*"):
        if entry.is_symlink() or not entry.is_dir():
            continue
        for cp_dir in entry.glob("cp-*"):
            _close_control_masters(str(cp_dir))
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed += 1
    return removed


def prune_artifacts(root: str | os.PathLike, max_age_days: float) -> int:
    """Remove kept artifact dirs older than max_age_days; returns how many went."""
    root = Path(root)
    if not root.is_dir():
        return 0
    cutoff = time.time() - max_age_days * 86400
    removed = 0
    for entry in root.iterdir():
        if entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
