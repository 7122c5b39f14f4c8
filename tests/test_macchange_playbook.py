"""playbooks/macchange.yml against real files over real SSH on loopback.

Each test gets its own copies of the fixture endpoint files (owned by
nobody:nogroup, mode 0640, to show owner and mode survive), reached through
inventory aliases on the session's sshd. The provisioning monitor is a shell
command that appends a line to a file, so the tests see whether it was called.
The forced failure of the second write is real: endpoints_sip.def is made
immutable (chattr +i), which stops even root from replacing it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.runner import run_playbook
from tests import servers
from tests.collection_paths import UNIT_FIXTURES
from tests.servers import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "endpoints"
DEF_NAME, SIP_NAME = "__ENDPOINTS__.DEF", "endpoints_sip.def"
ORIG_DEF = (FIXTURES / DEF_NAME).read_bytes()
ORIG_SIP = (FIXTURES / SIP_NAME).read_bytes()
NOBODY = 65534


def with_mac(mac: str) -> tuple[bytes, bytes]:
    """The fixture files with extension 3010 holding `mac` ('' for none), all else equal."""
    def_old, sip_old = b"'serialnumber': '010203040506'", b"3010;MAC:010203040506;"
    assert ORIG_DEF.count(def_old) == 1 and ORIG_SIP.count(sip_old) == 1
    return (
        ORIG_DEF.replace(def_old, b"'serialnumber': '%s'" % mac.encode()),
        ORIG_SIP.replace(sip_old, b"3010;MAC:%s;" % (mac or "None").encode()),
    )


class MacHost:
    """One inventory alias with its own endpoint files, backups and monitor log."""

    def __init__(self, root: Path, alias: str, sip: bytes = ORIG_SIP):
        self.alias = alias
        self.dir = root / alias
        self.dir.mkdir(parents=True)
        self.def_path, self.sip_path = self.dir / DEF_NAME, self.dir / SIP_NAME
        self.monitor_log = root / f"{alias}-monitor.log"
        for path, data in ((self.def_path, ORIG_DEF), (self.sip_path, sip)):
            path.write_bytes(data)
            os.chown(path, NOBODY, NOBODY)
            path.chmod(0o640)

    def hostvars(self, python: str, **extra) -> dict:
        return {
            "ansible_python_interpreter": python,
            "endpoint_mac_endpoints_def": str(self.def_path),
            "endpoint_mac_endpoints_sip": str(self.sip_path),
            "endpoint_mac_backup_keep": 2,
            "endpoint_mac_monitor_command": [
                "/bin/sh",
                "-c",
                f"echo notified >> {self.monitor_log}",
            ],
            **extra,
        }

    def files(self) -> tuple[bytes, bytes]:
        return self.def_path.read_bytes(), self.sip_path.read_bytes()

    def backups(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name.endswith(".bak"))

    def notifications(self) -> int:
        return len(self.monitor_log.read_text().splitlines()) if self.monitor_log.exists() else 0

    def assert_owner_and_mode(self) -> None:
        for path in (self.def_path, self.sip_path):
            info = path.stat()
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (NOBODY, NOBODY, 0o640), path
        assert sorted(p.name for p in self.dir.iterdir() if not p.name.endswith(".bak")) == sorted(
            [DEF_NAME, SIP_NAME]
        ), "a temp file was left behind"


@pytest.fixture
def fleet(sshd, workdir):
    """Build an inventory: gv2p (enabled MAC server), gv3p (disabled), voip1 (no MAC files)."""

    def make(python: str = servers.target_python(), **extra):
        gv2p, gv3p = MacHost(workdir, "gv2p"), MacHost(workdir, "gv3p")
        inventory = servers.write_inventory(
            workdir / "inventory.yml",
            {
                "sip_servers": {"gv2p": {}, "gv3p": {}, "voip1": {}},
                "mac_servers": {
                    "gv2p": gv2p.hostvars(python, **extra),
                    "gv3p": gv3p.hostvars(python, enabled=False),
                },
                "fail2ban_servers": {"voip1": {}},
            },
            all_vars={**sshd.ansible_vars(), "ansible_python_interpreter": python},
        )
        return inventory, gv2p, gv3p

    return make


def macchange(inventory, check: bool = False, **extravars):
    ev = {"target": "gv2p", "extension": "3010", "request_id": "20251111_202744_req001"}
    ev.update(extravars)
    return run_playbook("macchange.yml", inventory=inventory, extravars=ev, check=check, diff=check)


def test_three_legacy_runs_in_sequence(fleet):
    inventory, host, _ = fleet()
    stale = host.dir / f"{DEF_NAME}.20200101_000000.bak"  # an old backup, to be pruned
    stale.write_bytes(b"old")

    # Check mode first: the report shows the change, the files stay byte-identical.
    res = macchange(inventory, check=True, mac_current="010203040506", mac_new="01:02:03:04:05:99")
    assert res.succeeded, res.to_dict()
    assert res.hosts["gv2p"].status == "changed"
    report = res.hosts["gv2p"].report
    assert report["check_mode"] is True and report["changed"] is True
    assert report["files"]["endpoints_def"]["before"] == "'serialnumber': '010203040506',"
    assert report["files"]["endpoints_def"]["after"] == "'serialnumber': '010203040599',"
    assert report["files"]["endpoints_sip"]["after"].startswith("3010;MAC:010203040599;MODEL:")
    assert report["backups"] == [] and report["notified"] is False
    assert host.files() == (ORIG_DEF, ORIG_SIP)
    assert host.backups() == [stale.name] and host.notifications() == 0

    # 1. replace
    res = macchange(inventory, mac_current="010203040506", mac_new="010203040599")
    assert res.succeeded, res.to_dict()
    report = res.hosts["gv2p"].report
    assert report["operation"] == "replace" and report["changed"] is True and report["notified"] is True
    assert report["request_id"] == "20251111_202744_req001"
    assert report["files"]["endpoints_sip"]["before"].startswith("3010;MAC:010203040506;")
    assert host.files() == with_mac("010203040599")
    assert host.notifications() == 1
    host.assert_owner_and_mode()
    backups = [Path(p) for p in report["backups"]]
    assert [p.parent for p in backups] == [host.dir, host.dir]
    assert (backups[0].read_bytes(), backups[1].read_bytes()) == (ORIG_DEF, ORIG_SIP)
    assert backups[0].stat().st_uid == NOBODY and backups[0].stat().st_mode & 0o777 == 0o640

    # The same request again is a no-op: nothing written, nobody notified.
    res = macchange(inventory, mac_current="010203040506", mac_new="010203040599")
    assert res.succeeded, res.to_dict()
    assert res.hosts["gv2p"].status == "ok"
    assert res.hosts["gv2p"].report["changed"] is False
    assert res.hosts["gv2p"].report["notified"] is False
    assert host.files() == with_mac("010203040599") and host.notifications() == 1

    # 2. remove
    res = macchange(inventory, mac_current="010203040599", mac_new="")
    assert res.succeeded, res.to_dict()
    report = res.hosts["gv2p"].report
    assert report["operation"] == "remove" and report["notified"] is True
    assert report["files"]["endpoints_sip"]["after"].startswith("3010;MAC:None;")
    assert host.files() == with_mac("")
    assert host.notifications() == 2

    # 3. add: the legacy warning names the other extension without a MAC.
    res = macchange(inventory, mac_current="", mac_new="010203040588")
    assert res.succeeded, res.to_dict()
    report = res.hosts["gv2p"].report
    assert report["operation"] == "add" and report["notified"] is True
    assert report["warnings"] == ["other extensions also have no MAC: 2010"]
    assert host.files() == with_mac("010203040588")
    assert host.notifications() == 3
    host.assert_owner_and_mode()

    # Backups: 3 changes made 3 of each file; keep=2 pruned the rest and the stale one.
    names = host.backups()
    assert len(names) == 4 and stale.name not in names
    assert sum(n.startswith(DEF_NAME) for n in names) == 2
    assert len(report["backups_pruned"]) == 2  # the replace run's pair
    assert not any(Path(p).exists() for p in report["backups_pruned"])
    latest = [Path(p) for p in report["backups"]]
    assert (latest[0].read_bytes(), latest[1].read_bytes()) == with_mac("")


@pytest.mark.parametrize(
    "extravars, message, reason",
    [
        (
            {"mac_current": "010203040507", "mac_new": "010203040599"},
            "extension 3010 does not hold MAC 010203040507 in both files: __ENDPOINTS__.DEF holds "
            "MAC 010203040506; endpoints_sip.def holds MAC 010203040506. Nothing was written.",
            "mismatch",
        ),
        (
            {"extension": "3999", "mac_current": "010203040506", "mac_new": "010203040599"},
            "extension 3999 is in neither file",
            "not_found",
        ),
        (
            {"mac_current": "010203040506", "mac_new": "805EC09B49F3"},
            "MAC 805EC09B49F3 is already held by extension 2001 (__ENDPOINTS__.DEF, endpoints_sip.def)",
            "mac_in_use",
        ),
    ],
    ids=["mac-mismatch", "unknown-extension", "duplicate-new-mac"],
)
def test_refused_change_writes_nothing(fleet, extravars, message, reason):
    inventory, host, _ = fleet()
    res = macchange(inventory, **extravars)
    assert not res.succeeded
    result = res.hosts["gv2p"]
    assert result.status == "failed"
    assert message in result.report["error"]
    assert result.report["reason"] == reason
    assert any(message in e for e in result.errors)
    assert result.report["changed"] is False and result.report["notified"] is False
    assert host.files() == (ORIG_DEF, ORIG_SIP)
    assert host.backups() == [] and host.notifications() == 0


@pytest.mark.parametrize(
    "extravars, message",
    [
        ({"target": "voip1"}, "target voip1 must be one enabled host of the mac_servers group"),
        ({"target": "gv3p"}, "target gv3p must be one enabled host of the mac_servers group"),
        ({"extension": "30x0"}, "the extension must be digits"),
        ({"mac_new": "0102030405"}, "each MAC 12 hex digits or empty"),
    ],
    ids=["not-a-mac-server", "disabled-host", "bad-extension", "bad-mac"],
)
def test_bad_request_is_refused_before_any_host(fleet, extravars, message):
    inventory, gv2p, gv3p = fleet()
    ev = {"mac_current": "010203040506", "mac_new": "010203040599", **extravars}
    res = macchange(inventory, **ev)
    assert not res.succeeded
    assert list(res.hosts) == ["localhost"]
    assert any(message in e for e in res.hosts["localhost"].errors), res.to_dict()
    for host in (gv2p, gv3p):
        assert host.files() == (ORIG_DEF, ORIG_SIP) and host.notifications() == 0


@pytest.mark.parametrize("version", ["2.7", "3.6", "3"])
def test_apply_and_failed_second_write_on_target_python(fleet, version):
    python = servers.target_python() if version == "3" else servers.pyenv_python(version)
    inventory, host, _ = fleet(python=python)

    res = macchange(inventory, mac_current="010203040506", mac_new="010203040599")
    assert res.succeeded, res.to_dict()
    assert res.hosts["gv2p"].report["operation"] == "replace"
    assert host.files() == with_mac("010203040599")
    host.assert_owner_and_mode()

    # endpoints_sip.def is written second; make that write fail for real.
    before = host.files()
    subprocess.run(["chattr", "+i", str(host.sip_path)], check=True)
    try:
        res = macchange(inventory, mac_current="010203040599", mac_new="")
    finally:
        subprocess.run(["chattr", "-i", str(host.sip_path)], check=True)
    assert not res.succeeded
    error = res.hosts["gv2p"].report["error"]
    assert "cannot write endpoints_sip.def" in error
    assert "__ENDPOINTS__.DEF was restored: both files are as they were" in error
    assert res.hosts["gv2p"].report["reason"] == "write_failed"
    assert host.files() == before
    host.assert_owner_and_mode()
    assert host.notifications() == 1  # only the successful replace


def test_monitor_that_cannot_be_notified_fails_the_host_but_reports_the_change(fleet):
    inventory, host, _ = fleet(
        endpoint_mac_monitor_command=["/bin/sh", "-c", "echo arimonitor is down >&2; exit 3"]
    )
    res = macchange(inventory, mac_current="010203040506", mac_new="010203040599")
    result = res.hosts["gv2p"]
    assert result.status == "failed"
    assert result.report["changed"] is True and result.report["notified"] is False
    assert any("could not be notified: arimonitor is down" in w for w in result.report["warnings"])
    assert any("changed in both files, but the provisioning monitor" in e for e in result.errors)
    assert host.files() == with_mac("010203040599")


def _monitor(workdir: Path, host: MacHost) -> tuple[list[str], Path, Path]:
    """A monitor command that counts notifications in the host's log; while `down` exists it
    fails, while `hang` exists it says it started and blocks (then exits without counting)."""
    script = workdir / f"{host.alias}-arimonitor"
    script.write_text(
        "#!/bin/sh\n"
        f"if [ -e {workdir}/down ]; then echo arimonitor is down >&2; exit 3; fi\n"
        f"if [ -e {workdir}/hang ]; then echo started > {workdir}/started\n"
        f"  while [ -e {workdir}/hang ]; do sleep 0.1; done; exit 9; fi\n"
        f"echo notified >> {host.monitor_log}\n"
    )
    script.chmod(0o755)
    return [str(script), "reload"], workdir / "down", workdir / "hang"


def test_a_notification_that_failed_is_made_by_the_next_run_of_the_same_change(fleet, workdir):
    inventory, host, _ = fleet()
    command, down, _hang = _monitor(workdir, host)
    ev = dict(mac_current="010203040506", mac_new="010203040599", endpoint_mac_monitor_command=command)
    pending = Path(f"{host.def_path}.monitor-pending")
    down.touch()
    first = macchange(inventory, **ev)
    assert first.hosts["gv2p"].status == "failed" and first.hosts["gv2p"].report["notified"] is False
    assert host.files() == with_mac("010203040599") and pending.exists()
    down.unlink()  # the monitor is back
    again = macchange(inventory, **ev)
    assert again.succeeded, again.to_dict()
    report = again.hosts["gv2p"].report
    assert (report["changed"], report["notified"]) == (False, True)
    assert host.notifications() == 1 and not pending.exists()
    host.assert_owner_and_mode()
    third = macchange(inventory, **ev)
    assert third.succeeded and third.hosts["gv2p"].report["notified"] is False
    assert host.notifications() == 1, "nothing pending any more: no second notification"


def test_a_run_killed_before_the_monitor_answered_is_notified_by_the_next_run(fleet, workdir):
    """kill -9 of ansible-playbook (and its whole process group) while the handler waits on
    the monitor: the files are changed, the monitor never answered; the retry notifies it."""
    inventory, host, _ = fleet()
    command, _down, hang = _monitor(workdir, host)
    ev = {"target": "gv2p", "extension": "3010", "request_id": "kill-req",
          "mac_current": "010203040506", "mac_new": "010203040599",
          "endpoint_mac_monitor_command": command}  # fmt: skip
    hang.touch()
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", ANSIBLE_NOCOLOR="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env.pop("ANSIBLE_CONFIG", None)
    proc = subprocess.Popen(
        ["ansible-playbook", "-i", str(inventory), "playbooks/macchange.yml", "-e", json.dumps(ev)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (workdir / "started").exists(), "the handler reached the monitor", 240, proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        hang.unlink()  # the orphaned monitor on the host exits, counting nothing
    assert host.files() == with_mac("010203040599") and host.notifications() == 0
    again = macchange(inventory, **{k: v for k, v in ev.items() if k not in ("target", "extension")})
    assert again.succeeded, again.to_dict()
    report = again.hosts["gv2p"].report
    assert (report["changed"], report["notified"]) == (False, True)
    assert host.notifications() == 1 and not Path(f"{host.def_path}.monitor-pending").exists()


# ------------------------------------------------------------- endpoint files as they are

LAYOUTS = {
    name: (UNIT_FIXTURES / "endpoints" / f"endpoints_sip.{name}.def").read_bytes()
    for name in ("semicolon", "pipe", "section", "comment")
}
BROKEN_LINES = b"ext=3050|MAC:0004F2000001\n3051|Novo|MAC:805EC09B49F3\n"
SECOND_FIELD = b"".join(  # a layout the default rules cannot read: the extension second
    b"l%d;%s\n" % (i, line.strip())
    for i, line in enumerate(ORIG_SIP.splitlines())
    if line.strip()[:1].isdigit()
)
SECOND_FIELD_RULES = {"endpoints_sip": {"record": [r"^l[0-9]+;(?P<ext>[0-9]+)(?P<body>[^\r\n]*)"]}}


@pytest.fixture
def layouts(sshd, workdir):
    """One mac_servers alias per layout of endpoints_sip.def, one with lines that do not parse,
    one whose layout needs its own endpoint_mac_rules (set as a host var)."""
    python = servers.target_python()
    hosts = {name: MacHost(workdir, name, sip) for name, sip in LAYOUTS.items()}
    hosts["broken"] = MacHost(workdir, "broken", LAYOUTS["pipe"] + BROKEN_LINES)
    hosts["custom"] = MacHost(workdir, "custom", SECOND_FIELD)
    mac_servers = {name: host.hostvars(python) for name, host in hosts.items()}
    mac_servers["custom"]["endpoint_mac_rules"] = SECOND_FIELD_RULES
    inventory = servers.write_inventory(
        workdir / "inventory.yml",
        {"sip_servers": dict.fromkeys(hosts, {}), "mac_servers": mac_servers},
        all_vars={**sshd.ansible_vars(), "ansible_python_interpreter": python},
    )
    return inventory, hosts


def test_probe_reports_how_every_layout_parses_and_changes_nothing(layouts):
    inventory, hosts = layouts
    before = {name: host.files() for name, host in hosts.items()}
    res = run_playbook(
        "macchange.yml", inventory=inventory, extravars={"probe": True, "request_id": "probe-1"}, check=True
    )
    assert res.succeeded, res.to_dict()
    assert sorted(res.hosts) == sorted([*hosts, "localhost"])
    extensions = sorted({line.split(b";")[0].strip().decode() for line in ORIG_SIP.splitlines()
                         if line.strip()[:1].isdigit()}, key=lambda e: (len(e), e))  # fmt: skip
    assert len(extensions) == 40
    for name, host in hosts.items():
        report = res.hosts[name].report
        assert res.hosts[name].status == "ok", name  # read only: nothing changed
        assert report["probe"] is True and report["check_mode"] is True and report["request_id"] == "probe-1"
        sip, def_ = report["files"]["endpoints_sip"], report["files"]["endpoints_def"]
        assert def_["extensions"] == extensions and def_["unparsed"] == []
        assert def_["path"] == str(host.def_path)
        if name == "broken":
            assert sip["extensions"] == sorted([*extensions, "3051"], key=lambda e: (len(e), e))
            assert [u["text"] for u in sip["unparsed"]] == ["ext=3050|MAC:0004F2000001"]
            assert sip["duplicate_macs"] == {"805EC09B49F3": ["2001", "3051"]}
            assert report["only_in"] == {"endpoints_def": [], "endpoints_sip": ["3051"]}
        else:
            assert sip["extensions"] == extensions, name
            assert sip["unparsed"] == [] and sip["duplicate_macs"] == {} and sip["bad_records"] == [], name
            assert report["only_in"] == {"endpoints_def": [], "endpoints_sip": []}, name
        assert sip["without_mac"] == ["2010"] and sip["records"] == 40 + (name == "broken")
    for name, host in hosts.items():
        assert host.files() == before[name] and host.backups() == [] and host.notifications() == 0

    # the same host without its own rules: the probe shows the default cannot read it
    inventory.write_text(inventory.read_text().replace("endpoint_mac_rules", "unused_rules"))
    res = run_playbook("macchange.yml", inventory=inventory, extravars={"probe": True, "target": "custom"})
    assert res.succeeded, res.to_dict()
    sip = res.hosts["custom"].report["files"]["endpoints_sip"]
    assert sip["records"] == 0 and sip["unparsed_count"] == 40
    assert res.hosts["custom"].report["only_in"]["endpoints_def"] == extensions


@pytest.mark.parametrize("layout", ["section", "custom"])
def test_a_change_on_another_layout_writes_only_the_mac(layouts, layout):
    inventory, hosts = layouts
    host = hosts[layout]
    _def, sip = host.files()
    res = macchange(inventory, target=layout, mac_current="010203040506", mac_new="01:02:03:04:05:99")
    assert res.succeeded, res.to_dict()
    report = res.hosts[layout].report
    assert report["operation"] == "replace" and report["notified"] is True
    assert "010203040599" in report["files"]["endpoints_sip"]["after"]
    assert sip.count(b"010203040506") == 1
    assert host.files() == (with_mac("010203040599")[0], sip.replace(b"010203040506", b"010203040599"))
    host.assert_owner_and_mode()
