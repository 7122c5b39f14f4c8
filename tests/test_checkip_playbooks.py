"""CHECKIP playbooks (unban.yml, whitelist.yml) against real fail2ban-server instances.

Every host is a real fail2ban-server (own config dir and socket, no-op action)
reached over a real sshd on loopback (several inventory aliases on one sshd,
recipe 02/07), or with ansible_connection=local like the demo.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest

from dispatcher.runner import run_playbook
from tests import servers

pytestmark = pytest.mark.integration

IP = "3.3.3.3"
MANAGED = "jail.d/zz-athome-whitelist.local"


def host_vars(f2b: servers.Fail2ban, **extra) -> dict:
    return {"fail2ban_whitelist_conf_dir": str(f2b.dir), **extra}


def ssh_inventory(path: Path, sshd: servers.SSHD, fleet: dict, extra: dict | None = None) -> Path:
    hosts = {name: host_vars(f2b, **(extra or {}).get(name, {})) for name, f2b in fleet.items()}
    return servers.write_inventory(
        path,
        {"fail2ban_servers": hosts},
        {**sshd.ansible_vars(), "ansible_python_interpreter": servers.target_python()},
    )


def snapshot(f2b: servers.Fail2ban) -> dict:
    """Everything the playbooks may change on one server."""
    managed = f2b.dir / MANAGED
    actions = f2b.dir / "actions.log"
    return {
        "ignore": {j: sorted(f2b.ignore_list(j)) for j in f2b.JAILS},
        "banned": {ip: f2b.banned_jails(ip) for ip in (IP, "4.4.4.4")},
        "managed": managed.read_text() if managed.exists() else None,
        "jail.d": sorted(p.name for p in (f2b.dir / "jail.d").iterdir()),
        "actions": actions.read_text() if actions.exists() else "",
    }


@pytest.fixture
def fleet(fail2ban_factory):
    """Three fail2ban servers; gv1p's jail.local already whitelists 10.9.9.9."""
    return {
        "gv1p": fail2ban_factory("gv1p", ignoreip="127.0.0.1/8 ::1 10.9.9.9"),
        "gv2p": fail2ban_factory("gv2p"),
        "gv3p": fail2ban_factory("gv3p"),
    }


def test_unban_unbans_where_banned_and_whitelists_everywhere(sshd, fleet, workdir):
    fleet["gv3p"].ban("asterisk", IP)
    fleet["gv1p"].ban("sshd", "4.4.4.4")  # another address: must stay banned
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet)
    before = {h: snapshot(f) for h, f in fleet.items()}

    # Check mode with diff: reports what would change, changes nothing.
    dry = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP}, check=True, diff=True)
    assert dry.succeeded, dry.to_dict()
    assert {h: dry.hosts[h].status for h in fleet} == dict.fromkeys(fleet, "changed")
    assert dry.hosts["gv3p"].report["banned_in"] == ["asterisk"]
    assert dry.hosts["gv3p"].report["check_mode"] is True
    assert {h: snapshot(f) for h, f in fleet.items()} == before

    run = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP, "request_id": "req-1"})
    assert run.succeeded, run.to_dict()
    reports = {h: run.hosts[h].report for h in fleet}
    assert reports["gv3p"]["banned_in"] == ["asterisk"] and reports["gv3p"]["unbanned"] is True
    for h in ("gv1p", "gv2p"):
        assert reports[h]["banned_in"] == [] and reports[h]["unbanned"] is False
    for h, rep in reports.items():
        assert rep["whitelisted"] == "new", (h, rep)
        assert rep["request_id"] == "req-1" and rep["errors"] == []
        assert rep["transport"] == "socket", (h, rep)
        assert sorted(rep["jails"]) == ["asterisk", "sshd"]
    assert "-3.3.3.3" in (fleet["gv3p"].dir / "actions.log").read_text()
    assert fleet["gv1p"].banned_jails("4.4.4.4") == ["sshd"]

    def check_whitelisted():
        for h, f2b in fleet.items():
            assert f2b.banned_jails(IP) == [], h
            for jail in f2b.JAILS:
                ignored = f2b.ignore_list(jail)
                assert IP in ignored, (h, jail, ignored)
                assert {"127.0.0.0/8", "::1"} <= set(ignored), (h, jail, ignored)
            if h == "gv1p":
                assert all("10.9.9.9" in f2b.ignore_list(j) for j in f2b.JAILS)

    check_whitelisted()
    for f2b in fleet.values():
        assert f2b.client("reload").returncode == 0
    check_whitelisted()
    fleet["gv2p"].stop()
    fleet["gv2p"].start()
    check_whitelisted()

    again = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert again.succeeded, again.to_dict()
    assert {h: again.hosts[h].status for h in fleet} == dict.fromkeys(fleet, "ok")
    assert {again.hosts[h].report["whitelisted"] for h in fleet} == {"already"}


