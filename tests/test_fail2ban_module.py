"""Pure helpers of the fail2ban_whitelist role: client output parsers, config scan,
managed file rendering (module_utils, runs on targets) and the address check (filter)."""

from __future__ import annotations

import importlib.util
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import servers
from tests.collection_paths import FILTERS, MODULE_UTILS


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


f2b = _load("athome_fail2ban", MODULE_UTILS / "fail2ban.py")
flt = _load("fail2ban_whitelist_filters", FILTERS / "fail2ban_whitelist.py")

# Exact answers of fail2ban-client 1.0.2 (recipe 03).
STATUS = "Status\n|- Number of jail:\t2\n`- Jail list:\tasterisk, sshd\n"
JAIL_STATUS = (
    "Status for the jail: asterisk\n|- Filter\n|  |- Currently failed:\t0\n"
    "|  |- Total failed:\t0\n|  `- File list:\t/x/log/asterisk.log\n`- Actions\n"
    "   |- Currently banned:\t2\n   |- Total banned:\t2\n   `- Banned IP list:\t3.3.3.3 4.4.4.4\n"
)
IGNOREIP = "These IP addresses/networks are ignored:\n|- 127.0.0.0/8\n|- ::1\n`- 3.3.3.3\n"


def test_parse_status_and_jail_status():
    assert f2b.parse_status_jails(STATUS) == ["asterisk", "sshd"]
    assert f2b.parse_status_jails("Status\n|- Number of jail:\t0\n`- Jail list:\t\n") == []
    assert f2b.parse_status_banned(JAIL_STATUS) == ["3.3.3.3", "4.4.4.4"]
    assert f2b.parse_status_banned(JAIL_STATUS.replace("3.3.3.3 4.4.4.4", "")) == []
    with pytest.raises(f2b.Fail2banError):
        f2b.parse_status_jails("Sorry but the jail 'x' does not exist")


def test_parse_ignoreip():
    assert f2b.parse_ignoreip(IGNOREIP) == ["127.0.0.0/8", "::1", "3.3.3.3"]
    assert f2b.parse_ignoreip("No IP address/network is ignored\n") == []
    with pytest.raises(f2b.Fail2banError):
        f2b.parse_ignoreip("Sorry but the jail 'nosuchjail' does not exist")


def test_parse_banned_answers():
    assert f2b.parse_banned_ip("[['asterisk', 'sshd']]\n") == ["asterisk", "sshd"]
    assert f2b.parse_banned_ip("[[]]") == []
    assert f2b.parse_get_banned_ip("1") is True
    assert f2b.parse_get_banned_ip("0\n") is False
    for garbage in ("ERROR  Invalid command", "[['a'], ['b']]", "__import__('os')"):
        with pytest.raises(f2b.Fail2banError):
            f2b.parse_banned_ip(garbage)
    for garbage in ("ERROR  Invalid command", "[1, 0]", "2"):
        with pytest.raises(f2b.Fail2banError):
            f2b.parse_get_banned_ip(garbage)


def test_scan_ignoreip_follows_read_order_sections_and_continuations():
    texts = [
        "[DEFAULT]\n#ignoreip = 1.1.1.1\nbantime = 1h\n[sshd]\nenabled = true\n",
        "[DEFAULT]\nignoreip = 127.0.0.1/8 ::1\n   10.0.0.1\n[asterisk]\nignoreip: 10.1.1.1\n",
        "[DEFAULT]\nignoreip = 127.0.0.1/8 ::1 10.9.9.9\n",
    ]
    found = f2b.scan_ignoreip(texts)
    assert found == {"DEFAULT": ["127.0.0.1/8", "::1", "10.9.9.9"], "asterisk": ["10.1.1.1"]}
    assert f2b.scan_ignoreip(texts[:2])["DEFAULT"] == ["127.0.0.1/8", "::1", "10.0.0.1"]


def test_base_ignoreip_excludes_the_managed_file(tmp_path):
    (tmp_path / "jail.d").mkdir()
    (tmp_path / "jail.conf").write_text("[DEFAULT]\n#ignoreip = 127.0.0.1/8\n")
    managed = tmp_path / "jail.d" / "zz-athome-whitelist.local"
    managed.write_text("[sshd]\nignoreip = %(known/ignoreip)s 3.3.3.3\n")
    assert f2b.base_ignoreip(str(tmp_path), ["sshd"], exclude=str(managed)) == {"sshd": None}
    (tmp_path / "jail.local").write_text("[DEFAULT]\nignoreip = ::1\n[sshd]\nignoreip = 10.1.1.1\n")
    base = f2b.base_ignoreip(str(tmp_path), ["sshd", "asterisk"], exclude=str(managed))
    assert base == {"sshd": ["10.1.1.1"], "asterisk": ["::1"]}


