"""A host that accepts TCP and never speaks (a tarpit on loopback) cannot hold a job: the
ssh settings of ansible.cfg give up on it, and the run reports it unreachable by name."""

from __future__ import annotations

import socket
import threading

from dispatcher import runner
from tests import servers


class Tarpit:
    """Accepts connections on a loopback port and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((servers.LOOPBACK, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_silent_host_is_reported_unreachable_and_the_others_finish(sshd, workdir, fail2ban_factory):
    tarpit = Tarpit()
    try:
        f2b = fail2ban_factory("gv1p")
        conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
        inv = servers.write_inventory(
            workdir / "inventory" / "hosts.yml",
            {
                "sip_servers": {
                    "gv1p": {"fail2ban_whitelist_conf_dir": str(f2b.dir)},
                    "gv3p": {"ansible_port": tarpit.port, "fail2ban_whitelist_conf_dir": str(f2b.dir)},
                },
                "fail2ban_servers": {"gv1p": {}, "gv3p": {}},
            },
            conn,
        )
        result = runner.run_playbook(
            "unban.yml", inventory=inv.parent, extravars={"ip": "3.3.3.3"}, timeout=600
        )
        assert result.status != "timeout", "ssh gave up on its own, the run was not cut short"
        assert result.hosts["gv3p"].status == "unreachable"
        assert any("timed out" in e.lower() or "timeout" in e.lower() for e in result.hosts["gv3p"].errors)
        assert result.hosts["gv1p"].succeeded, "the host that answers is done meanwhile"
        assert tarpit.held, "ssh really connected to the tarpit"
    finally:
        tarpit.close()
