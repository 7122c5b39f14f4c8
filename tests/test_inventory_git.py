"""The inventory straight from git (`inventory.git`), with the real service and a local
bare repository: a good push is used by the next job without a restart; a broken push
is refused (the admins told once, naming the commit; jobs keep the last good revision);
a fix is used. Every job records the revision it ran with."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dispatcher import config
from dispatcher.gitinventory import GitInventory, GitSettings, url_problem
from tests import servers
from tests.messages import status_of
from tests.test_end_to_end import (  # noqa: F401 - fixtures
    ADMIN,
    USER,
    athome,
    body,
    command_email,
    replies,
    site,
    smtp,
    smtp_submission,
    start_service,
)


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "Ops", "GIT_AUTHOR_EMAIL": "ops@example.test", "HOME": str(repo.parent)}
    env.update(GIT_COMMITTER_NAME="Ops", GIT_COMMITTER_EMAIL="ops@example.test", PATH="/usr/bin:/bin")
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


class InventoryRepo:
    """A clone that ops push from, and the bare repository the service fetches."""

    def __init__(self, workdir: Path, source: Path):
        self.bare = workdir / "inventory.git"
        self.work = workdir / "inventory-src"
        subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(self.bare)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)
        shutil.copytree(source, self.work / "production")
        git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def hosts_file(self) -> Path:
        return self.work / "production" / "hosts.yml"

    def edit(self, change) -> None:
        data = yaml.safe_load(self.hosts_file.read_text())
        change(data["all"]["children"])
        self.hosts_file.write_text(yaml.safe_dump(data, sort_keys=False))

    def push(self, message: str) -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD")


def set_enabled(host: str, enabled):
    def change(groups):
        groups["sip_servers"]["hosts"][host]["enabled"] = enabled

    return change


def state(where) -> dict:
    path = where["state"] / "inventory" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def complete(groups) -> None:
    """What `athome check` requires of the e2e inventory's MAC and recordings hosts."""
    groups["mac_servers"]["hosts"]["gv1p"].update(
        endpoint_mac_endpoints_def="/srv/provisioning/__ENDPOINTS__.DEF",
        endpoint_mac_endpoints_sip="/srv/provisioning/endpoints_sip.def",
    )
    groups["recordings"]["hosts"]["audio"].update(
        recordings_root="/var/spool/asterisk/monitor",
        recordings_publish_dir="/var/www/recordings",
        recordings_publish_base_url="https://files.example.test/recordings",
    )


@pytest.fixture
def git_site(site):  # noqa: F811 - the e2e fixture
    repo = InventoryRepo(site["workdir"], site["workdir"] / "inventory")
    repo.edit(complete)
    data = yaml.safe_load(site["cfg"].read_text())
    data["inventory"] = {
        "git": {"url": str(repo.bare), "branch": "main", "subdir": "production", "interval_seconds": 1}
    }
    site["cfg"].write_text(yaml.safe_dump(data))
    site["repo"] = repo
    return site


def result_for(sink, msgid: str):
    found = [m for m in replies(sink) if m["In-Reply-To"] == msgid and "recebido" not in status_of(m)]
    return found[0] if found else None


def test_pushes_are_used_refused_and_fixed_without_a_restart(git_site, dovecot, smtp):  # noqa: F811
    site, repo = git_site, git_site["repo"]  # noqa: F811
    repo.edit(set_enabled("gv3p", False))
    first = repo.push("gv3p out for maintenance")
    service = start_service(site["cfg"])
    try:
        in_force = lambda sha: lambda: state(site).get("revision") == sha  # noqa: E731
        servers.wait_for(in_force(first), "the first revision in force", 120, service)

        # 1. the first revision: gv3p disabled, so CHECKIP leaves it alone
        dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=3.3.3.3", msgid="<c1@example.test>"))
        servers.wait_for(lambda: result_for(smtp, "<c1@example.test>"), "the first result", 240, service)
        one = result_for(smtp, "<c1@example.test>")
        assert "gv1p" in body(one) and "gv3p: desativado" in body(one)
        assert f"Inventário: {first[:12]}" in body(one)
        assert "3.3.3.3" not in site["f2b"]["gv3p"].ignore_list("asterisk")
        assert "3.3.3.3" in site["f2b"]["gv1p"].ignore_list("asterisk")

        # 2. a good push: the next job uses it, no restart
        repo.edit(set_enabled("gv3p", True))
        second = repo.push("gv3p back")
        servers.wait_for(in_force(second), "the second revision", 120, service)
        dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=4.4.4.4", msgid="<c2@example.test>"))
        servers.wait_for(lambda: result_for(smtp, "<c2@example.test>"), "the second result", 240, service)
        two = result_for(smtp, "<c2@example.test>")
        assert "gv3p: desativado" not in body(two) and f"Inventário: {second[:12]}" in body(two)
        assert "4.4.4.4" in site["f2b"]["gv3p"].ignore_list("asterisk")

        # 3. a broken push: refused, the admins told once, jobs keep the second revision
        repo.edit(set_enabled("gv2p", "maybe"))
        broken = repo.push("typo in gv2p")
        servers.wait_for(
            lambda: broken in state(site).get("rejected", {}), "the broken commit refused", 120, service
        )
        alerts = lambda: [m for m in replies(smtp) if "inventário recusada" in status_of(m)]  # noqa: E731
        servers.wait_for(alerts, "the admins' mail", 120, service)
        [alert] = alerts()
        assert alert["To"] == ADMIN and broken[:12] in body(alert) and "typo in gv2p" in body(alert)
        assert "enabled must be true or false" in body(alert)
        dovecot.deliver(USER, command_email(f"[{site['token']}] CHECKIP=5.5.5.5", msgid="<c3@example.test>"))
        servers.wait_for(lambda: result_for(smtp, "<c3@example.test>"), "the third result", 240, service)
        assert f"Inventário: {second[:12]}" in body(result_for(smtp, "<c3@example.test>"))
        assert state(site)["revision"] == second
        status = json.loads(athome(site["cfg"], "status", "--json", check=False).stdout)
        assert status["inventory"]["remote_refused"] and status["inventory"]["revision"] == second
        assert any("was refused" in r for r in status["reasons"])

        # 4. the fix: in force; the broken commit was mailed about once, whatever the passes
        repo.edit(set_enabled("gv2p", True))
        fixed = repo.push("fix gv2p")
        servers.wait_for(in_force(fixed), "the fix in force", 120, service)
        assert len(alerts()) == 1
    finally:
        service.terminate()
        service.wait(timeout=120)
    done = [json.loads(p.read_text()) for p in (site["state"] / "queue" / "done").iterdir()]
    revisions = sorted(j["result"]["inventory_revision"] for j in done)
    assert revisions == sorted([first, second, second]), "each job records the revision it ran with"
    audit = athome(site["cfg"], "audit", "--json").stdout
    assert first in audit and second in audit