def test_render_and_parse_managed_round_trip():
    base = {"sshd": ["::1"], "asterisk": None}
    text = f2b.render_managed(["3.3.3.3", "2001:db8::7"], ["sshd", "asterisk"], base)
    assert "[asterisk]\nignoreip = 3.3.3.3 2001:db8::7\n" in text
    assert "[sshd]\nignoreip = %(known/ignoreip)s 3.3.3.3 2001:db8::7\n" in text
    assert text.index("[asterisk]") < text.index("[sshd]")
    assert f2b.parse_managed(text) == ["3.3.3.3", "2001:db8::7"]
    assert f2b.render_managed([], ["sshd"], base) == f2b.MANAGED_HEADER
    assert f2b.parse_managed(f2b.MANAGED_HEADER) == []


@pytest.mark.parametrize(
    "value,ok",
    [
        ("3.3.3.3", True),
        ("2001:db8::7", True),
        ("3.3.3.3/32", False),
        ("3.3.3.3;id", False),
        ("999.1.1.1", False),
        ("host.example", False),
        ("", False),
        (None, False),
        ("1.2.3", False),
    ],
)
def test_is_single_address(value, ok):
    assert f2b.is_single_address(value) is ok


BAD = [
    "0.0.0.0/0",
    "127.0.0.1",
    "3.3.3.3;id",
    "999.1.1.1",
    "::",
    "224.0.0.1",
    "",
    "::1",
    "3.3.3.3 ",
    "169.254.1.1",
    "255.255.255.255",
    "240.0.0.1",
    "::ffff:127.0.0.1",
    "fe80::1%eth0",
    "ff02::1",
    "3.3.3.3/32",
    "0.0.0.0",
    "3.3.3.3\n4.4.4.4",
    None,
]


@pytest.mark.parametrize("bad", BAD)
def test_filter_refuses(bad):
    assert flt.ip_problem(bad)
    with pytest.raises(ValueError):
        flt.ip_normalize(bad)


@pytest.mark.parametrize(
    "good,canonical",
    [
        ("3.3.3.3", "3.3.3.3"),
        ("10.0.0.5", "10.0.0.5"),
        ("2001:DB8:0::7", "2001:db8::7"),
        ("::ffff:3.3.3.3", "3.3.3.3"),
    ],
)
def test_filter_accepts_and_normalizes(good, canonical):
    assert flt.ip_problem(good) == ""
    assert flt.ip_normalize(good) == canonical


@given(st.ip_addresses())
def test_filter_agrees_with_ipaddress(addr):
    text = str(addr)
    mapped = getattr(addr, "ipv4_mapped", None) or addr
    kinds = ("is_unspecified", "is_loopback", "is_multicast", "is_link_local", "is_reserved")
    refused = any(getattr(mapped, k) for k in kinds)
    refused = refused or mapped == ipaddress.IPv4Address("255.255.255.255")
    assert (flt.ip_problem(text) != "") is refused
    assert f2b.is_single_address(text)


@pytest.mark.parametrize("version", ["2.7", "3.6"])
def test_module_utils_on_old_target_pythons(version):
    """The target-side helpers import and parse on the old interpreters the fleet runs."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fail2ban as m; "
        "assert m.parse_status_jails(sys.argv[2]) == ['asterisk', 'sshd']; "
        "assert m.parse_banned_ip(\"[['sshd']]\") == ['sshd']; "
        "assert m.parse_ignoreip(sys.argv[3])[-1] == '3.3.3.3'; "
        "assert m.is_single_address('2001:db8::7') and not m.is_single_address('1.2.3'); "
        "text = m.render_managed(['3.3.3.3'], ['sshd'], dict(sshd=None)); "
        "assert m.parse_managed(text) == ['3.3.3.3']; "
        "print('ok')"
    )
    argv = [servers.pyenv_python(version), "-c", code, str(MODULE_UTILS), STATUS, IGNOREIP]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert sys.version_info >= (3, 10)  # the controller side stays modern


def test_only_the_newest_backups_of_the_managed_file_are_kept():
    base = "athome-whitelist.local"
    names = [
        f"{base}.{pid}.2025-11-{day:02d}@10:00:00~" for pid, day in ((101, 3), (99, 1), (120, 5), (7, 2))
    ] + [base, "other.local.5.2025-11-01@10:00:00~", f"{base}.bak"]
    oldest_two = [f"{base}.99.2025-11-01@10:00:00~", f"{base}.7.2025-11-02@10:00:00~"]
    assert f2b.backups_to_prune(names, base, 2) == oldest_two
    assert f2b.backups_to_prune(names, base, 0) == []
    assert f2b.backups_to_prune(names, base, 10) == []