def test_whitelist_present_absent_list(sshd, fleet, workdir):
    fleet["gv2p"].ban("sshd", IP)
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet)
    for ip in (IP, "5.5.5.5"):
        res = run_playbook("whitelist.yml", inventory=inv, extravars={"ip": ip, "state": "present"})
        assert res.succeeded, res.to_dict()
        assert {res.hosts[h].report["whitelisted"] for h in fleet} == {"new"}
    # whitelist.yml never unbans.
    assert fleet["gv2p"].banned_jails(IP) == ["sshd"]

    gone = run_playbook("whitelist.yml", inventory=inv, extravars={"ip": IP, "state": "absent"}, diff=True)
    assert gone.succeeded, gone.to_dict()
    for h in fleet:
        rep = gone.hosts[h].report
        assert rep["whitelisted"] == "removed" and rep["managed"] == ["5.5.5.5"], rep
        assert rep["backup_file"] and Path(rep["backup_file"]).is_file()
        assert IP in Path(rep["backup_file"]).read_text()
    for f2b in fleet.values():
        f2b.client("reload")
    for h, f2b in fleet.items():
        for jail in f2b.JAILS:
            ignored = f2b.ignore_list(jail)
            assert IP not in ignored and "5.5.5.5" in ignored and "::1" in ignored, (h, jail)
        if h == "gv1p":
            assert "10.9.9.9" in f2b.ignore_list("asterisk")

    listed = run_playbook("whitelist.yml", inventory=inv, extravars={"state": "list"})
    assert listed.succeeded, listed.to_dict()
    for h in fleet:
        rep = listed.hosts[h].report
        assert listed.hosts[h].status == "ok"
        assert "5.5.5.5" in rep["whitelist"] and IP not in rep["whitelist"], rep
        assert "127.0.0.0/8" in rep["whitelist"]
    assert "10.9.9.9" in listed.hosts["gv1p"].report["whitelist"]

    # Absent again: nothing to do. Removing an address jail.local whitelists: kept.
    again = run_playbook("whitelist.yml", inventory=inv, extravars={"ip": IP, "state": "absent"})
    assert {again.hosts[h].status for h in fleet} == {"ok"}
    assert {again.hosts[h].report["whitelisted"] for h in fleet} == {"absent"}
    kept = run_playbook("whitelist.yml", inventory=inv, extravars={"ip": "10.9.9.9", "state": "absent"})
    assert kept.hosts["gv1p"].status == "ok"
    assert sorted(kept.hosts["gv1p"].report["kept_by_config"]) == ["asterisk", "sshd"]
    assert "10.9.9.9" in fleet["gv1p"].ignore_list("sshd")


def test_unreachable_host_does_not_stop_the_others(ssh_keys, sshd, fleet, workdir):
    fleet["gv1p"].ban("asterisk", IP)
    down = servers.SSHD(ssh_keys).start()
    down.stop()
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet, extra={"gv2p": down.ansible_vars()})
    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert not res.succeeded
    assert res.unreachable == ["gv2p"]
    assert res.hosts["gv2p"].report == {}
    assert res.hosts["gv1p"].report["unbanned"] is True
    assert {res.hosts[h].status for h in ("gv1p", "gv3p")} == {"changed"}
    assert IP in fleet["gv3p"].ignore_list("sshd")
    assert IP not in fleet["gv2p"].ignore_list("sshd")


