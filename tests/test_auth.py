"""Who may command athome: the sender whitelist and hashed tokens bound to senders."""

from __future__ import annotations

import json
import os
import time

import pytest

from dispatcher.auth import (
    TOKEN_PROBLEMS,
    Identity,
    SenderWhitelist,
    ServerKey,
    TokenStore,
    may_run,
    sender_address,
    valid_address,
    weak_token,
)
from dispatcher.errors import AthomeError, AuthError

ANA = "ana@example.test"


@pytest.fixture
def store(tmp_path):
    return TokenStore(tmp_path / "tokens.json")


def code(store, token, sender=ANA, now=None) -> str:
    with pytest.raises(AuthError) as info:
        store.check(token, sender, now)
    assert info.value.reason == "token"
    return info.value.detail


def test_added_token_is_16_hex_and_stored_only_as_digests(store):
    entry, token = store.add("ops team", senders=[ANA])
    raw = store.path.read_text()
    assert len(token) == 16 and int(token, 16) >= 0
    assert token not in raw and token.lower() not in raw
    assert entry.hash.startswith("scrypt$") and len(entry.lookup) == 64
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert oct(store.key.path.stat().st_mode & 0o777) == "0o600", "the server key is created private"
    assert store.check(token, ANA).id == entry.id
    assert store.check(token.lower(), "Ana@Example.test").id == entry.id


def test_the_lookup_is_keyed_so_another_key_matches_nothing(store, tmp_path):
    _, token = store.add("ops", senders=[ANA])
    other = TokenStore(store.path, ServerKey(value="x" * 64))
    assert code(other, token) == "unknown"
    problems, _ = other.problems()
    assert any("another server key" in p for p in problems)


def test_each_refusal_has_its_own_code(store):
    entry, token = store.add("ops", senders=[ANA])
    other = "%016X" % ((int(token, 16) + 1) % 2**64)
    assert code(store, None) == "missing"
    assert code(store, "XYZ") == "malformed" and code(store, "A1B2C3D") == "malformed"
    assert code(store, other) == "unknown"
    assert code(store, token, "bob@example.test") == "not-bound"
    store.set_enabled(entry.id, False)
    assert code(store, token, "bob@example.test") == "not-bound", "another sender never learns it is disabled"
    assert code(store, token) == "disabled"


def test_what_the_requester_is_told_never_reveals_a_token_of_another_sender():
    assert TOKEN_PROBLEMS["not-bound"] == TOKEN_PROBLEMS["unknown"] == TOKEN_PROBLEMS["disabled"]
    assert len({TOKEN_PROBLEMS[c] for c in ("missing", "malformed", "unknown", "expired", "locked")}) == 5


def test_a_domain_binding_admits_that_domain_only(store):
    _, token = store.add("noc", senders=["@example.test"])
    assert store.check(token, "bob@example.test")
    assert code(store, token, "bob@sub.example.test") == "not-bound"
    assert code(store, token, "bob@example.test.evil.test") == "not-bound"


def test_expired_tokens_are_refused_as_expired_to_their_own_sender_only(store):
    _, token = store.add("temp", senders=[ANA], expires=time.time() + 60)
    assert store.check(token, ANA)
    assert code(store, token, now=time.time() + 120) == "expired"
    assert code(store, token, "bob@example.test", now=time.time() + 120) == "not-bound"


def test_a_token_must_be_bound_to_someone(store):
    with pytest.raises(AthomeError, match="at least one sender"):
        store.add("nobody", senders=[])
    with pytest.raises(AthomeError, match="not an address"):
        store.add("bad", senders=["{{7*7}}@example.test"])


def test_rotate_replaces_the_token_and_keeps_its_binding(store):
    entry, old = store.add("ops", senders=[ANA], commands=["CHECKIP"])
    rotated, new = store.rotate(entry.id)
    assert rotated.id == entry.id and new != old and len(new) == 16
    assert code(store, old) == "unknown"
    assert store.check(new, ANA).commands == ["CHECKIP"]


