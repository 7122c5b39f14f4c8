# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The socket route of module_utils/fail2ban_socket.py on Python 2.7, 3.6 and the controller's.

The helper program runs for real under the interpreter of the test (so each of the three
Pythons runs it) against a protocol stand-in: a Unix socket server in a thread that frames
and pickles exactly as fail2ban's asyncserver.py does (answers pickled with the HIGHEST
protocol, ended by <F2B_END_COMMAND>). The stand-in is there because ansible-test's venvs
have no fail2ban; the real fail2ban-server is tested in tests/test_fail2ban_module.py and
tests/test_checkip_playbooks.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading

import pytest

from ansible_collections.athome.voip.plugins.module_utils import fail2ban_socket as fs
from ansible_collections.athome.voip.plugins.module_utils.fail2ban import Fail2banError

END = b"<F2B_END_COMMAND>"
CLOSE = b"<F2B_CLOSE_COMMAND>"


class ServerSideError(Exception):
    """Pickled by reference to this test module, which the helper process cannot import:
    it meets a server class it does not know, as with fail2ban's own exceptions."""


class FakeServer:
    """fail2ban's request handler, minus fail2ban: one thread per connection."""

    def __init__(self, answers):
        self.answers = answers  # command tuple -> (code, value)
        self.received = []
        self.connections = 0
        self.dir = tempfile.mkdtemp(prefix="f2bt-")
        self.path = os.path.join(self.dir, "s.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(5)
        thread = threading.Thread(target=self.accept)
        thread.daemon = True
        thread.start()

    def accept(self):
        while True:
            try:
                conn = self.listener.accept()[0]
            except (OSError, socket.error):
                return
            self.connections += 1
            thread = threading.Thread(target=self.serve, args=(conn,))
            thread.daemon = True
            thread.start()

    def serve(self, conn):
        data = b""
        while True:
            chunk = conn.recv(7)  # small reads: the framing must not depend on them
            if not chunk:
                break
            data += chunk
            while END in data:
                message, data = data.split(END, 1)
                if message == CLOSE:
                    conn.close()
                    return
                command = tuple(pickle.loads(message))
                self.received.append(command)
                answer = self.answers.get(command, (1, Exception("Invalid command")))
                payload = pickle.dumps(list(answer), pickle.HIGHEST_PROTOCOL) + END
                # Answers arrive in pieces too: a few bytes at a time, then larger ones.
                for start, end in ((0, 3), (3, 40), (40, len(payload))):
                    conn.sendall(payload[start:end])
        conn.close()

    def stop(self):
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


STATUS = [("Number of jail", 2), ("Jail list", "asterisk, sshd")]
JAIL_STATUS = [
    ("Filter", [("Currently failed", 0), ("Total failed", 0), ("File list", ["/x/asterisk.log"])]),
    ("Actions", [("Currently banned", 1), ("Total banned", 1), ("Banned IP list", ["3.3.3.3"])]),
]


@pytest.fixture
def server():
    srv = FakeServer({
        ("ping",): (0, "pong"),
        ("status",): (0, STATUS),
        ("status", "asterisk"): (0, JAIL_STATUS),
        ("status", "sshd"): (0, JAIL_STATUS[:1] + [("Actions", [("Banned IP list", [])])]),
        ("get", "asterisk", "ignoreip"): (0, ["127.0.0.0/8", "::1"]),
        ("get", "nosuch", "ignoreip"): (1, ServerSideError("nosuch")),
        ("set", "asterisk", "addignoreip", "3.3.3.3"): (0, ["127.0.0.0/8", "::1", "3.3.3.3"]),
        ("set", "asterisk", "unbanip", "3.3.3.3"): (0, 1),
        ("get", "big", "ignoreip"): (0, ["10.%d.%d.%d" % (a, b, c) for a in range(8) for b in range(32) for c in range(32)]),
    })
    yield srv
    srv.stop()


def test_one_connection_answers_every_command(server):
    client = fs.SocketClient([sys.executable], server.path)
    try:
        assert client.jails() == ["asterisk", "sshd"]
        assert client.jails(["sshd"]) == ["sshd"]
        assert client.ignoreip("asterisk") == ["127.0.0.0/8", "::1"]
        assert client.ignoreip_change("asterisk", "addignoreip", "3.3.3.3")[-1] == "3.3.3.3"
        client.unban("asterisk", "3.3.3.3")
        assert len(client.ignoreip("big")) == 8 * 32 * 32  # an answer far larger than one read
        # The server's own exception class is unknown to the helper: its message still comes through.
        with pytest.raises(Fail2banError) as info:
            client.ignoreip("nosuch")
        assert "nosuch" in str(info.value)
    finally:
        client.close()
    assert server.connections == 1
    assert server.received[0] == ("ping",)
    assert ("set", "asterisk", "unbanip", "3.3.3.3") in server.received


def test_ban_lookup_falls_back_like_fail2ban_client(server):
    client = fs.SocketClient([sys.executable], server.path)
    try:
        # No `banned` and no `get JAIL banned` on this "old" server: `status JAIL` answers.
        assert client.banned_in("3.3.3.3", ["asterisk", "sshd"]) == (["asterisk"], "status")
        server.answers[("banned", "3.3.3.3")] = (0, [["sshd", "recidive"]])
        assert client.banned_in("3.3.3.3", ["asterisk", "sshd"]) == (["sshd"], "banned")
        del server.answers[("banned", "3.3.3.3")]
        server.answers[("get", "asterisk", "banned", "3.3.3.3")] = (0, 0)
        server.answers[("get", "sshd", "banned", "3.3.3.3")] = (0, 1)
        assert client.banned_in("3.3.3.3", ["asterisk", "sshd"]) == (["sshd"], "get-banned")
    finally:
        client.close()


def test_no_socket_or_no_helper_is_a_transport_error(server):
    with pytest.raises(fs.TransportError) as info:
        fs.SocketClient([sys.executable], server.path + ".missing")
    assert "cannot connect" in str(info.value)
    with pytest.raises(fs.TransportError):
        fs.SocketClient([os.path.join(server.dir, "no-such-python")], server.path)


def test_helper_death_mid_run_switches_to_the_client_for_good(server):
    class Recorder:
        name = "client"

        def __init__(self):
            self.calls = []

        def close(self):
            pass

        def ignoreip(self, jail):
            self.calls.append(jail)
            return ["from-client"]

    primary = fs.SocketClient([sys.executable], server.path)
    fallback = Recorder()
    client = fs.FallbackClient(primary, fallback)
    assert client.ignoreip("asterisk") == ["127.0.0.0/8", "::1"] and client.name == "socket"
    primary.proc.kill()  # the helper dies between two commands
    primary.proc.wait()
    assert client.ignoreip("asterisk") == ["from-client"]
    assert client.ignoreip("sshd") == ["from-client"]
    assert fallback.calls == ["asterisk", "sshd"] and client.name == "client"
    assert "socket route failed" in client.note


@pytest.mark.parametrize(
    "line,argv",
    [
        ("#!/usr/bin/python3\n", ["/usr/bin/python3"]),
        ("#!/usr/bin/python3 -Es\n", ["/usr/bin/python3", "-Es"]),
        ("#! /usr/bin/python2.7\n", ["/usr/bin/python2.7"]),
        ("#!/usr/bin/env python3\n", ["python3"]),
        ("#!/usr/bin/env -S python3\n", ["python3"]),
        ("#!/bin/sh\n", None),
        ("import sys\n", None),
        ("#!/usr/bin/perl\n", None),
    ],
)
def test_parse_shebang(line, argv):
    assert fs.parse_shebang(line) == argv


def test_client_interpreter_from_the_script(tmpdir):
    script = tmpdir.join("fail2ban-client")
    script.write("#!/usr/bin/env python3\nprint(1)\n")
    found = {"python3": "/opt/py/bin/python3"}
    assert fs.client_interpreter(str(script), found.get) == ["/opt/py/bin/python3"]
    assert fs.client_interpreter("fail2ban-client", {"fail2ban-client": str(script), "python3": "/p3"}.get) == [
        "/p3"
    ]
    script.write("#!/bin/sh\nexec true\n")
    with pytest.raises(fs.TransportError):
        fs.client_interpreter(str(script), found.get)
    with pytest.raises(fs.TransportError):
        fs.client_interpreter("fail2ban-client", {}.get)


def test_socket_from_the_config_in_read_order(tmpdir):
    tmpdir.mkdir("fail2ban.d")

    def read(path):
        with open(path) as f:
            return f.read()

    assert fs.socket_of(str(tmpdir), read) == fs.DEFAULT_SOCKET
    tmpdir.join("fail2ban.conf").write("[Definition]\nloglevel = INFO\nsocket = /run/a.sock\n")
    assert fs.socket_of(str(tmpdir), read) == "/run/a.sock"
    tmpdir.join("fail2ban.local").write("[Definition]\n# socket = /run/commented.sock\nsocket: /run/b.sock\n")
    tmpdir.join("fail2ban.d", "x.conf").write("[Definition]\nsocket = /run/c.sock\n")
    assert fs.socket_of(str(tmpdir), read) == "/run/b.sock"
    tmpdir.join("fail2ban.d", "x.local").write("[Thread]\nsocket = /run/not-definition.sock\n")
    assert fs.socket_of(str(tmpdir), read) == "/run/b.sock"


def test_answer_parsers_refuse_what_they_do_not_know():
    assert fs.answer_jails(STATUS) == ["asterisk", "sshd"]
    assert fs.answer_jails([["Number of jail", 0], ["Jail list", ""]]) == []
    assert fs.answer_status_banned(JAIL_STATUS) == ["3.3.3.3"]
    assert fs.answer_banned_ip([["asterisk"]]) == ["asterisk"]
    assert fs.answer_get_banned_ip(1) is True and fs.answer_get_banned_ip([0]) is False
    for bad in ("pong", [["Number of jail", 2]], None):
        with pytest.raises(Fail2banError):
            fs.answer_jails(bad)
    with pytest.raises(Fail2banError):
        fs.answer_status_banned([["Filter", []]])
    for bad in ("[['a']]", [["a"], ["b"]], 1):
        with pytest.raises(Fail2banError):
            fs.answer_banned_ip(bad)
    for bad in (2, "1", [1, 0]):
        with pytest.raises(Fail2banError):
            fs.answer_get_banned_ip(bad)
    with pytest.raises(Fail2banError):
        fs.answer_list("These IP addresses", "ignoreip")


# --------------------------------------------------------- in-process route, config test

CONFIGURATOR = """
import logging
import os
import sys

log = logging.getLogger("fail2ban.configurator")


class Configurator:
    def setBaseDir(self, folder):
        self.folder = folder

    def readEarly(self):
        with open(os.path.join(self.folder, "fail2ban.conf")) as f:
            self.early = dict(line.strip().split(" = ", 1) for line in f if " = " in line)

    def getEarlyOptions(self):
        return self.early

    def Reload(self):
        pass

    def readAll(self):
        self.readEarly()
        with open(os.path.join(self.folder, "jail.local")) as f:
            self.text = f.read()
        sys.stdout.write("fail2ban code printing on stdout\\n")

    def getOptions(self, %(signature)s):
        %(check)s
        if "BROKEN" in self.text:
            log.error("Errors in jail 'ghost'.")
            return False
        return True

    def convertToProtocol(self, allow_no_files=False):
        if "NOLOG" in self.text:
            raise ValueError("Have not found any log file for ghost jail")

    def getConfigStream(self):
        return []
"""
HELPERS = """
def str2LogLevel(value):
    if value not in ("INFO", "DEBUG"):
        raise ValueError("Invalid log level %r" % (value,))
    return 20
"""
# fail2ban 0.10 to 1.1: getOptions(jail, updateMainOpt, ignoreWrong) and helpers.str2LogLevel;
# 0.9: getOptions(jail) only, and no str2LogLevel.
STANDINS = {
    "0.10+": dict(
        signature="jail=None, updateMainOpt=None, ignoreWrong=True",
        check="assert jail is None and ignoreWrong is False and updateMainOpt['loglevel'] == 'INFO'",
        helpers=True,
    ),
    "0.9": dict(signature="jail=None", check="assert jail is None", helpers=False),
}


def standin_fail2ban(root, version):
    """A folder holding a fail2ban-client script and a stand-in `fail2ban` package beside it
    (ansible-test's venvs have no fail2ban; the real one is tested in tests/test_checkip_playbooks.py)."""
    spec = STANDINS[version]
    pkg = os.path.join(root, "fail2ban", "client")
    os.makedirs(pkg)
    for folder in (os.path.join(root, "fail2ban"), pkg):
        open(os.path.join(folder, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "configurator.py"), "w") as f:
        f.write(CONFIGURATOR % spec)
    if spec["helpers"]:
        with open(os.path.join(root, "fail2ban", "helpers.py"), "w") as f:
            f.write(HELPERS)
    client = os.path.join(root, "fail2ban-client")
    with open(client, "w") as f:
        f.write("#!%s\n" % sys.executable)
    conf = os.path.join(root, "conf")
    os.makedirs(conf)
    return client, conf


def write_conf(conf, jail_local, loglevel="INFO"):
    with open(os.path.join(conf, "fail2ban.conf"), "w") as f:
        f.write("loglevel = %s\n" % loglevel)
    with open(os.path.join(conf, "jail.local"), "w") as f:
        f.write(jail_local)


@pytest.mark.parametrize("version", sorted(STANDINS))
def test_the_helper_process_tests_the_config_with_fail2bans_reader(server, tmpdir, version):
    client_path, conf = standin_fail2ban(str(tmpdir), version)
    client = fs.SocketClient([sys.executable], server.path, client_path=client_path)
    try:
        write_conf(conf, "[sshd]\nenabled = true\n")
        assert client.config_test(conf) == (True, "")
        write_conf(conf, "[ghost]\nBROKEN\n")
        assert client.config_test(conf) == (False, "Errors in jail 'ghost'.")
        write_conf(conf, "[ghost]\nNOLOG\n")
        ok, message = client.config_test(conf)
        assert not ok and "Have not found any log file for ghost jail" in message
        write_conf(conf, "[sshd]\n", loglevel="LOUD")
        ok, message = client.config_test(conf)
        assert ok is (version == "0.9") and ("Invalid log level" in message) is (version != "0.9")
        # The connection is still there after the tests (and fail2ban's stdout noise).
        assert client.jails() == ["asterisk", "sshd"]
    finally:
        client.close()


def forget_fail2ban():
    for name in [m for m in sys.modules if m == "fail2ban" or m.startswith("fail2ban.")]:
        del sys.modules[name]


def test_no_fail2ban_reader_means_fail2ban_client_tests_the_config(server, tmpdir):
    """A fail2ban whose reader cannot be imported (the package beside the client raises on
    import, shadowing any installed one): None, so the module runs fail2ban-client -t."""
    tmpdir.mkdir("fail2ban").join("__init__.py").write("raise ImportError('stand-in: no reader here')\n")
    client_path = str(tmpdir.join("fail2ban-client"))
    forget_fail2ban()
    for client in (
        fs.SocketClient([sys.executable], server.path, client_path=client_path),
        fs.InProcessClient(server.path, client_path=client_path),
    ):
        try:
            assert client.config_test(str(tmpdir)) is None
            assert "cannot import fail2ban's config reader" in client.config_note
            assert "no reader here" in client.config_note
            assert client.jails() == ["asterisk", "sshd"]
        finally:
            client.close()
    forget_fail2ban()


def test_in_process_route_answers_and_tests_like_the_helper(server, tmpdir):
    """The helper's code in the module's own process (same interpreter as the client's shebang)."""
    client_path, conf = standin_fail2ban(str(tmpdir), "0.10+")
    forget_fail2ban()
    before = list(sys.path)
    client = fs.InProcessClient(server.path, client_path=client_path)
    try:
        assert client.jails() == ["asterisk", "sshd"]
        assert client.ignoreip_change("asterisk", "addignoreip", "3.3.3.3")[-1] == "3.3.3.3"
        with pytest.raises(Fail2banError):
            client.ignoreip("nosuch")
        write_conf(conf, "[ghost]\nBROKEN\n")
        assert client.config_test(conf) == (False, "Errors in jail 'ghost'.")
        assert sys.path == before  # the client's folder was on the path for the import only
    finally:
        client.close()
        forget_fail2ban()
    assert server.connections == 1 and server.received[0] == ("ping",)
    with pytest.raises(fs.TransportError):
        fs.InProcessClient(server.path + ".missing")


def test_same_interpreter_only_for_the_same_path():
    assert fs.same_interpreter(["/usr/bin/python3"], "/usr/bin/python3")
    assert fs.same_interpreter(["/usr/bin/python3", "-Es"], "/usr/bin//python3")
    assert not fs.same_interpreter(["/opt/venv/bin/python3"], "/usr/bin/python3")
    assert not fs.same_interpreter(["/usr/bin/python3"], "")
