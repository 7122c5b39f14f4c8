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

When the module itself runs under the interpreter of that shebang (the same path, as on
most current hosts: /usr/bin/python3 for both), InProcessClient runs the helper's
functions in the module's process instead: the same connection, no second Python start.

The helper also does fail2ban's configuration test (config_test): what
`fail2ban-client -t` does, with fail2ban's own reader, in the interpreter that already
runs, so a change of the managed file costs no `fail2ban-client -t` process. When that
reader cannot be imported, the module runs `fail2ban-client -t` as before.

Runs on the target with Python 2.7, 3.6 and 3.x, standard library only.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import subprocess
import sys

from ansible_collections.athome.voip.plugins.module_utils.fail2ban import Fail2banError

DEFAULT_SOCKET = "/var/run/fail2ban/fail2ban.sock"

# The helper program, run as `INTERPRETER -c HELPER_SOURCE SOCKET TIMEOUT [CLIENT_FOLDER]`.
# Python 2.6+ and 3.x; reads one JSON command per line on stdin (a list for the server,
# {"config_test": DIR} for the config test), writes one JSON object per line on stdout:
# {"ready": ...} once connected, then {"code": 0|1, "value": ...} per command
# ({"unavailable": ...} when fail2ban's reader cannot be imported), or {"fatal": "..."}
# before exiting 1 when the transport fails. InProcessClient loads the same functions
# (connect, handle, close) into the module's process.
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


OUT = sys.stdout  # the module reads this; fail2ban's code gets stderr as its stdout


def emit(obj):
    OUT.write(json.dumps(obj) + "\n")
    OUT.flush()


def config_test(conf_dir):
    """What `fail2ban-client -c CONF_DIR -t` does (fail2ban/client/fail2bancmdline.py,
    initCmdLine and readConfig, 0.10 to 1.1), with fail2ban's own reader in this process:
    the early options and their log level, then every jail read strictly
    (ignoreWrong=False) and converted to the server's command stream (a jail whose
    log files are all missing fails there). fail2ban 0.9 has no -t; there the same
    reading as its `-d` (getOptions without ignoreWrong) is done.
    {"code": 0, "value": {"ok": bool, "errors": [...]}}, or {"unavailable": why} when
    fail2ban's reader cannot be imported here."""
    import logging

    try:
        from fail2ban.client.configurator import Configurator
    except Exception as e:
        return {"unavailable": "cannot import fail2ban's config reader: %s: %s" % (type(e).__name__, e)}
    errors = []

    class Collect(logging.Handler):
        def emit(self, record):
            try:
                errors.append(record.getMessage())
            except Exception:
                errors.append(str(record.msg))

    log = logging.getLogger("fail2ban")
    handler = Collect(logging.ERROR)
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    ok = False
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        conf = Configurator()
        conf.setBaseDir(conf_dir)
        conf.readEarly()
        early = conf.getEarlyOptions()
        main_opts = dict((k, early[k]) for k in ("socket", "pidfile", "logtarget", "loglevel", "syslogsocket")
                         if k in early)
        try:
            from fail2ban.helpers import str2LogLevel
        except ImportError:  # 0.9: no such check
            str2LogLevel = None
        if str2LogLevel is not None:
            str2LogLevel(main_opts.get("loglevel", "INFO"))
        conf.Reload()
        conf.readAll()
        if "ignoreWrong" in conf.getOptions.__func__.__code__.co_varnames:
            ok = conf.getOptions(None, main_opts, ignoreWrong=False)
        else:
            ok = conf.getOptions(None)
        conf.convertToProtocol()
        conf.getConfigStream()
    except Exception as e:
        errors.append("Failed during configuration: %s" % (e,))
        ok = False
    finally:
        sys.stdout = stdout
        log.removeHandler(handler)
        log.propagate = propagate
    return {"code": 0, "value": {"ok": bool(ok), "errors": [text(e) for e in errors]}}