def test_token_scope_limits_commands(store):
    entry, token = store.add("recordings only", senders=[ANA], commands=["RAMAIS"])
    ident = Identity.of(ANA, store.check(token, ANA))
    assert may_run(ident, "RAMAIS", "token")
    assert not may_run(ident, "CHECKIP", "token")
    assert may_run(ident, "HELP", "always")
    assert not may_run(ident, "WHITELIST", "admin")


LEGACY = [
    {"token": "A1B2C3D4", "description": "Token Master 1", "enabled": True},
    {"token": "12345678", "description": "old", "enabled": True},
    {"token": "DEADBEEF", "description": "dev", "enabled": True},
    {"token": "9F8E7D6C", "description": "gone", "enabled": False},
    {"token": "nothex!!", "description": "broken", "enabled": True},
]


@pytest.mark.parametrize("shape", ["object", "list"])
def test_legacy_import_takes_both_shapes_bound_expiring_and_marked(store, tmp_path, shape):
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"tokens": LEGACY} if shape == "object" else LEGACY))
    now = time.time()
    notes = store.import_legacy(legacy, senders=[ANA], expires_days=30)
    assert "A1B2C3D4" not in store.path.read_text()
    entry = store.check("A1B2C3D4", ANA)
    assert entry.legacy and 30 * 86400 <= entry.expires - now < 31 * 86400
    assert code(store, "A1B2C3D4", "bob@example.test") == "not-bound"
    assert code(store, "12345678") == "disabled" and code(store, "DEADBEEF") == "disabled"
    assert code(store, "9F8E7D6C") == "disabled"
    assert any("entry 5" in n and "skipped" in n for n in notes)
    assert sum("DISABLED" in n for n in notes) == 2
    _, warnings = store.problems()
    assert any("legacy token" in w for w in warnings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"tokens": {"a": 1}}', "expected"),
        ('{"tokens": ["A1B2C3D4"]}', "entry 1 is not an object"),
        ('[{"token": "A1B2C3D4"}, {"token": 5}]', "entry 2 is not an object"),
    ],
)
def test_a_malformed_legacy_file_is_a_clear_error_naming_file_and_entry(store, tmp_path, content, message):
    legacy = tmp_path / "legacy.json"
    legacy.write_text(content)
    with pytest.raises(AthomeError, match=message) as info:
        store.import_legacy(legacy, senders=[ANA])
    assert str(legacy) in str(info.value)
    assert not store.path.exists(), "nothing imported from a file that is not understood"


def test_check_warns_about_tokens_that_expire_soon(store):
    store.add("soon", senders=[ANA], expires=time.time() + 3 * 86400)
    problems, warnings = store.problems()
    assert not problems and any("expires" in w for w in warnings)


def test_a_version_1_file_is_read_and_reported_for_rotation(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"id": "t1", "description": "old", "hash": "scrypt$1$1$1$00$00"}]))
    store = TokenStore(path)
    store.key.get(create=True)
    assert [e.id for e in store.entries()] == ["t1"]
    problems, _ = store.problems()
    assert any("older version" in p for p in problems) and any("no usable token" in p for p in problems)


@pytest.mark.parametrize("token", ["12345678", "DEADBEEF", "00000000", "AAAAAAAA", "FEDCBA98"])
def test_weak_tokens_are_recognised(token):
    assert weak_token(token)


def test_whitelist_file_changes_are_seen_without_restart(tmp_path):
    f = tmp_path / "senders.txt"
    f.write_text("# staff\nA@Example.test\n")
    wl = SenderWhitelist(path=f)
    assert wl.allows("a@example.test") and not wl.allows("b@example.test")
    f.write_text("b@example.test, c@example.test\n")
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert wl.allows("b@example.test") and wl.allows("c@example.test") and not wl.allows("a@example.test")