@pytest.mark.parametrize("bad", ["0.0.0.0/0", "127.0.0.1", "3.3.3.3;id", "999.1.1.1", "::", "224.0.0.1", ""])
def test_invalid_address_fails_before_any_host(bad, fail2ban_factory, workdir):
    f2b = fail2ban_factory("gv1p")
    f2b.ban("asterisk", IP)
    # A local host: if the play ever reached it, its state would change.
    inv = servers.write_inventory(
        workdir / "inv.yml",
        {"fail2ban_servers": {"gv1p": host_vars(f2b, ansible_connection="local")}},
        {"ansible_python_interpreter": servers.target_python()},
    )
    before = snapshot(f2b)
    playbook = "unban.yml" if bad != "" else "whitelist.yml"
    res = run_playbook(playbook, inventory=inv, extravars={"ip": bad, "state": "present"})
    assert not res.succeeded
    assert "gv1p" not in res.hosts, res.to_dict()
    assert res.hosts["localhost"].status == "failed"
    assert "Refusing address" in " ".join(res.hosts["localhost"].errors)
    assert snapshot(f2b) == before


def test_old_target_pythons_and_old_fail2ban_clients(sshd, fail2ban_factory, workdir):
    """The modules on Python 2.7 / 3.6 / 3.11 targets, and the fallbacks for old fail2ban.

    fail2ban before 0.10.6 has no `banned` command (and no `get JAIL banned`). That old
    version cannot run here, so a wrapper around the real client refuses those commands
    the way the old server does (rc 255) and passes everything else through.
    """
    fleet = {n: fail2ban_factory(n) for n in ("py27", "py36", "py311", "py27s", "py36s")}
    wrappers = {}
    calls = {}
    for name, refuse_get in (("py27", False), ("py36", True)):
        script = workdir / f"old-client-{name}"
        calls[name] = workdir / f"calls-{name}.log"
        # argv is: -c DIR COMMAND...; $3 is the command.
        script.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> {calls[name]}\n'
            'if [ "$3" = banned ]'
            + (' || { [ "$3" = get ] && [ "$5" = banned ]; }' if refuse_get else "")
            + '; then echo "ERROR  Invalid command" >&2; exit 255; fi\n'
            'exec fail2ban-client "$@"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        wrappers[name] = str(script)
    for f2b in fleet.values():
        f2b.ban("sshd", IP)
    extra = {
        "py27": {
            "ansible_python_interpreter": servers.pyenv_python("2.7"),
            "fail2ban_whitelist_client": wrappers["py27"],
        },
        "py36": {
            "ansible_python_interpreter": servers.pyenv_python("3.6"),
            "fail2ban_whitelist_client": wrappers["py36"],
        },
        "py311": {},
        # The real client: the module on 2.7 / 3.6 starts the socket helper under
        # fail2ban-client's own interpreter.
        "py27s": {"ansible_python_interpreter": servers.pyenv_python("2.7")},
        "py36s": {"ansible_python_interpreter": servers.pyenv_python("3.6")},
    }
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet, extra=extra)
    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert res.succeeded, res.to_dict()
    for h, f2b in fleet.items():
        assert res.hosts[h].report["banned_in"] == ["sshd"], (h, res.hosts[h].report)
        assert f2b.banned_jails(IP) == []
        assert IP in f2b.ignore_list("asterisk")
    # py27 fell back to `get JAIL banned IP`, py36 (no `get ... banned` either) to `status JAIL`.
    assert "get sshd banned 3.3.3.3" in calls["py27"].read_text()
    assert "status sshd" not in calls["py27"].read_text()
    assert "status sshd" in calls["py36"].read_text()
    # The shell wrappers are no Python script: fail2ban-client ran every command there.
    transports = {h: res.hosts[h].report["transport"] for h in fleet}
    assert transports == {
        "py27": "client",
        "py36": "client",
        "py311": "socket",
        "py27s": "socket",
        "py36s": "socket",
    }
    again = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert {again.hosts[h].status for h in fleet} == {"ok"}, again.to_dict()


