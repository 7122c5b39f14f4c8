# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One connection to the fail2ban server's socket for a whole module run.

Each `fail2ban-client` run costs a Python start and fail2ban's imports (~0.09 s CPU);
a CHECKIP run needed four to nine of them per host. Here one helper process speaks
the server's own protocol over one connection instead.

The protocol (fail2ban/client/csocket.py and server/asyncserver.py, unchanged from
0.9.7 to 1.1.x): the client sends a pickled list of strings followed by
`<F2B_END_COMMAND>`; the server answers `pickle.dumps([code, value],
HIGHEST_PROTOCOL) + <F2B_END_COMMAND>` (code 0: value is the answer, 1: value is the
exception), and `<F2B_CLOSE_COMMAND><F2B_END_COMMAND>` ends the connection.

The server pickles with the HIGHEST protocol of ITS interpreter (5 on Python 3.8+,
2 on Python 2.7), which an older module interpreter cannot read, and its answers
may hold its own classes. So the helper (HELPER_SOURCE) runs under the interpreter of
`fail2ban-client`'s shebang, the one fail2ban itself runs under, and sends its
requests with pickle protocol 2, which every server reads. The module talks to it
in JSON lines over its stdin/stdout. Anything that goes wrong with the transport
(no Python shebang, no socket, a pickle the helper cannot read) raises
TransportError, and the module falls back to `fail2ban-client`.

Runs on the target with Python 2.7, 3.6 and 3.x, standard library only.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import subprocess

from ansible_collections.athome.voip.plugins.module_utils.fail2ban import Fail2banError

DEFAULT_SOCKET = "/var/run/fail2ban/fail2ban.sock"

# The helper program, run as `INTERPRETER -c HELPER_SOURCE SOCKET TIMEOUT`. Python 2.6+
# and 3.x; reads one JSON command list per line on stdin, writes one JSON object per
# line on stdout: {"ready": ...} once connected, then {"code": 0|1, "value": ...} per
# command, or {"fatal": "..."} before exiting 1 when the transport fails.
HELPER_SOURCE = r'''
import json
import pickle
import socket
import sys

END = b"<F2B_END_COMMAND>"
CLOSE = b"<F2B_CLOSE_COMMAND>"
REQUEST_PROTOCOL = 2  # readable by every fail2ban server, Python 2.3 to 3.x
PY2 = sys.version_info[0] == 2


class Opaque(object):
    """Stands in for a class of the server that this interpreter cannot import."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __str__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(str(a) for a in self.args))


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return pickle.Unpickler.find_class(self, module, name)
        except (ImportError, AttributeError):
            return type(str(name), (Opaque,), {})


def loads(data):
    import io
    return Unpickler(io.BytesIO(data)).load()


def text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if PY2:
        return unicode(value) if not isinstance(value, unicode) else value  # noqa: F821
    return "%s" % (value,)


def plain(value):
    """The answer as JSON-able values: sequences as lists, objects as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) or (PY2 and isinstance(value, long)):  # noqa: F821
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, dict):
        return dict((text(k), plain(v)) for k, v in value.items())
    if isinstance(value, BaseException):
        return "%s: %s" % (type(value).__name__, text(value))
    return text(value)


def receive(sock):
    data = bytearray()
    while not data.endswith(END):
        chunk = sock.recv(65536)
        if not chunk:
            raise IOError("the fail2ban server closed the connection")
        data.extend(chunk)
    return bytes(data[:-len(END)])


def native(arg):
    if PY2 and not isinstance(arg, bytes):
        return arg.encode("utf-8")
    return arg


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    path, timeout = sys.argv[1], float(sys.argv[2])
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
    except Exception as e:
        emit({"fatal": "cannot connect to %s: %s" % (path, e)})
        return 1
    emit({"ready": True, "python": list(sys.version_info[:3]), "protocol": pickle.HIGHEST_PROTOCOL})
    try:
        for line in iter(sys.stdin.readline, ""):
            command = [native(a) for a in json.loads(line)]
            sock.sendall(pickle.dumps(command, REQUEST_PROTOCOL) + END)
            answer = loads(receive(sock))
            if isinstance(answer, (list, tuple)) and len(answer) == 2 and answer[0] in (0, 1):
                emit({"code": answer[0], "value": plain(answer[1])})
            else:  # "ERROR: ..." when the server could not even read the request
                emit({"fatal": "unexpected answer: %s" % (plain(answer),)})
                return 1
        sock.sendall(CLOSE + END)
    except Exception as e:
        emit({"fatal": "%s: %s" % (type(e).__name__, e)})
        return 1
    finally:
        sock.close()
    return 0


sys.exit(main())
'''


