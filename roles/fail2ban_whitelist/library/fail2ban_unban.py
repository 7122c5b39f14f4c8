#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: fail2ban_unban
short_description: Find the fail2ban jails that ban an address and unban it there
description:
  - Asks a running fail2ban server which jails ban one address, with
    C(fail2ban-client banned IP) (fail2ban 0.10.6+/0.11.2+), falling back to
    C(get JAIL banned IP) and then to C(status JAIL) on older servers.
  - Unbans the address in those jails only (C(set JAIL unbanip IP)).
  - Nothing else is unbanned. In check mode nothing is unbanned.
version_added: "1.0.0"
author: athome-ops
options:
  ip:
    description: One IPv4 or IPv6 address (validated again here; the play validates it first).
    type: str
    required: true
  unban:
    description: Unban the address where it is banned. With C(false) only report.
    type: bool
    default: true
  client:
    description: The fail2ban-client executable.
    type: str
    default: fail2ban-client
  conf_dir:
    description: fail2ban configuration directory, passed as C(-c).
    type: path
    default: /etc/fail2ban
  socket:
    description: Server socket, passed as C(-s) when set (otherwise the one in C(conf_dir)).
    type: path
  jails:
    description: Jails to look at; empty means every running jail (from C(status)).
    type: list
    elements: str
    default: []
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Unban 3.3.3.3 wherever it is banned.
  fail2ban_unban:
    ip: 3.3.3.3
    conf_dir: /etc/fail2ban
"""

RETURN = r"""
jails:
  description: The jails looked at.
  returned: always
  type: list
  elements: str
  sample: [asterisk, sshd]
banned_in:
  description: Jails that banned the address before this run.
  returned: always
  type: list
  elements: str
  sample: [asterisk]
unbanned:
  description: Jails where the address was unbanned (would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [asterisk]
method:
  description: How bans were found (banned, get-banned or status).
  returned: always
  type: str
  sample: banned
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.athome_fail2ban import Client, Fail2banError, is_single_address


def main():
    module = AnsibleModule(
        argument_spec=dict(
            ip=dict(type="str", required=True),
            unban=dict(type="bool", default=True),
            client=dict(type="str", default="fail2ban-client"),
            conf_dir=dict(type="path", default="/etc/fail2ban"),
            socket=dict(type="path"),
            jails=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    ip = module.params["ip"]
    if not is_single_address(ip):
        module.fail_json(msg="not a single IPv4/IPv6 address: %r" % (ip,))
    client = Client(module, module.params["client"], module.params["conf_dir"], module.params["socket"])
    try:
        jails = client.jails(module.params["jails"])
        banned_in, method = client.banned_in(ip, jails)
        unbanned = []
        if module.params["unban"]:
            for jail in banned_in:
                if not module.check_mode:
                    client.call("set", jail, "unbanip", ip)
                unbanned.append(jail)
    except Fail2banError as e:
        module.fail_json(msg=str(e))
    module.exit_json(changed=bool(unbanned), jails=jails, banned_in=banned_in, unbanned=unbanned, method=method)


if __name__ == "__main__":
    main()