@pytest.mark.parametrize(
    "address",
    [
        "{{7*7}}@example.test",
        "a'b@example.test",
        "a b@example.test",
        "a@localhost",
        "a@@example.test",
        'a"@x.test',
    ],
)
def test_only_conservative_addresses_are_accepted(tmp_path, address):
    assert not valid_address(address)
    f = tmp_path / "senders.txt"
    f.write_text(f"{address}\nok@example.test\n")
    wl = SenderWhitelist(path=f)
    assert wl.addresses() == {"ok@example.test"} and wl.rejected


@pytest.mark.parametrize(
    "address", ["ana@example.test", "jose.silva+voip@mail.example.com.br", "a_b-c@x.example"]
)
def test_ordinary_addresses_are_accepted(address):
    assert valid_address(address)


@pytest.mark.parametrize("header", ["", "a@example.test, b@example.test", "not an address", "<>"])
def test_from_header_with_none_or_several_addresses_is_refused(header):
    with pytest.raises(AuthError) as info:
        sender_address(header)
    assert info.value.reason == "sender"


def test_an_encoded_word_cannot_smuggle_a_whitelisted_address():
    header = "=?utf-8?q?ana=40example=2Etest_=28?=<eve@evil.test>=?utf-8?q?=29?="
    with pytest.raises(AuthError):
        assert sender_address(header) != "ana@example.test"
    assert sender_address("=?UTF-8?Q?Jos=C3=A9?= <Jose@Example.test>") == "jose@example.test"
    assert sender_address('"Silva, Ana" <ana@example.test>') == "ana@example.test"


@pytest.mark.parametrize(
    "header",
    [
        "=?utf-8?q?Jos=C3=A9_da_Silva?=\r\n <jose@example.test>",  # Outlook/Thunderbird fold
        "=?UTF-8?B?Sm9zw6kgZGEgU2lsdmE=?=\r\n\t<jose@example.test>",  # Gmail, B encoding
        "=?utf-8?Q?Silva=2C_Jos=C3=A9?=\r\n <jose@example.test>",  # Outlook's "Silva, José"
        '"Silva, José" <jose@example.test>',
    ],
)
def test_folded_and_encoded_from_headers_give_the_address(header):
    assert sender_address(header) == "jose@example.test"


def test_a_from_header_too_long_to_be_real_is_refused_before_parsing():
    with pytest.raises(AuthError, match="characters"):
        sender_address("a" + "." * 20_000 + "@evil.test")


def test_a_token_of_another_sender_costs_no_slow_hash(store, monkeypatch):
    """Same time as an unknown token: not even timing tells that it exists."""
    _, token = store.add("ana", senders=[ANA])

    def no_scrypt(*_a):
        raise AssertionError("scrypt was run for a sender the token is not bound to")

    monkeypatch.setattr("dispatcher.auth._verify", no_scrypt)
    assert code(store, token, "bob@example.test") == "not-bound"


@pytest.mark.parametrize(
    ("raw_from", "address"),
    [
        ("Ana Conceição <ana@example.test>".encode(), "ana@example.test"),  # RFC 6532 raw UTF-8 name
        (b"Ana \xff\xfe <ana@example.test>", "ana@example.test"),  # not UTF-8: the name is U+FFFD
        ("Ana <anã@example.test>".encode(), None),  # a non-ASCII address is still refused
        (b"<ana\xff@example.test>", None),
    ],
)
def test_a_raw_8bit_display_name_is_read_as_utf8_not_dropped(raw_from, address):
    """Gmail and Outlook send `From: Ana Conceição <...>` as raw UTF-8 when the server says
    SMTPUTF8; it used to be dropped as 'malformed From' with no reply. The address part stays
    as strict as before."""
    import email.policy
    from email.parser import BytesHeaderParser

    from dispatcher import mail
    from dispatcher.auth import sender_address

    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(b"From: " + raw_from + b"\r\n\r\n")
    incoming = mail.incoming_from_headers("1", headers)
    if address is None:
        with pytest.raises(AuthError):
            sender_address(incoming.from_header)
    else:
        assert sender_address(incoming.from_header) == address