def test_local_connection_hosts_disabled_and_failing(fail2ban_factory, workdir):
    """Demo-style hosts (ansible_connection=local): a disabled host, a host whose jail.local
    sets no ignoreip, and a host whose fail2ban is down (fails, the others go on)."""
    ok = fail2ban_factory("demo1")
    bare = servers.Fail2ban(workdir / "f2b" / "demo2", ignoreip="")
    bare.write_config()
    jail_local = bare.dir / "jail.local"
    jail_local.write_text(jail_local.read_text().replace("ignoreip = \n", ""))
    bare = fail2ban_factory("demo2")  # starts on the config written above
    off = fail2ban_factory("off")
    stopped = servers.Fail2ban(workdir / "f2b" / "stopped")
    stopped.write_config()
    ok.ban("asterisk", "2001:db8::7")
    inv = servers.write_inventory(
        workdir / "inv.yml",
        {
            "fail2ban_servers": {
                "demo1": host_vars(ok),
                "demo2": host_vars(bare),
                "off": host_vars(off, enabled=False),
                "stopped": host_vars(stopped),
            }
        },
        {"ansible_connection": "local", "ansible_python_interpreter": servers.target_python()},
    )
    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": "2001:DB8::7"})
    assert res.failed == ["stopped"]
    assert res.hosts["stopped"].report["errors"], res.to_dict()
    assert res.hosts["off"].report == {"disabled": True}
    assert not (off.dir / MANAGED).exists()
    assert res.hosts["demo1"].report["banned_in"] == ["asterisk"]
    assert res.hosts["demo1"].report["ip"] == "2001:db8::7"
    for f2b in (ok, bare):
        assert f2b.client("reload").returncode == 0
        for jail in f2b.JAILS:
            assert "2001:db8::7" in f2b.ignore_list(jail), (f2b.dir, jail)
    assert bare.ignore_list("sshd") == ["2001:db8::7"]
    assert os.path.exists(ok.dir / MANAGED)


def test_real_world_configs_broken_elsewhere_stopped_jails_accents_and_later_overrides(
    sshd, fail2ban_factory, workdir
):
    """Configs as found on real servers, on an old target Python under LANG=C:
    - a jail.local with accented comments (Python 3.6 would choke on it as ASCII);
    - a config that already fails `fail2ban-client -t` for a reason of its own
      (an extra jail whose log file is missing): the address is still whitelisted and
      unbanned, the file written unvalidated, with a warning;
    - a jail section of the managed file whose jail is not running now: kept;
    - a jail.d file read after ours that sets ignoreip: reported."""
    f2b = fail2ban_factory("gv1p")
    jail_local = f2b.dir / "jail.local"
    accents = "# Configuração do servidor: não mexer\n"
    jail_local.write_text(accents + jail_local.read_text(), encoding="utf-8")
    f2b.client("reload")
    f2b.ban("asterisk", IP)
    (f2b.dir / MANAGED).write_text("[recidive]\nignoreip = %(known/ignoreip)s 9.9.9.9\n")
    (f2b.dir / "jail.d" / "zzz-later.local").write_text("[sshd]\nignoreip = 127.0.0.1/8 10.0.0.1\n")
    # Broken for a reason of its own, after the server started: a jail whose log is missing.
    with jail_local.open("a", encoding="utf-8") as fh:
        fh.write("\n[ghost]\nenabled = true\nfilter = proto\nlogpath = /nonexistent/ghost.log\n")
    assert f2b.client("-t", check=False).returncode != 0
    inv = servers.write_inventory(
        workdir / "inv.yml",
        {"fail2ban_servers": {"gv1p": host_vars(f2b)}},
        # The target's module runs under the C locale, as on a server with none configured.
        {**sshd.ansible_vars(), "ansible_python_interpreter": f"env LC_ALL=C {servers.pyenv_python('3.6')}"},
    )
    run = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert run.hosts["gv1p"].status == "changed", run.to_dict()
    assert f2b.banned_jails(IP) == []
    assert all(IP in f2b.ignore_list(j) for j in f2b.JAILS)
    managed = (f2b.dir / MANAGED).read_text()
    assert "[recidive]" in managed and "9.9.9.9" in managed and IP in managed


def python_client(path: Path, shebang: str, log: Path) -> str:
    """A fail2ban-client that logs its arguments and runs the real one: a Python script, so
    the socket route reads its shebang and starts the helper under `shebang`."""
    path.write_text(
        f"#!{shebang}\n"
        "import os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "os.execv('/usr/bin/fail2ban-client', ['fail2ban-client'] + sys.argv[1:])\n"
    )
    path.chmod(0o755)
    return str(path)


