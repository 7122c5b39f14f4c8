"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe.

One browser process serves many pages: each page is a new target with its own
DevTools session, sized to a viewport width, loaded from a file:// URL, then
measured and photographed. The protocol runs over the two pipes Chromium opens
with --remote-debugging-pipe (it reads commands on fd 3 and writes answers and
events on fd 4, each message a JSON object ended by a NUL byte): no port, no
client library.

Nothing leaves the machine: the flags below switch off Chromium's own
background traffic (component updates, sync, first-run, QUIC), and every host
name resolves to nothing (--host-resolver-rules), so a page that tries to fetch
anything from the network shows a failed request instead of reaching it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-pipe",
]

# What the page measures of itself once loaded: the document's width against the
# viewport's, and every element whose content is wider than its box and clipped
# (overflow hidden/auto/scroll: cut off or scrolled inside the mail), and the
# innermost elements that reach past the right edge of the viewport, and the words of
# prose that a line break cuts in two.
MEASURE = r"""
(() => {
  const root = document.documentElement;
  const vw = root.clientWidth;
  const describe = (el) => {
    const text = (el.innerText || el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60);
    return `<${el.tagName.toLowerCase()}> "${text}"`;
  };
  const clipped = [], beyond = [], wide = [];
  for (const el of document.body.querySelectorAll("*")) {
    const style = getComputedStyle(el);
    if (style.display === "none") continue;
    if (style.overflowX !== "visible" && el.scrollWidth > el.clientWidth + 1) {
      clipped.push(`${describe(el)} content ${el.scrollWidth}px in ${el.clientWidth}px`);
    }
    const box = el.getBoundingClientRect();
    if (box.width > 0 && box.right > vw + 0.5) wide.push(el);
  }
  // Of the boxes past the right edge, the innermost: the content that pushes them out.
  for (const el of wide) {
    if (!wide.some((other) => other !== el && el.contains(other))) {
      beyond.push(`${describe(el)} ends at ${Math.round(el.getBoundingClientRect().right)}px`);
    }
  }
  // Words that a line break cuts in two although they would fit on a line: a label
  // squeezed into a column a few letters wide, a MAC address split in the middle.
  // A word: up to 20 letters and digits between spaces, give or take punctuation
  // ("Servidor", "gv1p", "(recebido:", "'010203040506',"); an address, a path or a
  // long code is no word and may break anywhere.
  const cut = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const m of node.data.matchAll(/(?<=^|\s)[("“']*([\p{L}\p{N}]{1,20})[)"”',.;:!?]*(?=\s|$)/gu)) {
      const start = m.index + m[0].indexOf(m[1]);
      const range = document.createRange();
      range.setStart(node, start);
      range.setEnd(node, start + m[1].length);
      const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
      if (lines.size > 1) cut.push(`"${m[1]}" in ${describe(node.parentElement)}`);
    }
  }
  return {
    cut: cut.slice(0, 10),
    viewport: vw,
    scrollWidth: Math.max(root.scrollWidth, document.body.scrollWidth),
    height: Math.ceil(Math.max(root.scrollHeight, document.body.scrollHeight)),
    clipped: clipped.slice(0, 10),
    beyond: beyond.slice(0, 10),
    title: document.title,
  };
})()
"""


class BrowserError(AssertionError):
    """Chromium did not answer, or answered with a protocol error."""


