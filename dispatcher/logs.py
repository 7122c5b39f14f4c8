"""Logging for the command line and the service: stderr, journald priorities, request ids.

Under journald (systemd sets `JOURNAL_STREAM` to the device:inode of the stream it
connected to stderr) every line starts with the `<N>` syslog priority of its level
(`SyslogLevelPrefix=`, on by default) and carries no time: journald stamps it. A
traceback's lines each get the prefix too, so they stay one record's priority.
Elsewhere a readable line with the local time.

Every line logged while a message or a job is handled carries its request id: the
id lives in a context variable (each thread has its own), set where a message or a
job is taken up (`scoped`, `set_request_id`, `for_job`), and a filter on the handler
copies it into the record. A line outside that context which names a request (a
reply's id is `<request id>-<kind>`) carries that request's id too. `-` otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import sys
from collections.abc import Iterator

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("athome_request_id", default="")
# new_request_id(): 20251111_171215_482913_a1 (UTC time, microseconds, random byte)
_NAMED_ID = re.compile(r"\b(\d{8}_\d{6}_\d{6}_[0-9a-f]{2})\b")

# logging level -> syslog priority (sd-daemon(3): <3> err, <4> warning, <6> info, <7> debug)
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7

CONSOLE_FORMAT = "%(asctime)s | %(levelname)-7s | %(threadName)s | %(request_id)s | %(name)s | %(message)s"
JOURNAL_FORMAT = "%(threadName)s %(request_id)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return DEBUG_PRIORITY


@contextlib.contextmanager
def request(request_id: str = "") -> Iterator[None]:
    """Lines logged inside carry `request_id` (set it later with `set_request_id`)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def set_request_id(request_id: str) -> None:
    """Within a `request()` scope, once the id is known (a message's comes from its ledger entry)."""
    REQUEST_ID.set(request_id)


def scoped(method):
    """A method that takes up a message: its lines carry the request id found for it."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with request():
            return method(*args, **kwargs)

    return wrapper


def for_job(method):
    """A method `(self, job, ...)` that handles a job: its lines carry the job's id."""

    @functools.wraps(method)
    def wrapper(self, job, *args, **kwargs):
        with request(job.id):
            return method(self, job, *args, **kwargs)

    return wrapper


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id`: the context's, else one the message names, else '-'."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if not rid:
            named = _NAMED_ID.search(_plain(record))
            rid = named.group(1) if named else "-"
        record.request_id = rid
        return True


def _plain(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format: logging reports it itself
        return str(record.msg)


class JournalFormatter(logging.Formatter):
    """`<N>` before every line (a traceback too), no time: journald adds it."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def under_journald(stream=None) -> bool:
    """systemd connected this stream (stderr) to the journal: JOURNAL_STREAM names its
    device and inode (so a shell started from the service, with stderr elsewhere, is not)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(verbose: bool = False, stream=None) -> logging.Handler:
    """The root logger writes to stderr, in journald's form when systemd reads it."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
