# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The target-side fail2ban helpers (module_utils/fail2ban.py): client output parsers, the
config scan, the managed file. `ansible-test units` runs these on Python 2.7, 3.6 and the
controller's Python, the interpreters the fleet's SIP servers run."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.athome.voip.plugins.module_utils import fail2ban as f2b

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


def test_option_names_are_read_in_any_case_as_fail2ban_reads_them():
    """fail2ban's parser lower-cases option names: a jail's "IgnoreIP =" must be kept
    (%(known/ignoreip)s), not taken for a jail with no ignoreip (its addresses dropped)."""
    found = f2b.scan_ignoreip(["[sshd]\nIgnoreIP = 10.1.1.1\n  10.1.1.2\n[DEFAULT]\nIGNOREIP: ::1\n"])
    assert found == {"sshd": ["10.1.1.1", "10.1.1.2"], "DEFAULT": ["::1"]}
    assert f2b.parse_managed("[sshd]\nIgnoreIp = %(known/ignoreip)s 3.3.3.3\n") == ["3.3.3.3"]


def test_section_names_are_taken_as_fail2ban_takes_them():
    """fail2ban's parser keeps "[sshd ]" as a section of its own: its ignoreip is not sshd's."""
    assert f2b.scan_ignoreip(["[sshd ]\nignoreip = 9.9.9.9\n[sshd]\nenabled = true\n"]) == {"sshd ": ["9.9.9.9"]}


def test_base_ignoreip_excludes_the_managed_file(tmpdir):
    tmpdir.mkdir("jail.d")
    tmpdir.join("jail.conf").write("[DEFAULT]\n#ignoreip = 127.0.0.1/8\n")
    managed = tmpdir.join("jail.d", "zz-athome-whitelist.local")
    managed.write("[sshd]\nignoreip = %(known/ignoreip)s 3.3.3.3\n")
    assert f2b.base_ignoreip(str(tmpdir), ["sshd"], exclude=str(managed)) == {"sshd": None}
    tmpdir.join("jail.local").write("[DEFAULT]\nignoreip = ::1\n[sshd]\nignoreip = 10.1.1.1\n")
    base = f2b.base_ignoreip(str(tmpdir), ["sshd", "asterisk"], exclude=str(managed))
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


def test_only_the_newest_backups_of_the_managed_file_are_kept():
    base = "athome-whitelist.local"
    names = [
        "%s.%d.2025-11-%02d@10:00:00~" % (base, pid, day) for pid, day in ((101, 3), (99, 1), (120, 5), (7, 2))
    ] + [base, "other.local.5.2025-11-01@10:00:00~", base + ".bak"]
    oldest_two = [base + ".99.2025-11-01@10:00:00~", base + ".7.2025-11-02@10:00:00~"]
    assert f2b.backups_to_prune(names, base, 2) == oldest_two
    assert f2b.backups_to_prune(names, base, 0) == []
    assert f2b.backups_to_prune(names, base, 10) == []


DAY = 86400
NOW = 1764470400  # 2025-11-30T02:40:00Z


def test_dates_of_managed_addresses_round_trip_through_the_file():
    added = {"3.3.3.3": NOW - 40 * DAY, "2001:db8::7": NOW}
    base = {"sshd": ["127.0.0.1/8"]}
    text = f2b.render_managed(["3.3.3.3", "2001:db8::7", "5.5.5.5"], ["sshd"], base, added)
    assert "# added 3.3.3.3 2025-10-21T02:40:00Z\n" in text
    assert "# added 2001:db8::7 2025-11-30T02:40:00Z\n" in text
    assert "# added 5.5.5.5" not in text  # no date known: no line (dated by a run with expiry on)
    assert f2b.parse_stamps(text) == added
    # The date lines are comments: fail2ban and parse_managed see the same addresses as before.
    assert f2b.parse_managed(text) == ["3.3.3.3", "2001:db8::7", "5.5.5.5"]
    assert f2b.parse_stamps("# added 3.3.3.3 yesterday\n# added 4.4.4.4 2025-13-01T00:00:00Z\n") == {}
    # Without dates the file is what older runs wrote.
    assert f2b.render_managed(["3.3.3.3"], ["sshd"], base, {}) == f2b.render_managed(["3.3.3.3"], ["sshd"], base)


def test_expired_addresses_are_older_than_the_days_except_this_runs_own():
    added = {"3.3.3.3": NOW - 40 * DAY, "4.4.4.4": NOW - 29 * DAY, "6.6.6.6": NOW - 31 * DAY}
    addresses = ["3.3.3.3", "4.4.4.4", "5.5.5.5", "6.6.6.6"]
    assert f2b.expired_addresses(addresses, added, NOW, 30) == ["3.3.3.3", "6.6.6.6"]
    assert f2b.expired_addresses(addresses, added, NOW, 30, keep="6.6.6.6") == ["3.3.3.3"]
    assert f2b.expired_addresses(addresses, added, NOW, 0) == []
    assert f2b.expired_addresses(addresses, added, NOW, 41) == []
