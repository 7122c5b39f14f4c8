"""The command grammar: a table of valid and invalid subjects, hostile input, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher import commands, grammar
from dispatcher.errors import GrammarError

HOSTS = {
    "gv1p": grammar.HostFacts("gv1p", frozenset({"sip_servers", "fail2ban_servers", "mac_servers"})),
    "gv2p": grammar.HostFacts("gv2p", frozenset({"sip_servers", "fail2ban_servers", "mac_servers"})),
    "voip1": grammar.HostFacts("voip1", frozenset({"sip_servers", "fail2ban_servers"})),
    "voip3": grammar.HostFacts("voip3", frozenset({"sip_servers"}), enabled=False),
    "audio": grammar.HostFacts("audio", frozenset({"recordings"})),
}
CTX = grammar.ParseContext(hosts=HOSTS, max_window_days=31)


def parse_subject(subject: str):
    token, text = grammar.split_token(subject)
    return token, commands.parse(text, CTX)


VALID = [
    ("[A1B2C3D4] CHECKIP=3.3.3.3", "CHECKIP", {"ip": "3.3.3.3"}),
    ("Re: RES: Fwd: [a1b2c3d4] checkip = 3.3.3.3", "CHECKIP", {"ip": "3.3.3.3"}),
    ("ENC: TR:[A1B2C3D4]   CHECKIP=2001:DB8::1", "CHECKIP", {"ip": "2001:db8::1"}),
    (
        "[A1B2C3D4] MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p",
        "MACCHANGE",
        {
            "extension": "3010",
            "mac_current": "010203040506",
            "mac_new": "010203040599",
            "server": "gv2p",
            "operation": "replace",
        },
    ),
    (
        "[A1B2C3D4] macchange=3010 macatual=01:02:03:04:05:99 MACFUTURO= server=GV2P",
        "MACCHANGE",
        {
            "extension": "3010",
            "mac_current": "010203040599",
            "mac_new": "",
            "server": "gv2p",
            "operation": "remove",
        },
    ),
    (
        "[A1B2C3D4] MACCHANGE=3010 MACFUTURO=01-02-03-04-05-88 SERVER=gv1p",
        "MACCHANGE",
        {
            "extension": "3010",
            "mac_current": "",
            "mac_new": "010203040588",
            "server": "gv1p",
            "operation": "add",
        },
    ),
    (
        "[A1B2C3D4] RAMAIS=1121,1122 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59",
        "RAMAIS",
        {
            "extensions": ["1121", "1122"],
            "server": "voip1",
            "start": "2025-11-01 00:00",
            "end": "2025-11-05 23:59",
        },
    ),
    (
        "[A1B2C3D4] RAMAIS=1013010 SERVER=gv1p INICIO=31/12/2025 23:00 FIM=01/01/2026 01:00",
        "RAMAIS",
        {"extensions": ["1013010"], "server": "gv1p", "start": "2025-12-31 23:00", "end": "2026-01-01 01:00"},
    ),
    (
        "[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 12:00",
        "RAMAIS",
        {"extensions": ["1121"], "server": "voip1", "start": "2025-11-04 12:00", "end": "2025-11-04 12:00"},
    ),
    (
        "[A1B2C3D4] RAMAIS=" + ",".join(str(1000 + i) for i in range(50)) + " SERVER=voip1 "
        "INICIO=01/01/2000 00:00 FIM=01/01/2000 00:59",
        "RAMAIS",
        {
            "extensions": [str(1000 + i) for i in range(50)],
            "server": "voip1",
            "start": "2000-01-01 00:00",
            "end": "2000-01-01 00:59",
        },
    ),
    ("[A1B2C3D4] HELP", "HELP", {}),
    ("[A1B2C3D4] ajuda", "HELP", {}),
    ("[A1B2C3D4] STATUS 20251111_171215_482913_a1", "STATUS", {"request_id": "20251111_171215_482913_a1"}),
]


@pytest.mark.parametrize(("subject", "name", "params"), VALID)
def test_valid_subjects_parse_to_typed_commands(subject, name, params):
    token, cmd = parse_subject(subject)
    assert token == "A1B2C3D4"
    assert cmd.name == name
    assert cmd.params == params


INVALID = [
    ("[A1B2C3D4] CHECKIP=3.3.3.3;id", "caractere “;”"),
    ("[A1B2C3D4] CHECKIP=$(reboot)", "caractere “$”"),
    ("[A1B2C3D4] CHECKIP=3.3.3.3 `id`", "caractere “`”"),
    ("[A1B2C3D4] CHECKIP={{ lookup('pipe','id') }}", "caractere “{”"),
    ("[A1B2C3D4] CHECKIP=0.0.0.0/0", "não uma rede"),
    ("[A1B2C3D4] CHECKIP=127.0.0.1", "loopback"),
    ("[A1B2C3D4] CHECKIP=0.0.0.0", "não especificado"),
    ("[A1B2C3D4] CHECKIP=::", "não especificado"),
    ("[A1B2C3D4] CHECKIP=224.0.0.1", "multicast"),
    ("[A1B2C3D4] CHECKIP=999.1.1.1", "IP inválido"),
    ("[A1B2C3D4] CHECKIP=169.254.1.1", "link-local"),
    ("[A1B2C3D4] CHECKIP=240.0.0.1", "reservado"),
    ("[A1B2C3D4] CHECKIP=255.255.255.255", "não pode ser liberado"),
    ("[A1B2C3D4] CHECKIP=::ffff:127.0.0.1", "loopback"),
    ("[A1B2C3D4] CHECKIP=fe80::1", "link-local"),
    ("[A1B2C3D4] CHECKIP=3.3.3.3 CHECKIP=4.4.4.4", "mais de uma vez"),
    ("[A1B2C3D4] CHECKIP=3.3.3.3 SERVER=gv1p", "desconhecida: SERVER"),
    ("[A1B2C3D4] CHECKIP=", "IP inválido"),
    ("[A1B2C3D4] DELETEALL=1", "Comando desconhecido"),
    ("[A1B2C3D4] please unban 3.3.3.3", "Comando desconhecido"),
    ("[A1B2C3D4]", "nenhum comando"),
    ("[A1B2C3D4] RAMAIS=1121,1121 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "repetido"),
    ("[A1B2C3D4] RAMAIS=1 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "de 2 a 8"),
    ("[A1B2C3D4] RAMAIS=123456789 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "de 2 a 8"),
    ("[A1B2C3D4] RAMAIS=1121,,1122 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "vírgula"),
    ("[A1B2C3D4] RAMAIS=١١٢١ SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "caractere"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip3 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59", "desativado"),
    (
        "[A1B2C3D4] RAMAIS=1121 SERVER=nohost INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59",
        "não é um servidor",
    ),
    (
        "[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=31/02/2025 00:00 FIM=05/03/2025 23:59",
        "não é uma data válida",
    ),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=2025-11-01 00:00 FIM=05/11/2025 23:59", "formato"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=05/11/2025 00:00 FIM=01/11/2025 23:59", "depois de FIM"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 12:01 FIM=04/11/2025 12:00", "depois de FIM"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=01/11/0001 00:00 FIM=05/11/2025 23:59", "entre 2000 e 2099"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2205 23:59", "ano 2205"),
    (
        "[A1B2C3D4] RAMAIS=" + ",".join(str(1000 + i) for i in range(51)) + " SERVER=voip1 "
        "INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59",
        "o máximo por pedido é 50",
    ),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=01/01/2025 00:00 FIM=05/11/2025 23:59", "31 dias"),
    ("[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=01/11/2025 00:00", "Falta FIM"),
    ("[A1B2C3D4] MACCHANGE=3010 SERVER=gv2p", "Informe MACATUAL"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL= MACFUTURO= SERVER=gv2p", "Informe MACATUAL"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL=0102030405 SERVER=gv2p", "MACATUAL inválido"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL=01:02-03:04:05:06 SERVER=gv2p", "MACATUAL inválido"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL=ZZ0203040506 SERVER=gv2p", "MACATUAL inválido"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040506 SERVER=gv2p", "iguais"),
    ("[A1B2C3D4] MACCHANGE=3010 MACATUAL=010203040506 SERVER=voip1", "não é um servidor"),
    ("[A1B2C3D4] MACCHANGE=3010,3011 MACATUAL=010203040506 SERVER=gv1p", "único ramal"),
    ("[A1B2C3D4] HELP me", "HELP não recebe"),
    ("[A1B2C3D4] STATUS", "exatamente um"),
    ("[A1B2C3D4] STATUS ../../etc/passwd", "inválido"),
    ("[A1B2C3D4] STATUS 2025", "inválido"),
]


@pytest.mark.parametrize(("subject", "fragment"), INVALID)
def test_invalid_subjects_are_refused_with_the_reason_and_an_example(subject, fragment):
    with pytest.raises(GrammarError) as info:
        parse_subject(subject)
    assert fragment in info.value.message
    assert info.value.example, "every rejection shows a correct example"


@pytest.mark.parametrize(
    "subject",
    [
        "CHECKIP=3.3.3.3",
        "[A1B2C3D] CHECKIP=3.3.3.3",
        "[A1B2C3D4G] CHECKIP=3.3.3.3",
        "[] CHECKIP=3.3.3.3",
        "CHECKIP=3.3.3.3 [A1B2C3D4]",
    ],
)
def test_missing_or_malformed_token_yields_no_token(subject):
    token, _text = grammar.split_token(subject)
    assert token is None


def test_newline_and_control_characters_are_refused():
    with pytest.raises(GrammarError, match="controle"):
        grammar.split_token("[A1B2C3D4] CHECKIP=3.3.3.3\n; rm -rf /")
    with pytest.raises(GrammarError, match="controle"):
        grammar.split_token("[A1B2C3D4] CHECKIP=3.3.3.3\x00")


def test_folded_header_lines_are_unfolded():
    token, cmd = parse_subject(
        "[A1B2C3D4] RAMAIS=1121\r\n SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59"
    )
    assert cmd.params["server"] == "voip1"


def test_ten_thousand_character_subject_is_refused_quickly():
    with pytest.raises(GrammarError, match="máximo"):
        grammar.split_token("[A1B2C3D4] CHECKIP=" + "9" * 10_000)


def test_masked_subject_never_shows_the_token():
    assert grammar.mask_subject("Re: [A1B2C3D4] CHECKIP=1.2.3.4") == "[********] CHECKIP=1.2.3.4"
    assert "A1B2C3D4" not in grammar.mask_subject("[A1B2C3D4]\n CHECKIP=1.2.3.4")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_no_input_crashes_the_parser(text):
    try:
        token, rest = grammar.split_token(text)
        commands.parse(rest, CTX)
    except GrammarError as exc:
        assert exc.message


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFHIKLMNOPRSTUVX=0123456789,:/ .-_", max_size=120))
def test_keyword_shaped_noise_never_crashes(text):
    try:
        commands.parse(text, CTX)
    except GrammarError as exc:
        assert exc.message


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses())
def test_every_accepted_ip_is_a_single_public_or_private_host(ip):
    mapped = getattr(ip, "ipv4_mapped", None) or ip
    special = any(
        getattr(mapped, a)
        for a in ("is_loopback", "is_unspecified", "is_multicast", "is_link_local", "is_reserved")
    )
    special = special or str(mapped) == "255.255.255.255"
    try:
        value = grammar.parse_ip(str(ip))
    except GrammarError:
        assert special
    else:
        assert not special and value == mapped.compressed


def test_gateway_tags_before_the_token_are_skipped():
    token, text = grammar.split_token("RES: [EXTERNAL] [SPAM?] [a1b2c3d4] CHECKIP=3.3.3.3")
    assert token == "A1B2C3D4" and text == "CHECKIP=3.3.3.3"


@pytest.mark.parametrize(
    "subject",
    [
        "Re: [A1B2C3D4] CHECKIP=" + "1" * 600,
        "Re: [A1B2C3D4] CHECKIP=3.3.3.3\u200b",
        "[EXTERNAL] [A1B2C3D4] CHECKIP=3.3.3.3",
        "Re: [A1B2C3D4] CHECKIP=3.3.3.3 a1b2c3d4",
    ],
)
def test_the_token_is_masked_wherever_it_appears(subject):
    token = grammar.lenient_token(subject).token
    assert token == "A1B2C3D4"
    masked = grammar.mask_subject(subject, token)
    assert "A1B2C3D4" not in masked.upper()


@pytest.mark.parametrize(
    ("subject", "token", "problem", "text"),
    [
        ("[A1B2C3D4] CHECKIP=3.3.3.3", "A1B2C3D4", "", "CHECKIP=3.3.3.3"),
        ("[a1b2c3d4e5f60718] HELP", "A1B2C3D4E5F60718", "", "HELP"),
        ("[" + "ab" * 16 + "] HELP", "AB" * 16, "", "HELP"),
        ("[ A1B2C3D4 ] HELP", "A1B2C3D4", "", "HELP"),
        ("CHECKIP=3.3.3.3", None, "missing", "CHECKIP=3.3.3.3"),
        ("[EXTERNAL] HELP", None, "missing", "HELP"),
        ("[A1B2C3DX] CHECKIP=3.3.3.3", None, "malformed", "CHECKIP=3.3.3.3"),
        ("[A1B2C3D] CHECKIP=3.3.3.3", None, "malformed", "CHECKIP=3.3.3.3"),
        ("[" + "ab" * 17 + "] HELP", None, "malformed", "HELP"),
        ("A1B2C3D4 CHECKIP=3.3.3.3", None, "malformed", "CHECKIP=3.3.3.3"),
        ("(A1B2C3D4) CHECKIP=3.3.3.3", None, "malformed", "CHECKIP=3.3.3.3"),
    ],
)
def test_the_token_slot_says_missing_or_malformed(subject, token, problem, text):
    found = grammar.find_token(subject)
    assert (found.token, found.problem, found.text) == (token, problem, text)
    assert found.hint.startswith(
        {"": "", "missing": "token ausente", "malformed": "o token informado"}[problem]
    )


@pytest.mark.parametrize(
    ("subject", "secret"),
    [
        ("A1B2C3D4 CHECKIP=3.3.3.3", "A1B2C3D4"),
        ("[ A1B2C3D4 ] CHECKIP=3.3.3.3", "A1B2C3D4"),
        ("(A1B2C3D4) CHECKIP=3.3.3.3", "A1B2C3D4"),
        ("[A1B2C3DX] CHECKIP=3.3.3.3", "A1B2C3D"),
        ("Fwd: [EXTERNAL] [a1b2c3d4e5f60718] CHECKIP=3.3.3.3", "A1B2C3D4E5F60718"),
        ("CHECKIP=3.3.3.3 token A1B2C3D4E5F6", "A1B2C3D4E5F6"),
        ("[A1B2C3D4] CHECKIP=3.3.3.3\n; x", "A1B2C3D4"),  # unparsable: still masked
        # glued, split, or cut tokens (an independent review's list)
        ("[A1B2C3D4E5F60718_] CHECKIP=3.3.3.3", "A1B2C3D4E5F60718"),
        ("A1B2C3D4E5F60718CHECKIP=3.3.3.3", "A1B2C3D4E5F6071"),
        ("[A1B2-C3D4-E5F6-0718] HELP", "E5F6-0718"),
        ("[A1B2 C3D4 E5F6 0718] HELP", "E5F6 0718"),
        ("A1B2-C3D4-E5F6-0718 HELP", "E5F6-0718"),
        ("[A1B2C3D4\u0415\u0035F60718] HELP", "A1B2C3D4"),  # a Cyrillic letter inside
        ("[A1B2C3D\x014E5F60718] HELP", "4E5F60718"),  # cut by a control character
        ("x" * 505 + " A1B2C3D4E5F60718", "A1B2C3D"),  # cut by the length limit
    ],
)
def test_whatever_stands_for_a_token_is_masked_in_echoes(subject, secret):
    assert secret not in grammar.mask_subject(subject).upper()


def test_error_messages_that_quote_the_input_are_masked_too():
    with pytest.raises(GrammarError) as info:
        commands.parse("CHECKIP=A1B2C3D4E5F60718", CTX)
    assert "A1B2C3D4E5F60718" in info.value.message, "the grammar quotes what it got"
    assert "A1B2C3D4E5F60718" not in grammar.mask_text(info.value.message)


def test_masking_keeps_macs_extensions_and_request_ids_readable():
    mac = "[A1B2C3D4] MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=01:02:03:04:05:99 SERVER=gv2p"
    assert grammar.mask_subject(mac) == mac.replace("[A1B2C3D4]", "[********]")
    status = "[A1B2C3D4] STATUS 20251111_171215_482913_a1"
    assert grammar.mask_subject(status) == "[********] STATUS 20251111_171215_482913_a1"
    ramais = "[A1B2C3D4] RAMAIS=10130100,1122 SERVER=voip1"
    assert grammar.mask_subject(ramais) == "[********] RAMAIS=10130100,1122 SERVER=voip1"
    assert grammar.mask_subject("[EXTERNAL] [A1B2C3D4] HELP") == "[EXTERNAL] [********] HELP"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789ABCDEFabcdef", min_size=8, max_size=32), st.text(max_size=80))
def test_no_hex_token_survives_masking_anywhere_in_a_subject(token, around):
    for subject in (f"[{token}] {around}", f"{around} {token}", f"{token} {around}"):
        assert token.upper() not in grammar.mask_subject(subject, token).upper()


def test_ramais_extravars_carry_the_arrival_time_for_the_legacy_queue():
    import time

    from dispatcher.commands.ramais import received_at

    subject = "[A1B2C3D4] RAMAIS=1121 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59"
    _t, cmd = parse_subject(subject)
    ev = commands.spec_for("RAMAIS").extravars(cmd, "20251111_180122_482913_a1", "ana@example.test")
    assert ev["received"] == received_at("20251111_180122_482913_a1")
    offset = time.localtime(1762884082).tm_gmtoff  # 2025-11-11 18:01:22 UTC
    assert ev["received"] == time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(1762884082 + offset))
    assert ev["extensions"] == ["1121"] and ev["requester"] == "ana@example.test"
