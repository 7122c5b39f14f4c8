"""The athome.voip collection as a site outside this repository gets it: a built tarball.

`ansible-galaxy collection build`, install the tarball into a temporary
collections path, then, from a folder that is not the repository (no
ansible.cfg, no collections/ beside it): `ansible-doc` on every module and
filter, and `playbooks/unban.yml` (copied there) against a real fail2ban
server over SSH on loopback. Every path Ansible reports must be the installed
copy, never the repository's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from tests import servers
from tests.collection_paths import COLLECTION, COLLECTIONS, MODULES, REPO, ROLES

MODULE_NAMES = sorted(p.stem for p in MODULES.glob("*.py") if p.stem != "__init__")
FILTER_NAMES = ("fail2ban_whitelist_ip_problem", "fail2ban_whitelist_ip_normalize")


def _env(**extra) -> dict:
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", ANSIBLE_NOCOLOR="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    for name in ("ANSIBLE_CONFIG", "ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_COLLECTIONS_PATHS"):
        env.pop(name, None)
    env.update(extra)
    return env


def _run(argv, cwd, env, timeout=300):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the tarball and install it into a fresh collections path: (tarball, path, env, cwd)."""
    base = tmp_path_factory.mktemp("galaxy")
    away = base / "elsewhere"  # a folder with no ansible.cfg and no collections/ of its own
    away.mkdir()
    env = _env(HOME=str(base / "home"))
    build = _run(
        ["ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", str(base)], away, env
    )
    version = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"]
    tarball = base / f"athome-voip-{version}.tar.gz"
    assert tarball.is_file(), build.stdout
    dest = base / "installed"
    _run(["ansible-galaxy", "collection", "install", "--offline", "-p", str(dest), str(tarball)], away, env)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(dest)
    return tarball, dest, env, away


def test_the_tarball_holds_the_modules_roles_and_metadata_and_no_test_output(installed):
    tarball, _dest, _env_, _cwd = installed
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    for module in MODULE_NAMES:
        assert f"plugins/modules/{module}.py" in names
    for role in (p.name for p in ROLES.iterdir()):
        assert f"roles/{role}/meta/argument_specs.yml" in names
        assert f"roles/{role}/README.md" in names
    assert {
        "MANIFEST.json",
        "FILES.json",
        "meta/runtime.yml",
        "plugins/filter/fail2ban_whitelist.py",
    } <= names
    assert not any(n.startswith("tests/output") for n in names)


def test_ansible_doc_reads_every_installed_module_and_filter(installed):
    _tarball, dest, env, cwd = installed
    assert MODULE_NAMES, "no module found"
    listed = _run(["ansible-doc", "-l", "athome.voip"], cwd, env).stdout
    for module in MODULE_NAMES:
        assert f"athome.voip.{module}" in listed
        out = _run(["ansible-doc", f"athome.voip.{module}"], cwd, env).stdout
        header = out.splitlines()[0]  # '> ATHOME.VOIP.X (path)'; 2.19: '> MODULE athome.voip.x (path)'
        assert f"athome.voip.{module} " in header.lower()
        assert str(dest) in header and str(REPO) not in header, header
        assert "OPTIONS" in out and "EXAMPLES" in out and "RETURN VALUES" in out
    for name in FILTER_NAMES:
        out = _run(["ansible-doc", "-t", "filter", f"athome.voip.{name}"], cwd, env).stdout
        assert str(dest) in out.splitlines()[0]


def test_unban_playbook_runs_from_the_installed_collection(installed, sshd, fail2ban_factory, workdir):
    _tarball, dest, env, cwd = installed
    playbooks = cwd / "playbooks"
    playbooks.mkdir(exist_ok=True)
    shutil.copy(REPO / "playbooks" / "unban.yml", playbooks / "unban.yml")
    f2b = fail2ban_factory("gv1p")
    f2b.ban("sshd", "7.7.7.8")
    inv = servers.write_inventory(
        workdir / "hosts.yml",
        {"fail2ban_servers": {"gv1p": {"fail2ban_whitelist_conf_dir": str(f2b.dir)}}},
        dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python()),
    )
    proc = _run(
        ["ansible-playbook", "-v", "-i", str(inv), "playbooks/unban.yml", "-e", "ip=7.7.7.8"],
        cwd,
        dict(env, ANSIBLE_SHOW_CUSTOM_STATS="True"),
    )
    assert re.search(r'"banned_in": \[\s*"sshd"\s*\]', proc.stdout), proc.stdout
    assert f2b.banned_jails("7.7.7.8") == []
    assert all("7.7.7.8" in f2b.ignore_list(j) for j in f2b.JAILS)
    # The role and its module came from the installed copy: the repository's is not on the path.
    assert str(COLLECTIONS) not in proc.stdout + proc.stderr
    assert (dest / "ansible_collections" / "athome" / "voip" / "roles" / "fail2ban_whitelist").is_dir()


def test_a_playbook_outside_the_repository_does_not_find_the_collection_without_its_path(installed):
    """The check above means something: without ANSIBLE_COLLECTIONS_PATH the collection is unknown."""
    _tarball, _dest, env, cwd = installed
    bare = dict(env)
    bare.pop("ANSIBLE_COLLECTIONS_PATH")
    proc = subprocess.run(
        ["ansible-doc", "athome.voip.endpoint_mac"], cwd=cwd, env=bare, capture_output=True, text=True
    )
    assert "athome.voip.endpoint_mac was not found" in proc.stderr
    assert "OPTIONS" not in proc.stdout
