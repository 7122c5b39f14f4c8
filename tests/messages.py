"""Command emails as the receiving mail server hands them over: Date, Message-ID, and the
server's own Authentication-Results header on top (authserv-id AUTHSERV)."""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.utils import formatdate

AUTHSERV = "mx.example.test"  # the receiving server the tests' configs trust
# The auth section of a test config: sender authenticity required, as in production.
AUTH = {"authentication_results": {"required": True, "trusted_authserv_ids": [AUTHSERV]}}


def passing_results(address: str, authserv: str = AUTHSERV) -> str:
    domain = address.rsplit("@", 1)[-1]
    return (
        f"{authserv}; dkim=pass header.i=@{domain} header.s=s1 header.b=AbCdEf; "
        f"spf=pass smtp.mailfrom={address}; dmarc=pass (p=REJECT) header.from={domain}"
    )


def command_message(
    subject: str,
    sender: str = "ana@example.test",
    msgid: str | None = None,
    *,
    display: str = "",
    date: float | str | None = None,
    results: str | list[str] | None = "pass",
    body: str = "enviado pelo celular",
    **headers: str,
) -> EmailMessage:
    """`results`: 'pass' (the receiving server authenticated the sender), None (no header),
    or the header value(s), topmost first."""
    msg = EmailMessage()
    if results == "pass":
        results = [passing_results(sender)]
    elif isinstance(results, str):
        results = [results]
    for value in results or []:
        msg["Authentication-Results"] = value
    msg["From"] = f"{display} <{sender}>" if display else sender
    msg["To"] = "service@example.test"
    msg["Subject"] = subject
    msg["Date"] = date if isinstance(date, str) else formatdate(date or time.time(), localtime=True)
    if msgid is not None:
        msg["Message-ID"] = msgid
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def status_of(reply) -> str:
    """A reply's status line ('✅ CHECKIP concluído (pedido …)'): the first line of its text
    part. Its subject is the request's own (`Re: [********] CHECKIP=3.3.3.3`)."""
    text = reply.get_body(("plain",)).get_content()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