def test_socket_route_runs_no_client_and_falls_back(sshd, fail2ban_factory, workdir):
    """- socket: the helper's code under the client's own interpreter (here the module's own, so
      in the module's process) does every runtime command over one connection and the config
      test with fail2ban's own reader: fail2ban-client never runs, first run or second;
    - pickle mismatch: a client whose interpreter (Python 3.6) cannot read the server's pickles
      (protocol 5): the module falls back to fail2ban-client and does the same work;
    - transport: client forces fail2ban-client for everything."""
    fleet = {n: fail2ban_factory(n) for n in ("socket", "mismatch", "forced")}
    logs = {n: workdir / f"calls-{n}.log" for n in fleet}
    for log in logs.values():
        log.write_text("")
    clients = {
        "socket": python_client(workdir / "client-socket", "/usr/bin/python3", logs["socket"]),
        "mismatch": python_client(workdir / "client-mismatch", servers.pyenv_python("3.6"), logs["mismatch"]),
        "forced": python_client(workdir / "client-forced", "/usr/bin/python3", logs["forced"]),
    }
    for f2b in fleet.values():
        f2b.ban("asterisk", IP)
    extra = {n: {"fail2ban_whitelist_client": clients[n]} for n in fleet}
    extra["forced"]["fail2ban_whitelist_transport"] = "client"
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet, extra=extra)
    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert res.succeeded, res.to_dict()
    for h, f2b in fleet.items():
        rep = res.hosts[h].report
        assert rep["banned_in"] == ["asterisk"] and rep["whitelisted"] == "new", (h, rep)
        assert f2b.banned_jails(IP) == []
        assert all(IP in f2b.ignore_list(j) for j in f2b.JAILS)
    assert {h: res.hosts[h].report["transport"] for h in fleet} == {
        "socket": "socket",
        "mismatch": "client",
        "forced": "client",
    }
    calls = {n: logs[n].read_text().splitlines() for n in fleet}
    assert calls["socket"] == []
    assert ["-t"] in [c.split()[2:] for c in calls["forced"]]
    for h in ("mismatch", "forced"):
        assert f"set asterisk unbanip {IP}" in "\n".join(calls[h]), (h, calls[h])
        assert len(calls[h]) >= 6, (h, calls[h])  # status, banned, get x2, set x2, unbanip, -t
    for log in logs.values():
        log.write_text("")
    again = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert {again.hosts[h].status for h in fleet} == {"ok"}, again.to_dict()
    assert logs["socket"].read_text() == ""
    assert logs["mismatch"].read_text() and logs["forced"].read_text()


@pytest.mark.parametrize("transport", ["auto", "client"])
def test_a_broken_managed_file_is_detected_and_the_previous_one_restored(
    sshd, fail2ban_factory, workdir, transport
):
    """fail2ban's config test fails because of what the module wrote: the previous managed file is
    put back and the host fails; the runtime changes (made first) stay. The fault, injected: a
    managed file hand-edited with a [DEFAULT] section, valid as it is, which the module rewrites as
    `ignoreip = %(known/ignoreip)s ...`, a value fail2ban cannot interpolate in [DEFAULT].
    - auto: the test runs in the helper's code with fail2ban's own reader, fail2ban-client never
      runs (the client here logs every call);
    - client: `fail2ban-client -t`, for the new file and again for the restored one."""
    f2b = fail2ban_factory("gv1p")
    log = workdir / "calls.log"
    log.write_text("")
    client = python_client(workdir / "client", "/usr/bin/python3", log)
    managed = f2b.dir / MANAGED
    hand_edited = "[DEFAULT]\nignoreip = 127.0.0.1/8 ::1 9.9.9.9\n"
    managed.write_text(hand_edited)
    assert f2b.client("-t", check=False).returncode == 0
    f2b.ban("asterisk", IP)
    extra = {"gv1p": {"fail2ban_whitelist_client": client, "fail2ban_whitelist_transport": transport}}
    inv = ssh_inventory(workdir / "inv.yml", sshd, {"gv1p": f2b}, extra=extra)

    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert res.failed == ["gv1p"], res.to_dict()
    error = " ".join(res.hosts["gv1p"].report["errors"])
    assert "fail2ban rejected the new whitelist file, previous content restored" in error, error
    assert "known/ignoreip" in error, error  # fail2ban's own reason
    assert managed.read_text() == hand_edited
    assert f2b.client("-t", check=False).returncode == 0
    assert IP in f2b.ignore_list("asterisk") and f2b.banned_jails(IP) == []
    backups = [p for p in managed.parent.iterdir() if p.name.startswith(managed.name + ".")]
    assert [b.read_text() for b in backups] == [hand_edited]
    tests = [line for line in log.read_text().splitlines() if line.split()[2:] == ["-t"]]
    assert len(tests) == (0 if transport == "auto" else 2), log.read_text()