@dataclass
class PageReport:
    """What one page did in the browser at one width."""

    url: str
    width: int
    console: list[str] = field(default_factory=list)  # console errors, exceptions, error log entries
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed: list[str] = field(default_factory=list)  # requests that failed, and why
    metrics: dict = field(default_factory=dict)  # from MEASURE
    screenshot: Path | None = None

    @property
    def external(self) -> list[str]:
        """Requests for anything but the page itself and inline data."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "about:"))]


class Chromium:
    """`with Chromium(workdir) as browser: report = browser.check(html_file, 360, png)`."""

    def __init__(self, workdir: Path, executable: str = CHROMIUM, timeout: float = 30.0):
        self.workdir = Path(workdir)
        self.executable = executable
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._next_id = 0
        self._inbox: queue.Queue = queue.Queue()
        self._events: dict[str, list[dict]] = {}  # by session id ("" for the browser)
        self._answers: dict[int, dict] = {}
        self.stderr_path = self.workdir / "chromium.stderr.log"

    # ---------------------------------------------------------------- process

    def __enter__(self) -> Chromium:
        if not os.access(self.executable, os.X_OK):
            raise BrowserError(f"{self.executable} is missing: `make system-deps` installs Debian's chromium")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir))
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands on fd 3 and writes on fd 4. The child's ends are moved
        # to 10 and above first, so that bash's redirections (3 <- R, 4 <- W) never
        # overwrite one another (dash takes one-digit descriptors only); then bash
        # execs Chromium with only those two open.
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        argv = [self.executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    "/bin/bash",
                    "-c",
                    f'exec "$0" "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-',
                    *argv,
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                pass_fds=(child_r, child_w),
            )
        os.close(child_r)
        os.close(child_w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.call("Target.setDiscoverTargets", discover=False)  # the first answer: it is up
        except BaseException:
            self.__exit__()  # `with` calls it only once __enter__ has returned
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            self._send("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, BrowserError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)
            self._reader.join(timeout=5)
            os.close(self._from_browser)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.proc = None

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)  # the browser is gone
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                self._inbox.put(json.loads(raw))

    # --------------------------------------------------------------- protocol

    def _send(self, method: str, session: str = "", **params) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:  # it died before reading (a browser that exits at start)
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = "still running"
            raise BrowserError(
                f"Chromium closed its pipe (exit status {code}) (see {self.stderr_path})"
            ) from None
        return self._next_id

    def _pump(self, deadline: float, what: str) -> None:
        """Take one message off the pipe (answer or event), or fail at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"Chromium: timed out waiting for {what} (see {self.stderr_path})")
        try:
            message = self._inbox.get(timeout=left)
        except queue.Empty:
            raise BrowserError(f"Chromium: timed out waiting for {what} (see {self.stderr_path})") from None
        if message is None:  # the pipe closed: the browser is exiting, or has
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = "still running"
            raise BrowserError(f"Chromium closed its pipe (exit status {code}) (see {self.stderr_path})")
        if "id" in message:
            self._answers[message["id"]] = message
        else:
            self._events.setdefault(message.get("sessionId", ""), []).append(message)

    def call(self, method: str, session: str = "", **params) -> dict:
        call_id = self._send(method, session, **params)
        deadline = time.monotonic() + self.timeout
        while call_id not in self._answers:
            self._pump(deadline, method)
        answer = self._answers.pop(call_id)
        if "error" in answer:
            raise BrowserError(f"Chromium: {method} failed: {answer['error']}")
        return answer.get("result", {})

    def wait_event(self, session: str, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            events = self._events.get(session, [])
            for event in events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(events)
            self._pump(deadline, method)

    # ------------------------------------------------------------------ pages

    def check(self, page: Path, width: int, screenshot: Path | None = None, height: int = 640) -> PageReport:
        """Load `page` in a fresh tab `width` CSS pixels wide; what it logged, fetched and
        measured, and a full-page PNG in `screenshot`."""
        url = Path(page).resolve().as_uri()
        report = PageReport(url=url, width=width)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable", session)
            self.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            self._events[session] = []  # from here on: this page's events only
            self.call("Page.navigate", session, url=url)
            self.wait_event(session, "Page.loadEventFired")
            report.metrics = self.call("Runtime.evaluate", session, expression=MEASURE, returnByValue=True)[
                "result"
            ]["value"]
            if screenshot is not None:
                shot = self.call(
                    "Page.captureScreenshot",
                    session,
                    format="png",
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": width, "height": report.metrics["height"], "scale": 1},
                )
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                report.screenshot = screenshot
            # Everything the page sent before the measurement has arrived by now: the
            # protocol answers in order, after the events that came before the answer.
            self._collect(session, report)
        finally:
            self.call("Target.closeTarget", targetId=target)
            self._events.pop(session, None)
        return report

    def _collect(self, session: str, report: PageReport) -> None:
        for event in self._events.get(session, []):
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                report.console.append(f"console.{params['type']}: {args}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "")
                report.console.append(f"exception: {text}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                report.console.append(
                    f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
                )
            elif method == "Network.requestWillBeSent":
                report.requests.append(params.get("request", {}).get("url", ""))
            elif method == "Network.loadingFailed":
                report.failed.append(f"{params.get('errorText')} ({params.get('type')})")