def test_sync_by_hand_refuses_a_broken_first_commit_and_needs_no_service(git_site):
    site, repo = git_site, git_site["repo"]  # noqa: F811
    repo.edit(set_enabled("gv1p", "sometimes"))
    broken = repo.push("broken from the start")
    out = athome(site["cfg"], "inventory", "sync", check=False)
    assert out.returncode == 1 and "REFUSED" in out.stdout and "enabled must be true or false" in out.stdout
    assert not (site["state"] / "inventory" / "current").exists(), "nothing in force"
    check = athome(site["cfg"], "check", check=False)
    assert "not fetched yet" in check.stdout
    repo.edit(set_enabled("gv1p", True))
    good = repo.push("fixed")
    out = athome(site["cfg"], "inventory", "sync")
    assert out.returncode == 0 and good[:7] in out.stdout
    cfg = config.load(site["cfg"])
    assert Path(cfg.inventory).resolve() == (site["state"] / "inventory" / "revs" / good / "production")
    assert broken not in {p.name for p in (site["state"] / "inventory" / "revs").iterdir()}
    athome(site["cfg"], "check")  # the revision in force passes athome check


def test_an_unreachable_remote_keeps_the_revision_in_force(git_site):
    site, repo = git_site, git_site["repo"]  # noqa: F811
    first = repo.push("first")
    athome(site["cfg"], "inventory", "sync")
    repo.bare.rename(repo.bare.with_name("moved.git"))
    out = athome(site["cfg"], "inventory", "sync", check=False)
    assert out.returncode == 2 and "git fetch failed" in out.stderr
    assert state(site)["revision"] == first and state(site)["last_fetch_error"]
    status = json.loads(athome(site["cfg"], "status", "--json", check=False).stdout)
    assert status["inventory"]["revision"] == first and status["inventory"]["last_fetch_error"]


def test_urls_with_a_password_are_refused(tmp_path):
    assert "password" in url_problem("https://ops:s3cret@git.example.test/inv.git")
    assert url_problem("git@git.example.test:ops/inventory.git") == ""
    assert url_problem("/srv/git/inventory.git") == ""
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict(
            {"inventory": {"git": {"url": "https://ops:s3cret@git.example.test/i.git", "colour": 1}}},
            base=tmp_path,
        )
    text = "\n".join(caught.value.problems)
    assert "holds a password" in text and "unknown key 'colour'" in text and "s3cret" not in text


def test_a_tree_with_links_out_of_it_is_not_extracted_as_links(tmp_path):
    """git archive carries symlinks; the export refuses any that points outside the tree."""
    bare, work = tmp_path / "b.git", tmp_path / "w"
    subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "inv").mkdir()
    (work / "inv" / "hosts.yml").symlink_to("/etc/shadow")
    git(work, "remote", "add", "origin", str(bare))
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "sneaky")
    git(work, "push", "-q", "origin", "main")
    inv = GitInventory(GitSettings(url=str(bare), subdir="inv"), tmp_path / "state")
    inv.sync()
    assert inv.revision() == "", "refused: nothing in force"
    [refused] = inv.state()["rejected"].values()
    assert "cannot be checked out safely" in " ".join(refused["problems"])
    assert not list((tmp_path / "state" / "revs").iterdir()), "no partial checkout left behind"
