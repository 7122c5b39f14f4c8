"""The inventory straight from git: fetch, check, then switch (config `inventory.git`).

Ops change the fleet by pushing to the inventory's repository. The service keeps a
bare mirror under `state/inventory/repo.git` and, every `interval_seconds`:

  1. fetches the branch (`git fetch`; the service user's SSH key, or a local path);
  2. for a new commit, exports its tree into `state/inventory/revs/<sha>.tmp` (its own
     checkout, never the one jobs read), runs the checks of `athome check` on it
     (`inventory.check`), and renames it to `revs/<sha>`;
  3. only a commit that passes is put in force, atomically: the symlink
     `state/inventory/current` is replaced (rename of a new link over the old), so a
     job sees the old revision or the new one, never a mix. A job resolves the link
     when it starts and keeps that revision to its end (older revisions are kept a
     while for it).

A commit that fails the checks is never used: the previous good one stays in force,
the admins get one mail naming the commit and the problems (`on_rejected`, once per
commit), and it is not checked again. `state/inventory/state.json` says what is in
force and when the last fetch was (`athome status`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dispatcher import inventory
from dispatcher.errors import AthomeError
from dispatcher.health import Health

log = logging.getLogger(__name__)

KEEP_REVISIONS = 5  # old checkouts kept for jobs that started on them
KEEP_SECONDS = 6 * 3600  # ... and none younger than this is removed
GIT_TIMEOUT = 120


@dataclass(frozen=True)
class GitSettings:
    url: str
    branch: str = "main"
    subdir: str = ""  # where the inventory lies inside the repository ('' = its root)
    interval_seconds: int = 60


def url_problem(url: str) -> str:
    """Why this remote cannot be used ('' when it can): a password in the URL would be
    visible to every local user in the process list while git runs."""
    if not url.strip():
        return "url is empty"
    if "://" in url:
        parts = urlsplit(url)
        if parts.password:
            return "url holds a password: use an SSH key, or a credential helper of the service user"
        if parts.scheme not in ("ssh", "https", "http", "file", "git"):
            return f"url scheme {parts.scheme!r} is not supported"
    return ""


def revision(path: str | os.PathLike) -> str:
    """The commit an inventory path is at: its revs/<sha> checkout when it comes from
    `inventory.git`, else the HEAD of the git work tree it lies in ('' outside git)."""
    found = GitInventory.revision_of(path)
    if found:
        return found
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""


class GitInventory:
    """The fetch/check/switch cycle of one repository, under `root` (state/inventory)."""

    def __init__(
        self,
        settings: GitSettings,
        root: str | os.PathLike,
        on_rejected: Callable[[str, str, list[str]], None] | None = None,
        deployment: bool = True,
    ):
        self.settings = settings
        self.root = Path(root)
        self.mirror = self.root / "repo.git"
        self.revs = self.root / "revs"
        self.current = self.root / "current"
        self.state_file = self.root / "state.json"
        self._notes = Health(self.state_file)  # an atomically rewritten JSON of notes
        self.on_rejected = on_rejected
        self.deployment = deployment
        self._lock = threading.Lock()

    # -------------------------------------------------------------- paths

    @property
    def path(self) -> Path:
        """The inventory as jobs read it: through the `current` link."""
        return self.current / self.settings.subdir if self.settings.subdir else self.current

    def revision(self) -> str:
        """The commit in force ('' before the first good one)."""
        try:
            return Path(os.readlink(self.current)).name
        except OSError:
            return ""

    @staticmethod
    def revision_of(path: str | os.PathLike) -> str:
        """The commit a resolved inventory path belongs to ('' outside a revs/ checkout)."""
        parts = Path(path).resolve().parts
        if "revs" in parts:
            name = parts[parts.index("revs") + 1]
            if len(name) == 40 and all(c in "0123456789abcdef" for c in name):
                return name
        return ""

    def state(self) -> dict[str, Any]:
        return self._notes.read()

    def _note(self, **fields: Any) -> None:
        self._notes.note(**fields)

    # ---------------------------------------------------------------- git

    def _git(
        self, *args: str, cwd: Path | None = None, stdout=subprocess.PIPE
    ) -> subprocess.CompletedProcess:
        env = dict(
            os.environ,
            GIT_TERMINAL_PROMPT="0",  # never wait for a password on a terminal nobody watches
            GIT_SSH_COMMAND=os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=15"),
        )
        proc = subprocess.run(  # noqa: S603 - fixed git argv, the URL checked by url_problem
            ["git", *args],  # noqa: S607 - git from PATH, as the operator installed it
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=GIT_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
            why = (fatal or lines or [f"exit status {proc.returncode}"])[0]
            what = next((a for a in args if not a.startswith("-") and "/" not in a), "command")
            raise AthomeError(f"git {what} failed: {why}")
        return proc

    def _ensure_mirror(self) -> None:
        if (self.mirror / "HEAD").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "repo.git.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self._git("init", "--bare", "--quiet", str(tmp))
        self._git("--git-dir", str(tmp), "remote", "add", "origin", self.settings.url)
        os.replace(tmp, self.mirror)

    def _fetch(self) -> str:
        """The branch's commit on the remote, fetched into the mirror."""
        self._ensure_mirror()
        ref = f"refs/remotes/origin/{self.settings.branch}"
        self._git("--git-dir", str(self.mirror), "remote", "set-url", "origin", self.settings.url)
        self._git(
            "--git-dir", str(self.mirror), "fetch", "--quiet", "--prune", "origin",
            f"+refs/heads/{self.settings.branch}:{ref}",
        )  # fmt: skip
        return self._git("--git-dir", str(self.mirror), "rev-parse", ref).stdout.decode().strip()

    def describe(self, sha: str) -> str:
        """'abc1234 Subject of the commit (author)' for logs and the admins' mail."""
        try:
            out = self._git("--git-dir", str(self.mirror), "log", "-1", "--format=%h %s (%an)", sha)
            return out.stdout.decode(errors="replace").strip()[:200]
        except AthomeError:
            return sha[:12]

    def _export(self, sha: str) -> Path:
        """The commit's tree in its own directory (revs/<sha>), written fully first."""
        final = self.revs / sha
        if final.is_dir():
            return final
        self.revs.mkdir(parents=True, exist_ok=True)
        tmp = self.revs / f"{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tempfile.TemporaryFile() as archive:
            self._git("--git-dir", str(self.mirror), "archive", "--format=tar", sha, stdout=archive)
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(tmp, filter="data")  # no links out, no devices, no absolute paths
        os.replace(tmp, final)
        return final

    def _switch(self, sha: str) -> None:
        link = self.root / "current.tmp"
        link.unlink(missing_ok=True)
        os.symlink(Path("revs") / sha, link)
        os.replace(link, self.current)  # atomic: the old revision or the new one

    def _prune(self) -> None:
        keep = {self.revision()}
        revs = sorted(
            (p for p in self.revs.iterdir() if p.is_dir() and not p.name.endswith(".tmp")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        now = time.time()
        for n, rev in enumerate(revs):
            if rev.name in keep or n < KEEP_REVISIONS or now - rev.stat().st_mtime < KEEP_SECONDS:
                continue
            shutil.rmtree(rev, ignore_errors=True)

    # ------------------------------------------------------------- the cycle

    def sync(self) -> str:
        """Fetch, check and switch once. Returns the revision in force afterwards. Raises
        AthomeError when the remote cannot be read (the revision in force stays)."""
        with self._lock:
            try:
                sha = self._fetch()
            except (AthomeError, OSError, subprocess.TimeoutExpired) as exc:
                self._note(last_fetch_error=str(exc)[:300], last_fetch_error_at=time.time())
                raise AthomeError(f"inventory fetch from {self.settings.branch}: {exc}") from exc
            self._note(last_fetch=time.time(), remote_revision=sha, last_fetch_error="")
            state = self.state()
            if sha == self.revision() or sha in state.get("rejected", {}):
                return self.revision()
            try:
                checkout = self._export(sha)
            except tarfile.TarError as exc:  # a link out of the tree, an absolute path...
                checkout = self.revs / f"{sha}.tmp"
                problems = [f"the commit's files cannot be checked out safely: {exc}"]
            else:
                target = checkout / self.settings.subdir if self.settings.subdir else checkout
                problems = inventory.check(target, deployment=self.deployment)
            described = self.describe(sha)
            if problems:
                log.error(
                    "inventory commit %s refused, %s stays in force: %s",
                    described,
                    self.revision()[:12] or "none",
                    "; ".join(problems),
                )
                rejected = {**state.get("rejected", {}), sha: {"at": time.time(), "problems": problems[:20]}}
                self._note(rejected=dict(list(rejected.items())[-20:]))
                shutil.rmtree(checkout, ignore_errors=True)
                if self.on_rejected is not None:
                    self.on_rejected(sha, described, problems)
                return self.revision()
            previous = self.revision()
            self._switch(sha)
            self._note(revision=sha, revision_described=described, switched_at=time.time())
            log.info("inventory: %s in force (was %s)", described, previous[:12] or "none")
            self._prune()
            return sha

    def forever(self, stop: threading.Event, health=None) -> None:
        """`sync` every interval until `stop`; a failure is logged and retried next time."""
        while not stop.is_set():
            try:
                self.sync()
                if health is not None:
                    health.ok("inventory")
            except Exception as exc:
                log.error("%s; the revision in force stays", exc)
                if health is not None:
                    health.error("inventory", str(exc))
            stop.wait(self.settings.interval_seconds)