class TransportError(Exception):
    """The socket route does not work here: use fail2ban-client instead."""


def parse_shebang(line):
    """Interpreter argv from a script's first line, or None when it is not a Python one.

    `#!/usr/bin/python3 -Es` -> ['/usr/bin/python3', '-Es'];
    `#!/usr/bin/env python3` -> ['python3'] (to look up on PATH)."""
    if not line.startswith("#!"):
        return None
    words = line[2:].strip().split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")][:1]
    if not words or not re.match(r"^python[0-9.]*$", os.path.basename(words[0])):
        return None
    return words


def config_socket(texts):
    """The `socket` option of [Definition] over fail2ban.conf/.local texts in read order."""
    found = None
    for text in texts:
        section = None
        for line in (text or "").splitlines():
            if not line.strip() or line.lstrip().startswith(("#", ";")):
                continue
            head = re.match(r"^\[([^\]]+)\]\s*$", line)
            if head:
                section = head.group(1).strip()
                continue
            opt = re.match(r"^socket\s*[=:]\s*(\S+)\s*$", line)
            if opt and section == "Definition":
                found = opt.group(1)
    return found


def socket_of(conf_dir, read_text):
    """The socket fail2ban-client -c conf_dir would use (fail2ban's read order)."""
    import glob

    files = [os.path.join(conf_dir, "fail2ban.conf")]
    files += sorted(glob.glob(os.path.join(conf_dir, "fail2ban.d", "*.conf")))
    files.append(os.path.join(conf_dir, "fail2ban.local"))
    files += sorted(glob.glob(os.path.join(conf_dir, "fail2ban.d", "*.local")))
    return config_socket([read_text(f) for f in files if os.path.isfile(f)]) or DEFAULT_SOCKET


def _pairs(value, what):
    """fail2ban's status answers: lists of (label, value) pairs, as a dict."""
    try:
        return dict((str(k), v) for k, v in value)
    except (TypeError, ValueError):
        raise Fail2banError("unexpected %s answer: %r" % (what, value))


def answer_jails(value):
    """Jail names from `status`: [['Number of jail', 2], ['Jail list', 'asterisk, sshd']]."""
    names = _pairs(value, "status").get("Jail list")
    if names is None:
        raise Fail2banError("no 'Jail list' in the status answer: %r" % (value,))
    return [n.strip() for n in names.split(",") if n.strip()]


def answer_status_banned(value):
    """Banned addresses from `status JAIL`: [..., ['Actions', [..., ['Banned IP list', [...]]]]]."""
    actions = _pairs(value, "jail status").get("Actions")
    banned = _pairs(actions or [], "jail status").get("Banned IP list")
    if banned is None:
        raise Fail2banError("no 'Banned IP list' in the jail status answer: %r" % (value,))
    return [str(b) for b in banned] if isinstance(banned, list) else str(banned).split()


def answer_list(value, what):
    """`get JAIL ignoreip`, `set JAIL addignoreip|delignoreip IP`: a list of entries."""
    if not isinstance(value, list):
        raise Fail2banError("unexpected %s answer: %r" % (what, value))
    return [str(v) for v in value]


def answer_banned_ip(value):
    """Jails from `banned IP` (0.10.6+/0.11.2+): [['asterisk', 'sshd']]."""
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], list)):
        raise Fail2banError("unexpected 'banned' answer: %r" % (value,))
    return [str(j) for j in value[0]]


