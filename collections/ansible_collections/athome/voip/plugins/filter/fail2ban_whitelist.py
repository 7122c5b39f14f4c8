"""Controller-side checks of the address a play whitelists (pure, tests/test_fail2ban_module.py).

    {{ ip | fail2ban_whitelist_ip_problem }}   -> "" when ip is acceptable, else the reason
    {{ ip | fail2ban_whitelist_ip_normalize }} -> canonical text of the address
    {{ result | fail2ban_whitelist_report(ip, request_id, check_mode) }} -> a host's CHECKIP report

fail2ban accepts anything in `addignoreip` (an unknown word becomes a DNS name),
so the address is checked here before any host is touched.
"""

from __future__ import annotations

import ipaddress
import re

_CHARS = re.compile(r"^[0-9A-Fa-f:.]+$")


def _address(value):
    text = "" if value is None else str(value)
    if not text:
        raise ValueError("no address given")
    if "/" in text:
        raise ValueError(f"{text!r} is a network, not one address")
    if not _CHARS.match(text):
        raise ValueError(f"{text!r} is not an IPv4/IPv6 address (unexpected characters)")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IPv4/IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for attr, what in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_multicast", "multicast"),
        ("is_link_local", "link-local"),
        ("is_reserved", "reserved"),
    ):
        if getattr(addr, attr):
            raise ValueError(f"{text!r} is a {what} address")
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{text!r} is the broadcast address")
    return addr


def ip_problem(value) -> str:
    """Why value cannot be whitelisted, or "" when it can."""
    try:
        _address(value)
    except ValueError as e:
        return str(e)
    return ""


def ip_normalize(value) -> str:
    """The canonical text of an acceptable address (lower-case, compressed IPv6)."""
    return str(_address(value))


def report(result, ip, request_id="", check_mode=False) -> dict:
    """One host's entry of playbooks/unban.yml's report, from the fail2ban_ignoreip result.

    One filter call instead of a dict of ten templated fields: each template costs the
    controller a Jinja compile per host, which counts on 16+ hosts (bench.checkip)."""
    return {
        "ip": ip_normalize(ip),
        "request_id": request_id or "",
        "jails": result["jails"],
        "banned_in": result["banned_in"],
        "unbanned": len(result["unbanned"]) > 0,
        "whitelisted": "new" if result["address_changed"] else "already",
        "expired": result["expired"],
        "backup_file": result.get("backup_file") or "",
        "transport": result["transport"],
        "check_mode": bool(check_mode),
        "errors": [],
    }


class FilterModule:
    def filters(self):
        return {
            "fail2ban_whitelist_ip_problem": ip_problem,
            "fail2ban_whitelist_ip_normalize": ip_normalize,
            "fail2ban_whitelist_report": report,
        }
