"""The address check of the fail2ban_whitelist role (the collection's filter), property-tested on the
controller; the target-side parsers are tested by ansible-test units (tests/unit of the collection).
The socket route (module_utils/fail2ban_socket.py) against a real fail2ban-server."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import servers
from tests.collection_paths import COLLECTIONS, FILTERS, MODULE_UTILS


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


f2b = _load("athome_fail2ban", MODULE_UTILS / "fail2ban.py")
flt = _load("fail2ban_whitelist_filters", FILTERS / "fail2ban_whitelist.py")


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


# ------------------------------------------------------------ the socket route, real server


def _socket_route():
    """module_utils/fail2ban_socket and its error class, imported as the module imports them."""
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    from ansible_collections.athome.voip.plugins.module_utils import fail2ban, fail2ban_socket

    return fail2ban_socket, fail2ban.Fail2banError


def test_socket_route_against_a_real_fail2ban_server(fail2ban_factory):
    """The helper under fail2ban-client's own interpreter, over one connection, reads and
    changes what fail2ban-client then reads back."""
    fs, fail2ban_error = _socket_route()
    f2b = fail2ban_factory("sock")
    interpreter = fs.client_interpreter("fail2ban-client", shutil.which)
    assert interpreter == ["/usr/bin/python3"]  # Debian's fail2ban-client shebang
    assert fs.socket_of(str(f2b.dir), lambda p: Path(p).read_text()) == str(f2b.sock)
    f2b.ban("sshd", "3.3.3.3")
    client = fs.SocketClient(interpreter, str(f2b.sock))
    try:
        assert client.jails() == ["asterisk", "sshd"]
        assert client.banned_in("3.3.3.3", ["asterisk", "sshd"]) == (["sshd"], "banned")
        assert fs.answer_status_banned(client.request("status", "sshd")) == ["3.3.3.3"]
        assert sorted(client.ignoreip("asterisk")) == sorted(f2b.ignore_list("asterisk"))
        after = client.ignoreip_change("asterisk", "addignoreip", "3.3.3.3")
        assert "3.3.3.3" in after and sorted(after) == sorted(f2b.ignore_list("asterisk"))
        client.unban("sshd", "3.3.3.3")
        assert f2b.banned_jails("3.3.3.3") == []
        with pytest.raises(fail2ban_error) as info:
            client.ignoreip("nosuchjail")
        assert "nosuchjail" in str(info.value)
    finally:
        client.close()
    assert "-3.3.3.3" in (f2b.dir / "actions.log").read_text()


@pytest.mark.parametrize("version", ["2.7", "3.6"])
def test_an_older_interpreter_cannot_read_the_servers_pickles(fail2ban_factory, version):
    """fail2ban 1.0.2 on Python 3.11 answers with pickle protocol 5, which Python 2.7 and 3.6
    cannot read: why the helper runs under the server's interpreter, and why this is a
    transport error (the module then uses fail2ban-client) rather than a failure."""
    fs, _ = _socket_route()
    f2b = fail2ban_factory("old")
    with pytest.raises(fs.TransportError) as info:
        fs.SocketClient([servers.pyenv_python(version)], str(f2b.sock))
    assert "unsupported pickle protocol: 5" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "[DEFAULT]\nignoreip = 127.0.0.1/8 ::1\n[sshd]\nIgnoreIP = 10.1.1.1\n  10.1.1.2\n",
        "[sshd ]\nignoreip = 9.9.9.9\n[asterisk]\nIGNOREIP: 10.2.2.2\n",
        "[sshd]\n#ignoreip = 1.1.1.1\n; ignoreip = 2.2.2.2\nignoreip = 3.3.3.3\n",
    ],
)
def test_the_ignoreip_scan_reads_a_jail_file_as_fail2bans_own_parser_does(tmp_path, text):
    """The module keeps each jail's other addresses (%(known/ignoreip)s) only where its scan
    finds an ignoreip: compared with the installed fail2ban's parser, run under its interpreter
    (option names in any case; "[sshd ]" is a section of its own)."""
    path = tmp_path / "jail.local"
    path.write_text(text)
    interpreter = Path(shutil.which("fail2ban-client")).read_text().splitlines()[0][2:].split()
    probe = (
        "import json, sys\n"
        "from fail2ban.client.configparserinc import SafeConfigParserWithIncludes as P\n"
        "p = P(); p.read([sys.argv[1]])\n"
        "out = {s: p.get(s, 'ignoreip').split() for s in p.sections() if p.has_option(s, 'ignoreip')}\n"
        "d = p.defaults(); out.update({'DEFAULT': d['ignoreip'].split()} if 'ignoreip' in d else {})\n"
        "print(json.dumps(out))\n"
    )
    theirs = json.loads(subprocess.run([*interpreter, "-c", probe, str(path)], capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    ours = f2b.scan_ignoreip([text])
    # fail2ban's sections inherit the DEFAULT's ignoreip; the scan keeps it apart (base_ignoreip
    # falls back to it), so compare a section's own value where it sets one.
    assert ours.get("DEFAULT") == theirs.get("DEFAULT")
    for section, value in ours.items():
        assert theirs[section] == value, (section, theirs)
    assert {s for s in theirs if theirs[s] != theirs.get("DEFAULT")} <= set(ours)
