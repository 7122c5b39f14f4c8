"""Did the message really come from the domain in its From, and is it fresh? Pure functions.

The receiving mail server (Gmail: authserv-id `mx.google.com`) checks DKIM,
SPF and DMARC and prepends its verdicts as an `Authentication-Results` header
(RFC 8601). Only the topmost such header can be the receiver's own: anything
below it may have been written by the sender. So the topmost header is read,
with the maintained `authres` parser, and believed only when its authserv-id
is one the operator trusts. The sender is authenticated by

- `dmarc=pass` whose `header.from` is the From domain, or
- `dkim=pass` whose signing domain (`header.d`, else the domain of `header.i`)
  aligns with the From domain: the same domain, or the same organizational
  domain (relaxed alignment, RFC 7489 3.1.1), decided with the Public Suffix
  List snapshot shipped in the `publicsuffixlist` package (never fetched).

`spf=pass` alone is not enough: SPF authenticates the envelope sender, not From.

The only module that imports authres and publicsuffixlist.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import authres

MAX_HEADER_CHARS = 8192  # a receiver's verdicts fit in a few hundred characters


@dataclass(frozen=True)
class Verdict:
    """`ok`, and why (English, for logs and the administrators' alert)."""

    ok: bool
    reason: str


@functools.lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the snapshot inside the package: no network


def organizational_domain(domain: str) -> str:
    """example.com for mail.example.com; example.com.br for a.example.com.br."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed DMARC alignment: the same organizational domain."""
    a, b = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return a == b or organizational_domain(a) == organizational_domain(b)


def _prop(result, ptype: str, name: str) -> str:
    for p in getattr(result, "properties", []) or []:
        if p.type == ptype and p.name == name and p.value:
            return str(p.value).strip().lower()
    return ""


def _dkim_domain(result) -> str:
    d = _prop(result, "header", "d")
    if d:
        return d
    i = _prop(result, "header", "i")
    return i.rsplit("@", 1)[-1] if "@" in i else ""


def verify_sender(headers: Sequence[str], from_domain: str, trusted_ids: Collection[str]) -> Verdict:
    """The verdict of the topmost Authentication-Results header (unfolded values, top first)."""
    if not headers:
        return Verdict(False, "no Authentication-Results header")
    top = headers[0]
    if len(top) > MAX_HEADER_CHARS:
        return Verdict(False, f"the topmost Authentication-Results header has {len(top)} characters")
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(top)
    except Exception as exc:  # the parser's own errors on hostile input
        return Verdict(False, f"topmost Authentication-Results header is unparsable ({type(exc).__name__})")
    authserv = str(parsed.authserv_id or "").lower()
    if authserv not in {t.lower() for t in trusted_ids}:
        return Verdict(False, f"topmost Authentication-Results from untrusted authserv-id {authserv!r}")
    from_domain = from_domain.lower()
    seen = []
    for result in parsed.results:
        method, outcome = str(result.method).lower(), str(result.result).lower()
        if method == "dmarc":
            header_from = _prop(result, "header", "from")
            if outcome == "pass" and header_from == from_domain:
                return Verdict(True, f"dmarc=pass header.from={header_from} ({authserv})")
            seen.append(f"dmarc={outcome} header.from={header_from or '?'}")
        elif method == "dkim":
            d = _dkim_domain(result)
            if outcome == "pass" and d and aligned(d, from_domain):
                return Verdict(True, f"dkim=pass d={d} aligned with {from_domain} ({authserv})")
            seen.append(f"dkim={outcome} d={d or '?'}" + (" (not aligned)" if outcome == "pass" else ""))
        elif method == "spf":
            seen.append(f"spf={outcome} (SPF alone does not authenticate From)")
        else:
            seen.append(f"{method}={outcome}")
    return Verdict(False, f"{authserv}: {'; '.join(seen) or 'no results'} for From domain {from_domain}")


# Triage and decision read the same header in one pass; a flood repeats it. Call it with
# the topmost header only (bounded by MAX_HEADER_CHARS), never what is below.
verify_sender_cached = functools.lru_cache(maxsize=1024)(verify_sender)


def check_date(date_header: str, now: datetime, max_age: timedelta, max_future: timedelta) -> Verdict:
    """A Date header within [now - max_age, now + max_future]; a missing or unreadable one fails.

    `reason` is for the requester (pt-BR): it goes back in the refusal reply."""
    try:
        sent = parsedate_to_datetime(date_header) if date_header else None
    except (TypeError, ValueError, IndexError, OverflowError):
        sent = None
    if sent is None:
        return Verdict(False, "a mensagem não tem um cabeçalho Date válido")
    if sent.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322 3.3)
        sent = sent.replace(tzinfo=timezone.utc)
    try:
        shown = sent.astimezone(timezone.utc).strftime("%d/%m/%Y %H:%M UTC")
    except (OverflowError, ValueError):  # year 9999 with a negative offset, and the like
        return Verdict(False, "a mensagem não tem um cabeçalho Date válido")
    if sent < now - max_age:
        hours = max_age.total_seconds() / 3600
        return Verdict(
            False,
            f"a mensagem foi enviada em {shown}, há mais de {hours:g} horas; comandos antigos "
            "não são executados (envie o comando de novo)",
        )
    if sent > now + max_future:
        return Verdict(
            False,
            f"a data da mensagem ({shown}) está no futuro; confira o relógio do seu computador ou celular",
        )
    return Verdict(True, "")