def connect(path, timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except Exception:
        sock.close()
        raise
    return sock


def handle(sock, command):
    """The answer to one command as a JSON-able dict: a list goes to the server, a dict
    ({"config_test": DIR}) is work done here. {"fatal": ...} when the transport fails."""
    if isinstance(command, dict):
        return config_test(command["config_test"])
    sock.sendall(pickle.dumps([native(a) for a in command], REQUEST_PROTOCOL) + END)
    answer = loads(receive(sock))
    if isinstance(answer, (list, tuple)) and len(answer) == 2 and answer[0] in (0, 1):
        return {"code": answer[0], "value": plain(answer[1])}
    # "ERROR: ..." when the server could not even read the request
    return {"fatal": "unexpected answer: %s" % (plain(answer),)}


def close(sock):
    try:
        sock.sendall(CLOSE + END)
    except Exception:
        pass
    sock.close()


def main():
    path, timeout = sys.argv[1], float(sys.argv[2])
    if len(sys.argv) > 3 and sys.path and sys.path[0] == "":
        # As when the client script runs: its own folder first, not the current one.
        sys.path[0] = sys.argv[3]
    try:
        sock = connect(path, timeout)
    except Exception as e:
        emit({"fatal": "cannot connect to %s: %s" % (path, e)})
        return 1
    emit({"ready": True, "python": list(sys.version_info[:3]), "protocol": pickle.HIGHEST_PROTOCOL})
    try:
        for line in iter(sys.stdin.readline, ""):
            answer = handle(sock, json.loads(line))
            emit(answer)
            if "fatal" in answer:
                return 1
    except Exception as e:
        emit({"fatal": "%s: %s" % (type(e).__name__, e)})
        return 1
    finally:
        close(sock)
    return 0


if __name__ == "__main__":
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


class _Commands:
    """The fail2ban_ignoreip client API over one socket connection; `_exchange(command)` sends
    one command (a list for the server, a dict for the helper) and returns its answer dict."""

    name = "socket"
    config_note = ""

    def _exchange(self, command):
        raise NotImplementedError

    def request(self, *args):
        """The value of one command; Fail2banError when the server refuses it."""
        answer = self._exchange(list(args))
        if answer.get("code") != 0:
            raise Fail2banError("fail2ban %s failed: %s" % (" ".join(args), answer.get("value")))
        return answer.get("value")

    def config_test(self, conf_dir):
        """(ok, message) of what `fail2ban-client -c conf_dir -t` does, done with fail2ban's own
        reader under fail2ban's interpreter without a new process, or None when that reader
        cannot be imported (the caller then runs fail2ban-client -t; why is in config_note)."""
        answer = self._exchange({"config_test": conf_dir})
        if "unavailable" in answer:
            self.config_note = answer["unavailable"]
            return None
        value = answer.get("value") or {}
        if answer.get("code") != 0 or not isinstance(value, dict) or "ok" not in value:
            raise TransportError("unexpected config test answer: %r" % (answer,))
        return bool(value["ok"]), "; ".join(value.get("errors") or [])[-500:]

    def _check_ping(self):
        # A round trip proves the server's pickles are readable here.
        if self.request("ping") != "pong":
            raise TransportError("the fail2ban server did not answer ping with pong")

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


class SocketClient(_Commands):
    """One helper process under fail2ban's interpreter holding the socket connection."""

    def __init__(self, interpreter, sock, timeout=30, client_path=None):
        self.sock = sock
        # fail2ban's own modules are imported as the client script imports them: its folder first.
        folder = [os.path.dirname(os.path.realpath(client_path))] if client_path else []
        try:
            self.proc = subprocess.Popen(
                list(interpreter) + ["-c", HELPER_SOURCE, sock, str(timeout)] + folder,
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
        self._check_ping()

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

    def _exchange(self, command):
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (IOError, OSError, ValueError) as e:
            raise TransportError("the socket helper is gone: %s" % (e,))
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except (IOError, OSError):
                pass
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


_HELPER = {}


def helper_namespace():
    """HELPER_SOURCE's functions, loaded into this process (once)."""
    if not _HELPER:
        namespace = {"__name__": "athome_fail2ban_helper"}
        exec(compile(HELPER_SOURCE, "<fail2ban socket helper>", "exec"), namespace)
        _HELPER.update(namespace)
    return _HELPER


class InProcessClient(_Commands):
    """The helper's code run in this process, when the module already runs under the
    interpreter of fail2ban-client's shebang: the same connection and config test without
    starting the helper process (one Python start less per host)."""

    def __init__(self, sock, timeout=30, client_path=None):
        self.conn = None
        self.helper = helper_namespace()
        self.client_path = client_path
        self.helper_python = ".".join(str(v) for v in sys.version_info[:3])
        try:
            self.conn = self.helper["connect"](sock, timeout)
        except Exception as e:
            raise TransportError("cannot connect to %s: %s" % (sock, e))
        self._check_ping()

    def _exchange(self, command):
        folder = None
        if isinstance(command, dict) and self.client_path:
            # fail2ban's modules as the client script finds them: its folder first (for the test only).
            folder = os.path.dirname(os.path.realpath(self.client_path))
            sys.path.insert(0, folder)
        try:
            answer = self.helper["handle"](self.conn, command)
        except Exception as e:
            self.close()
            raise TransportError("%s: %s" % (type(e).__name__, e))
        finally:
            if folder is not None and folder in sys.path:
                sys.path.remove(folder)
        if "fatal" in answer:
            self.close()
            raise TransportError(answer["fatal"])
        return answer

    def close(self):
        if self.conn is not None:
            self.helper["close"](self.conn)
            self.conn = None


def client_path(client, which):
    path = client if os.path.isabs(client) else which(client)
    if not path:
        raise TransportError("%s not found" % client)
    return path


def client_interpreter(client, which):
    """The interpreter of the fail2ban-client script (its shebang), as an argv list.

    `which(name)` finds a program on PATH (AnsibleModule.get_bin_path). TransportError
    when the client is not a Python script (a wrapper, a binary) or cannot be read."""
    path = client_path(client, which)
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

    @property
    def config_note(self):
        return getattr(self.current, "config_note", "")

    def config_test(self, conf_dir):
        return self._call("config_test", conf_dir)

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


def same_interpreter(interpreter, executable):
    """True when the client's shebang names the interpreter this module runs under (the same
    path, so the same site-packages; its flags such as -s/-E/-P/-I are not reproduced)."""
    return bool(executable) and os.path.normpath(interpreter[0]) == os.path.normpath(executable)


def open_client(cli, transport, client, conf_dir, sock, which, read_text):
    """(client object, note): the socket route when transport is auto and it works here,
    else `cli` (the fail2ban-client runner) with the reason in note."""
    if transport == "client":
        return cli, ""
    try:
        interpreter = client_interpreter(client, which)
        path, sock = client_path(client, which), sock or socket_of(conf_dir, read_text)
        # Python 2 keeps the helper process: fail2ban's helpers (0.10+) reset Python 2's default
        # encoding process-wide when the config test imports them, not in the module's process.
        if sys.version_info[0] >= 3 and same_interpreter(interpreter, sys.executable):
            return FallbackClient(InProcessClient(sock, client_path=path), cli), ""
        return FallbackClient(SocketClient(interpreter, sock, client_path=path), cli), ""
    except TransportError as e:
        return cli, "socket route not used, fail2ban-client used: %s" % (e,)