def answer_get_banned_ip(value):
    """True/False from `get JAIL banned IP`: 1 or 0 (or [1] / [0])."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Fail2banError("unexpected 'get JAIL banned' answer: %r" % (value,))


class SocketClient:
    """The fail2ban_ignoreip client API over one helper process and one socket connection."""

    name = "socket"

    def __init__(self, interpreter, sock, timeout=30):
        self.sock = sock
        try:
            self.proc = subprocess.Popen(
                list(interpreter) + ["-c", HELPER_SOURCE, sock, str(timeout)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            raise TransportError("cannot start %s: %s" % (interpreter[0], e))
        hello = self._read()
        if not hello.get("ready"):
            raise TransportError("the socket helper did not start: %r" % (hello,))
        self.helper_python = ".".join(str(v) for v in hello.get("python", []))
        # A round trip proves the server's pickles are readable here.
        if self.request("ping") != "pong":
            raise TransportError("the fail2ban server did not answer ping with pong")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            err = b""
            try:
                self.proc.stdin.close()
                err = self.proc.stderr.read()
            except (IOError, OSError, ValueError):
                pass
            self.proc.wait()
            raise TransportError(
                "the socket helper exited (%s): %s" % (self.proc.returncode, err.decode("utf-8", "replace")[-300:])
            )
        try:
            answer = json.loads(line.decode("utf-8"))
        except ValueError:
            raise TransportError("the socket helper wrote %r" % (line[:200],))
        if "fatal" in answer:
            self.close()
            raise TransportError(answer["fatal"])
        return answer

    def request(self, *args):
        """The value of one command; Fail2banError when the server refuses it."""
        try:
            self.proc.stdin.write((json.dumps(list(args)) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (IOError, OSError, ValueError) as e:
            raise TransportError("the socket helper is gone: %s" % (e,))
        answer = self._read()
        if answer.get("code") != 0:
            raise Fail2banError("fail2ban %s failed: %s" % (" ".join(args), answer.get("value")))
        return answer.get("value")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except (IOError, OSError):
                pass
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()

    def jails(self, wanted=None):
        if wanted:
            return list(wanted)
        return answer_jails(self.request("status"))

    def ignoreip(self, jail):
        return answer_list(self.request("get", jail, "ignoreip"), "ignoreip")

    def ignoreip_change(self, jail, command, ip):
        return answer_list(self.request("set", jail, command, ip), command)

    def unban(self, jail, ip):
        self.request("set", jail, "unbanip", ip)

    def banned_in(self, ip, jails):
        """(jails banning ip, method): `banned IP`, else per jail `get J banned IP`, else `status J`."""
        try:
            return [j for j in answer_banned_ip(self.request("banned", ip)) if j in jails], "banned"
        except Fail2banError:
            pass
        try:
            return [j for j in jails if answer_get_banned_ip(self.request("get", j, "banned", ip))], "get-banned"
        except Fail2banError:
            pass
        return [j for j in jails if ip in answer_status_banned(self.request("status", j))], "status"


def client_interpreter(client, which):
    """The interpreter of the fail2ban-client script (its shebang), as an argv list.

    `which(name)` finds a program on PATH (AnsibleModule.get_bin_path). TransportError
    when the client is not a Python script (a wrapper, a binary) or cannot be read."""
    path = client if os.path.isabs(client) else which(client)
    if not path:
        raise TransportError("%s not found" % client)
    try:
        with open(path, "rb") as f:
            first = f.readline(512).decode("utf-8", "replace")
    except (IOError, OSError) as e:
        raise TransportError("cannot read %s: %s" % (path, e))
    words = parse_shebang(first)
    if not words:
        raise TransportError("%s is not a Python script (%r)" % (path, first.strip()[:80]))
    if not os.path.isabs(words[0]):
        found = which(words[0])
        if not found:
            raise TransportError("%s's interpreter %s not found" % (path, words[0]))
        words[0] = found
    return words


class FallbackClient:
    """The socket route, switching to fail2ban-client for good at its first transport error.

    Every command the module sends is safe to send again (queries, add/del ignoreip,
    unbanip), so the command that met the error is simply repeated through the client."""

    def __init__(self, primary, fallback):
        self.current = primary
        self.fallback = fallback
        self.note = ""

    @property
    def name(self):
        return self.current.name

    def _call(self, method, *args):
        try:
            return getattr(self.current, method)(*args)
        except TransportError as e:
            if self.current is self.fallback:
                raise
            self.note = "socket route failed, fail2ban-client used: %s" % (e,)
            self.current.close()
            self.current = self.fallback
            return getattr(self.current, method)(*args)

    def close(self):
        self.current.close()

    def jails(self, wanted=None):
        return self._call("jails", wanted)

    def ignoreip(self, jail):
        return self._call("ignoreip", jail)

    def ignoreip_change(self, jail, command, ip):
        return self._call("ignoreip_change", jail, command, ip)

    def unban(self, jail, ip):
        return self._call("unban", jail, ip)

    def banned_in(self, ip, jails):
        return self._call("banned_in", ip, jails)


def open_client(cli, transport, client, conf_dir, sock, which, read_text):
    """(client object, note): the socket route when transport is auto and it works here,
    else `cli` (the fail2ban-client runner) with the reason in note."""
    if transport == "client":
        return cli, ""
    try:
        interpreter = client_interpreter(client, which)
        return FallbackClient(SocketClient(interpreter, sock or socket_of(conf_dir, read_text)), cli), ""
    except TransportError as e:
        return cli, "socket route not used, fail2ban-client used: %s" % (e,)
