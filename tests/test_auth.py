"""Both authentication layers: sender whitelist and hashed tokens."""

from __future__ import annotations

import json
import os
import time

import pytest

from dispatcher.auth import SenderWhitelist, TokenStore, authenticate, may_run, sender_address, weak_token
from dispatcher.errors import AuthError


@pytest.fixture
def store(tmp_path):
    return TokenStore(tmp_path / "tokens.json")


def test_added_token_is_stored_only_as_a_hash(store):
    entry, token = store.add("ops team")
    raw = store.path.read_text()
    assert len(token) == 8 and token not in raw and token.lower() not in raw
    assert entry.hash.startswith("scrypt$")
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert store.match(token).id == entry.id
    assert store.match(token.lower()).id == entry.id


def test_wrong_disabled_or_malformed_tokens_do_not_match(store):
    entry, token = store.add("ops")
    other = "%08X" % ((int(token, 16) + 1) % 2**32)
    assert store.match(other) is None
    assert store.match("xyz") is None and store.match("") is None
    store.set_enabled(entry.id, False)
    assert store.match(token) is None


def test_token_scope_limits_commands(store):
    entry, token = store.add("recordings only", commands=["RAMAIS"])
    ident = authenticate("a@example.test", token, SenderWhitelist(["a@example.test"]), store)
    assert may_run(ident, store, "RAMAIS", admin_only=False)
    assert not may_run(ident, store, "CHECKIP", admin_only=False)
    assert may_run(ident, store, "HELP", admin_only=False)
    assert not may_run(ident, store, "RAMAIS", admin_only=True)


def test_legacy_import_hashes_and_disables_guessable_tokens(store, tmp_path):
    legacy = tmp_path / "legacy.json"
    legacy.write_text(
        json.dumps(
            [
                {"token": "A1B2C3D4", "description": "ops", "enabled": True},
                {"token": "12345678", "description": "old", "enabled": True},
                {"token": "DEADBEEF", "description": "dev", "enabled": True},
                {"token": "9F8E7D6C", "description": "gone", "enabled": False},
                {"token": "nothex!!", "description": "broken", "enabled": True},
            ]
        )
    )
    notes = store.import_legacy(legacy)
    assert "A1B2C3D4" not in store.path.read_text()
    assert store.match("A1B2C3D4") is not None
    assert store.match("12345678") is None and store.match("DEADBEEF") is None
    assert store.match("9F8E7D6C") is None
    assert any("malformed" in n for n in notes)
    assert sum("DISABLED" in n for n in notes) == 2


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


@pytest.mark.parametrize("header", ["", "a@example.test, b@example.test", "not an address", "<>"])
def test_from_header_with_none_or_several_addresses_is_refused(header):
    with pytest.raises(AuthError) as info:
        sender_address(header)
    assert info.value.reason == "sender"


def test_authenticate_checks_sender_before_token(store):
    _, token = store.add("ops")
    wl = SenderWhitelist(["ok@example.test"])
    with pytest.raises(AuthError) as info:
        authenticate("Eve <eve@example.test>", token, wl, store)
    assert info.value.reason == "sender"
    with pytest.raises(AuthError) as info:
        authenticate("OK <OK@example.test>", None, wl, store)
    assert info.value.reason == "token"
    assert authenticate("OK <OK@example.test>", token, wl, store).sender == "ok@example.test"


def test_an_encoded_word_cannot_smuggle_a_whitelisted_address():
    header = "=?utf-8?q?ana=40example=2Etest_=28?=<eve@evil.test>=?utf-8?q?=29?="
    with pytest.raises(AuthError):
        assert sender_address(header) != "ana@example.test"
    assert sender_address("=?UTF-8?Q?Jos=C3=A9?= <Jose@Example.test>") == "jose@example.test"
    assert sender_address('"Silva, Ana" <ana@example.test>') == "ana@example.test"