def age_entry(f2b: servers.Fail2ban, ip: str, days: int) -> None:
    """Date `ip` in the managed file `days` days back, as a run that long ago wrote it."""
    managed = f2b.dir / MANAGED
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * 86400))
    text, count = re.subn(
        rf"^# added {re.escape(ip)} \S+$", f"# added {ip} {old}", managed.read_text(), flags=re.M
    )
    assert count == 1, text
    managed.write_text(text)


def test_expired_whitelist_entries_leave_the_file_and_the_running_jails(sshd, fleet, workdir):
    """fail2ban_whitelist_expire_days: 30 on gv1p and gv2p, unset (off) on gv3p. An address
    added 40 days ago is removed by the next CHECKIP of another address, from the managed file
    and from every jail, and reported; one added 29 days ago stays, and so does an address
    written by hand without a date (dated by that run instead); gv1p's jail.local whitelists
    5.5.5.5 itself, so that address stays in gv1p's running jails. gv3p keeps everything."""
    expiring = {"fail2ban_whitelist_expire_days": 30}
    inv = ssh_inventory(workdir / "inv.yml", sshd, fleet, extra={"gv1p": expiring, "gv2p": expiring})
    for ip in ("4.4.4.4", "5.5.5.5", "6.6.6.6"):
        res = run_playbook("unban.yml", inventory=inv, extravars={"ip": ip})
        assert res.succeeded, res.to_dict()
        assert all(res.hosts[h].report["expired"] == [] for h in fleet), res.to_dict()
    for f2b in fleet.values():
        age_entry(f2b, "4.4.4.4", 40)
        age_entry(f2b, "5.5.5.5", 40)
        age_entry(f2b, "6.6.6.6", 29)
        managed = f2b.dir / MANAGED
        managed.write_text(managed.read_text().replace("6.6.6.6\n", "6.6.6.6 7.7.7.7\n"))  # by hand, no date
    jail_local = fleet["gv1p"].dir / "jail.local"
    jail_local.write_text(jail_local.read_text().replace("10.9.9.9", "10.9.9.9 5.5.5.5"))

    res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert res.succeeded, res.to_dict()
    reports = {h: res.hosts[h].report for h in fleet}
    assert {h: r["expired"] for h, r in reports.items()} == {
        "gv1p": ["4.4.4.4", "5.5.5.5"],
        "gv2p": ["4.4.4.4", "5.5.5.5"],
        "gv3p": [],
    }
    assert {r["whitelisted"] for r in reports.values()} == {"new"}
    for h, f2b in fleet.items():
        managed = (f2b.dir / MANAGED).read_text()
        # 7.7.7.7 was written into the file by hand: in the file, in the jails after a reload.
        assert "7.7.7.7" in managed
        kept = ["6.6.6.6", IP] + (["4.4.4.4", "5.5.5.5"] if h == "gv3p" else [])
        for jail in f2b.JAILS:
            ignored = f2b.ignore_list(jail)
            assert set(kept) <= set(ignored), (h, jail, ignored)
            if h != "gv3p":
                assert "4.4.4.4" not in ignored and "4.4.4.4" not in managed, (h, jail, ignored)
                assert ("5.5.5.5" in ignored) is (h == "gv1p"), (h, jail, ignored)  # its jail.local has it
                assert "5.5.5.5" not in managed
        assert re.search(r"^# added 7\.7\.7\.7 \S+$", managed, re.M) or h == "gv3p", managed
    # A reload reads the file the run left: the expired addresses stay out, the hand-written one comes in.
    for h in ("gv1p", "gv2p"):
        before = {j: sorted(fleet[h].ignore_list(j) + ["7.7.7.7"]) for j in fleet[h].JAILS}
        assert fleet[h].client("reload").returncode == 0
        assert {j: sorted(fleet[h].ignore_list(j)) for j in fleet[h].JAILS} == before

    again = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
    assert {again.hosts[h].status for h in fleet} == {"ok"}, again.to_dict()
    assert {tuple(again.hosts[h].report["expired"]) for h in fleet} == {()}
