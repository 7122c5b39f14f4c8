"""The command grammar: pure functions, text in, typed values or a GrammarError out.

Nothing here knows about mail, Ansible or the queue. The per-command rules
(which keywords, what they mean) live with each command in
dispatcher/commands/; this module holds what they share: subject
normalisation, token extraction, KEY=value splitting and field validators.

Every error message is for the requester, in Brazilian Portuguese.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime

from dispatcher.errors import GrammarError

MAX_SUBJECT_CHARS = 512
DATE_FORMAT = "%d/%m/%Y %H:%M"
DATE_HUMAN = "DD/MM/AAAA HH:MM"
# Years a date may name: a request for recordings before 2000 or after 2099 is a typo
# (0001, 2205). playbooks/audios.yml accepts 1980-2099 (what a ZIP entry can date) and the
# recordings module any year its Python can format, so what passes here passes there.
YEAR_MIN, YEAR_MAX = 2000, 2099

# Reply/forward prefixes mail clients put before the token (pt-BR and English).
_PREFIX = re.compile(r"^\s*(?:re|res|fw|fwd|enc|tr)\s*:\s*", re.IGNORECASE | re.ASCII)
_BRACKET = re.compile(r"^\[[^\]]{0,64}\]\s*")
# What a command may contain after the token. Anything else (shell or template
# metacharacters, quotes, non-ASCII digits...) is refused before parsing.
_ALLOWED = re.compile(r"[A-Za-z0-9 =,:/._\-]*", re.ASCII)
_KEYWORD = re.compile(r"([A-Za-z]+)[ ]*=[ ]*", re.ASCII)
_EXTENSION = re.compile(r"[0-9]{2,8}", re.ASCII)
_MAC_SEPARATED = re.compile(r"[0-9A-Fa-f]{2}([:\-]?)(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}", re.ASCII)
_DATE = re.compile(r"([0-9]{2})/([0-9]{2})/([0-9]{4}) ([0-9]{2}):([0-9]{2})", re.ASCII)
_REQUEST_ID = re.compile(r"[0-9]{8}_[0-9]{6}_[0-9]{6}_[0-9a-f]{2}", re.ASCII)
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,62}", re.ASCII)


@dataclass(frozen=True)
class HostFacts:
    """What the grammar needs to know of one inventory host."""

    name: str
    groups: frozenset[str] = frozenset()
    enabled: bool = True


@dataclass(frozen=True)
class ParseContext:
    """Inputs the grammar needs besides the text: hosts and limits."""

    hosts: dict[str, HostFacts] = field(default_factory=dict)
    max_window_days: int = 31


# ------------------------------------------------------------------ the subject


def normalise_subject(raw: str) -> str:
    """Unfold header lines, refuse control characters and absurd lengths."""
    if raw is None:
        raw = ""
    text = re.sub(r"\r?\n[ \t]+", " ", raw)
    if len(text) > MAX_SUBJECT_CHARS:
        raise GrammarError(f"O assunto tem {len(text)} caracteres; o máximo aceito é {MAX_SUBJECT_CHARS}.")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != "\t":
            raise GrammarError(
                f"O assunto contém um caractere de controle ({ch!r} U+{ord(ch):04X}), que não é aceito."
            )
    return text.replace("\t", " ").strip()


def strip_prefixes(text: str) -> str:
    """Remove any number of Re:/RES:/Fwd:/ENC:/TR: prefixes."""
    while True:
        match = _PREFIX.match(text)
        if not match:
            return text
        text = text[match.end() :]


MAX_TAGS = 3  # [EXTERNAL]-style tags a mail gateway may put before the token
TOKEN_MIN, TOKEN_MAX = 8, 32  # hex digits of a token: 8 (legacy) to 32; new ones have 16
TOKEN_FORMAT = "[SEU TOKEN]"  # noqa: S105 - how replies show where the token goes, never a value
_TOKEN = re.compile(rf"^\[[ ]*([0-9A-Fa-f]{{{TOKEN_MIN},{TOKEN_MAX}}})[ ]*\]\s*", re.ASCII)


@dataclass(frozen=True)
class TokenSplit:
    """Where the token of a subject stands: `token` (8-32 hex, upper-cased) or None with
    `problem` 'missing' or 'malformed'; `text` is the command after it."""

    token: str | None
    text: str
    problem: str = ""

    @property
    def hint(self) -> str:
        """For the requester (pt-BR): what was wrong with the token, never what it was."""
        if self.problem == "malformed":
            return (
                f"o token informado não está no formato {TOKEN_FORMAT}: de {TOKEN_MIN} a {TOKEN_MAX} "
                "dígitos hexadecimais (0-9, A-F) entre colchetes, no início do assunto"
            )
        if self.problem == "missing":
            return f"token ausente: o assunto deve começar com {TOKEN_FORMAT}"
        return ""


def _after_tags(text: str) -> TokenSplit:
    malformed = False
    for _ in range(MAX_TAGS + 1):
        match = _TOKEN.match(text)
        if match:
            return TokenSplit(match.group(1).upper(), text[match.end() :].strip())
        bracket = _BRACKET.match(text)
        if not bracket:
            break
        malformed = malformed or not _tag(bracket.group(0).strip()[1:-1])
        text = text[bracket.end() :]
    text = text.strip()
    first = text.split(" ", 1)[0]
    if not malformed and _tokenish_word(first):
        malformed = True  # 'A1B2C3D4 CHECKIP=...': a token without its brackets
        text = text[len(first) :].strip()
    return TokenSplit(None, text, "malformed" if malformed else "missing")


def find_token(raw_subject: str) -> TokenSplit:
    """The token and the command text of a subject. The token is never kept elsewhere.

    Tags a gateway adds before it ([EXTERNAL]) are skipped; a bracket that is not
    8 to 32 hex digits is not a token (`problem` says whether one was attempted).
    """
    return _after_tags(strip_prefixes(normalise_subject(raw_subject)))


def split_token(raw_subject: str) -> tuple[str | None, str]:
    """(token or None, command text): `find_token` without the diagnosis."""
    found = find_token(raw_subject)
    return found.token, found.text


def lenient_token(raw_subject: str) -> TokenSplit:
    """The token of a subject too malformed to parse (so its sender still gets an answer)."""
    text = strip_prefixes(re.sub(r"[\x00-\x1f\x7f]", " ", (raw_subject or "")[: MAX_SUBJECT_CHARS * 4]))
    return _after_tags(text)


# ------------------------------------------------------------- confirmation codes

CONFIRM_WORD = "CONFIRMAR"
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
CODE_CHARS = 8  # 40 bits
_CONFIRM = re.compile(rf"\b{CONFIRM_WORD}[ :]+([0-9A-Za-z\-]{{{CODE_CHARS},{CODE_CHARS + 3}}})\b", re.ASCII)
_CONFIRM_ANY = re.compile(rf"(\b{CONFIRM_WORD}[ :]+)\S+", re.IGNORECASE | re.ASCII)


def normalise_code(text: str) -> str:
    """What Crockford base32 accepts as the same code: any case, hyphens, I/L read as 1,
    O as 0. '' when it is not a code."""
    text = text.upper().replace("-", "").translate(str.maketrans("ILO", "110"))
    if len(text) != CODE_CHARS or any(ch not in CODE_ALPHABET for ch in text):
        return ""
    return text


def find_confirmation(subject: str) -> str | None:
    """The code of a 'CONFIRMAR <code>' anywhere in a subject (a plain reply to our
    confirmation request carries it), normalised; '' for a malformed one; None when
    the subject does not confirm anything."""
    match = _CONFIRM.search(unicodedata.normalize("NFKC", subject or "").upper())
    if match:
        return normalise_code(match.group(1))
    return "" if CONFIRM_WORD in (subject or "").upper() else None


MASK = "********"
# Any run of 8 or more hex digits, whatever surrounds it (a token glued to a word, cut by
# an underscore...). Only what must stay readable is protected, explicitly.
_HEX_RUN = re.compile(rf"[0-9A-Fa-f]{{{TOKEN_MIN},}}")
_KEEP = re.compile(
    r"(?<![0-9A-Za-z])[0-9]{8}_[0-9]{6}_[0-9]{6}_[0-9a-f]{2}(?![0-9A-Za-z])"  # request ids
    r"|\b(?:MACATUAL|MACFUTURO)[ ]*=[ ]*[0-9A-Fa-f:\-]{12,17}(?![0-9A-Za-z])"  # MACs
    r"|\bRAMAIS[ ]*=[ ]*[0-9, ]+",  # extension lists
    re.IGNORECASE | re.ASCII,
)


def mask_text(text: str, token: str | None = None) -> str:
    """Free text that may quote what a requester typed (an error message): the token
    wherever it appears, and every run of 8+ hex digits, replaced by ********."""
    if token:
        text = re.sub(re.escape(token), MASK, text, flags=re.IGNORECASE)
    out, pos = [], 0
    for keep in _KEEP.finditer(text):
        out.append(_HEX_RUN.sub(MASK, text[pos : keep.start()]))
        out.append(keep.group(0))
        pos = keep.end()
    out.append(_HEX_RUN.sub(MASK, text[pos:]))
    return "".join(out)


def _tokenish_word(word: str) -> bool:
    """An unbracketed word that looks like a token: 6+ characters with a digit, no '='
    ('A1B2C3D4 CHECKIP=...', '(A1B2C3D4)', 'A1B2-C3D4-E5F6-0718')."""
    bare = word.strip("()<>{}[]")
    return "=" not in word and len(bare) >= 6 and any(ch.isdigit() for ch in bare)


def _tag(inner: str) -> bool:
    """A gateway tag ([EXTERNAL], [SPAM?]): no digit, and not only hex letters."""
    return not any(ch.isdigit() for ch in inner) and not re.fullmatch(r"[ A-Fa-f]*", inner)


def _mask_leading(text: str) -> str:
    """Whatever stands in the token's place: every leading bracket but a gateway tag, and
    a first word that looks like a token (a digit in it), even when it is not valid hex."""
    head = []
    for _ in range(MAX_TAGS + 1):
        bracket = _BRACKET.match(text)
        if not bracket:
            break
        inner = bracket.group(0).strip()[1:-1]
        head.append(f"[{inner}]" if _tag(inner) else f"[{MASK}]")
        text = text[bracket.end() :]
    first = text.split(" ", 1)[0]
    if _tokenish_word(first):
        text = MASK + text[len(first) :]
    return " ".join([*head, text]).strip()


def mask_subject(raw_subject: str, token: str | None = None) -> str:
    """The subject as it can be quoted back (replies, alerts, logs): whatever stands in
    the token's place, every run of 8+ hex digits, and the token wherever it appears,
    replaced by ********. A subject too malformed to parse loses its control characters
    (so a token cut by one is whole again) and is masked before it is shortened."""
    try:
        text = strip_prefixes(normalise_subject(raw_subject))
        cut = False
    except GrammarError:
        text = strip_prefixes(
            re.sub(
                r"[\x00-\x1f\x7f\u0080-\u009f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]",
                "",
                raw_subject or "",
            )
        )
        cut = True
    # The token where it stands (when the caller did not pass it): masked wherever else it
    # appears too, even in a place kept in clear (a 16-digit token typed as MACATUAL).
    token = token or _after_tags(text).token
    masked = mask_text(_mask_leading(_CONFIRM_ANY.sub(rf"\g<1>{MASK}", text)), token).strip()
    if cut and len(masked) > MAX_SUBJECT_CHARS:
        masked = masked[:MAX_SUBJECT_CHARS] + "…"
    return masked


mask_token = mask_subject  # the name earlier versions used


# ------------------------------------------------------------- KEY=value pairs


def check_charset(text: str, example: str = "", extra: str = "") -> None:
    """Only letters, digits, space and = , : / . - _ (plus `extra`, e.g. '@+' for addresses)."""
    allowed = _ALLOWED if not extra else re.compile(rf"[A-Za-z0-9 =,:/._\-{re.escape(extra)}]*", re.ASCII)
    if allowed.fullmatch(text):
        return
    bad = next(ch for ch in text if not allowed.fullmatch(ch))
    shown = bad if bad.isprintable() and bad != " " else f"U+{ord(bad):04X}"
    raise GrammarError(
        f"O comando contém o caractere “{shown}”, que não faz parte da sintaxe. "
        f"Use só letras, dígitos, espaço e = , : / . - _{' ' + ' '.join(extra) if extra else ''}",
        example,
    )


def split_keywords(text: str, example: str = "") -> list[tuple[str, str]]:
    """'A=1 B=x y' -> [('A', '1'), ('B', 'x y')]: keywords upper-cased, values stripped.

    Text before the first keyword is an error; a value may be empty.
    """
    text = re.sub(r" {2,}", " ", text.strip())
    matches = list(_KEYWORD.finditer(text))
    if not matches or matches[0].start() != 0:
        first = text.split(" ", 1)[0] if text else ""
        raise GrammarError(f"Comando não reconhecido: “{first[:40]}”.", example)
    pairs = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        pairs.append((m.group(1).upper(), text[m.end() : end].strip()))
    return pairs


def keyword_map(
    pairs: list[tuple[str, str]],
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    example: str = "",
    command: str | None = None,
) -> dict[str, str]:
    seen: dict[str, str] = {}
    allowed = set(required) | set(optional)
    for key, value in pairs:
        if key not in allowed:
            raise GrammarError(
                f"Palavra-chave desconhecida: {key}. Aceitas: {', '.join(required + optional)}.",
                example,
                command,
            )
        if key in seen:
            raise GrammarError(f"A palavra-chave {key} aparece mais de uma vez.", example, command)
        seen[key] = value
    missing = [k for k in required if k not in seen]
    if missing:
        raise GrammarError(f"Falta {', '.join(missing)}.", example, command)
    return seen


# ------------------------------------------------------------------ validators


def parse_extensions(
    value: str, example: str = "", command: str | None = None, limit: int | None = None
) -> tuple[str, ...]:
    """'1121,1122' -> ('1121', '1122'): 2-8 ASCII digits each, no duplicates, at most `limit`."""
    parts = [p.strip() for p in value.split(",")]
    if not value or any(not p for p in parts):
        raise GrammarError(
            "RAMAIS deve ser uma lista de ramais separados por vírgula, ex.: 1121,1122.",
            example,
            command,
        )
    for p in parts:
        if not _EXTENSION.fullmatch(p):
            raise GrammarError(
                f"Ramal inválido: “{p[:20]}”. Um ramal tem de 2 a 8 dígitos.", example, command
            )
    dupes = sorted({p for p in parts if parts.count(p) > 1})
    if dupes:
        raise GrammarError(f"Ramal repetido: {', '.join(dupes)}.", example, command)
    if limit is not None and len(parts) > limit:
        raise GrammarError(
            f"Foram pedidos {len(parts)} ramais; o máximo por pedido é {limit}. "
            "Divida-os em pedidos menores.",
            example,
            command,
        )
    return tuple(parts)


def parse_datetime(value: str, name: str, example: str = "", command: str | None = None) -> datetime:
    match = _DATE.fullmatch(value)
    if not match:
        raise GrammarError(
            f"{name} deve estar no formato {DATE_HUMAN} (recebido: “{value[:30]}”).",
            example,
            command,
        )
    year = int(match.group(3))
    if not YEAR_MIN <= year <= YEAR_MAX:
        raise GrammarError(
            f"{name} tem o ano {match.group(3)}; o ano deve estar entre {YEAR_MIN} e {YEAR_MAX} "
            f"(formato {DATE_HUMAN}).",
            example,
            command,
        )
    try:
        return datetime.strptime(value, DATE_FORMAT)
    except ValueError:
        raise GrammarError(f"{name} não é uma data válida: “{value}”.", example, command) from None


def parse_window(
    start_text: str, end_text: str, max_days: int, example: str = "", command: str | None = None
) -> tuple[datetime, datetime]:
    """Both minutes inclusive: INICIO equal to FIM is the one minute they name."""
    start = parse_datetime(start_text, "INICIO", example, command)
    end = parse_datetime(end_text, "FIM", example, command)
    if start > end:
        raise GrammarError(
            "INICIO não pode ser depois de FIM (os dois minutos entram no período; "
            "INICIO igual a FIM pede um minuto só).",
            example,
            command,
        )
    if (end - start).total_seconds() > max_days * 86400:
        raise GrammarError(
            f"O período pedido passa de {max_days} dias; divida-o em pedidos menores.",
            example,
            command,
        )
    return start, end


# Addresses that are never a remote caller to unban (same rule as the playbook's own
# check, the athome.voip collection's plugins/filter/fail2ban_whitelist.py): IPv4-mapped IPv6 counts as IPv4.
_SPECIAL_IP = (
    ("is_unspecified", "não especificado"),
    ("is_loopback", "loopback"),
    ("is_multicast", "multicast"),
    ("is_link_local", "link-local"),
    ("is_reserved", "reservado"),
)


def parse_ip(value: str, example: str = "", command: str | None = None) -> str:
    """One IPv4/IPv6 host address (compressed form); not a network, not special-use."""
    if "/" in value:
        raise GrammarError(f"Informe um único endereço IP, não uma rede (“{value[:45]}”).", example, command)
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise GrammarError(f"Endereço IP inválido: “{value[:45]}”.", example, command) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, what in _SPECIAL_IP:
        if getattr(ip, attr):
            raise GrammarError(
                f"O endereço {ip} não pode ser liberado: é um endereço {what}.", example, command
            )
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise GrammarError(
            f"O endereço {ip} não pode ser liberado: é o endereço de broadcast.", example, command
        )
    return ip.compressed


def parse_mac(value: str, name: str, example: str = "", command: str | None = None) -> str:
    """A MAC with or without ':'/'-' separators, any case -> 12 upper-case hex; '' stays ''."""
    if value == "":
        return ""
    if not _MAC_SEPARATED.fullmatch(value):
        raise GrammarError(
            f"{name} inválido: “{value[:30]}”. Use 12 dígitos hexadecimais, ex.: 010203040506.",
            example,
            command,
        )
    return re.sub(r"[:\-]", "", value).upper()


def parse_host(
    value: str, ctx: ParseContext, group: str, example: str = "", command: str | None = None
) -> str:
    """An enabled inventory host of `group` (case-insensitive)."""
    if not _HOSTNAME.fullmatch(value or ""):
        raise GrammarError(f"SERVER inválido: “{value[:30]}”.", example, command)
    by_lower = {name.lower(): facts for name, facts in ctx.hosts.items()}
    facts = by_lower.get(value.lower())
    valid = sorted(h.name for h in ctx.hosts.values() if group in h.groups and h.enabled)
    if facts is None or group not in facts.groups:
        raise GrammarError(
            f"SERVER={value} não é um servidor aceito para este comando. "
            f"Servidores aceitos: {', '.join(valid) or 'nenhum'}.",
            example,
            command,
        )
    if not facts.enabled:
        raise GrammarError(
            f"O servidor {facts.name} está desativado e não recebe comandos. "
            f"Servidores aceitos: {', '.join(valid) or 'nenhum'}.",
            example,
            command,
        )
    return facts.name


def parse_request_id(value: str, example: str = "") -> str:
    if not _REQUEST_ID.fullmatch(value):
        raise GrammarError(f"Identificador de pedido inválido: “{value[:40]}”.", example, "STATUS")
    return value
