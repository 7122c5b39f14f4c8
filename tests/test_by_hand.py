"""Ops run the same playbooks by hand: `ansible-playbook playbooks/X.yml` from the repository root.

No dispatcher here: the repository's ansible.cfg (collections path, pipelining) and
the command line ops would type, against real fail2ban servers over SSH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests import servers

REPO = Path(__file__).resolve().parent.parent


def test_unban_by_hand_from_the_repository_root(sshd, fail2ban_factory, workdir):
    hosts = {h: fail2ban_factory(h) for h in ("gv1p", "gv2p")}
    hosts["gv2p"].ban("sshd", "7.7.7.7")
    inv = servers.write_inventory(
        workdir / "hosts.yml",
        {"fail2ban_servers": {h: {"fail2ban_whitelist_conf_dir": str(f.dir)} for h, f in hosts.items()}},
        dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python()),
    )
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", ANSIBLE_NOCOLOR="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env.pop("ANSIBLE_CONFIG", None)
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inv), "playbooks/unban.yml", "-e", "ip=7.7.7.7"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUSTOM STATS" in proc.stdout
    assert re.search(r'"banned_in": \[\s*"sshd"\s*\]', proc.stdout), "the report shows where it was banned"
    for f in hosts.values():
        assert f.banned_jails("7.7.7.7") == []
        assert all("7.7.7.7" in f.ignore_list(j) for j in f.JAILS)
