"""The address check of the fail2ban_whitelist role (the collection's filter), property-tested on the
controller; the target-side parsers are tested by ansible-test units (tests/unit of the collection)."""

from __future__ import annotations

import importlib.util
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.collection_paths import FILTERS, MODULE_UTILS


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
