#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: fail2ban_ignoreip
short_description: Unban and whitelist an address in fail2ban, at once and persistently
description:
  - Talks to the fail2ban server over one connection for the whole run. A helper
    started under the interpreter of C(fail2ban-client)'s shebang (the one fail2ban
    runs under, so it reads the server's pickles) speaks the server's socket protocol;
    when the module already runs under that same interpreter (the same path, Python 3),
    the helper's code runs in the module's own process instead, one Python start less.
    When that route cannot be used (the client is not a Python script, no socket,
    an unreadable answer), or with I(transport=client), every command runs through
    C(fail2ban-client) instead; C(transport) in the result says which was used.
  - With I(unban=true), first finds the jails that ban the address with
    C(fail2ban-client banned IP) (fail2ban 0.10.6+/0.11.2+), falling back to
    C(get JAIL banned IP) and then to C(status JAIL) on older servers, and unbans
    it there only (C(set JAIL unbanip IP)). Done in the same module run as the
    whitelisting, so a host costs one remote call.
  - Adds (or removes) one address to the ignore list of every jail of a running
    fail2ban server (C(set JAIL addignoreip|delignoreip)), and to a managed file
    under C(jail.d/) so that it survives C(fail2ban-client reload) and a restart.
  - The managed file holds one section per jail with
    C(ignoreip = %(known/ignoreip)s ADDR...), so every address a jail already
    ignores through jail.conf, jail.local or other jail.d files is kept, including
    jails that set their own ignoreip. A jail with no ignoreip anywhere gets the
    managed addresses alone (fail2ban cannot interpolate a missing value).
  - The file is backed up before each change and checked with fail2ban's
    configuration test; a failing check restores the previous content. On the socket
    route the helper does the test itself with fail2ban's own reader, the code
    C(fail2ban-client -t) runs (Configurator, every jail read strictly and converted
    to the server's commands), so no further process starts; otherwise, or when the
    helper cannot import that reader, C(fail2ban-client -c conf_dir -t) runs.
    C(config_test) in the result says which.
  - C(state=absent) removes only what this module manages; an address that comes
    from another config file is left alone and reported in C(kept_by_config).
  - C(state=list) changes nothing and returns the ignore lists.
version_added: "1.0.0"
author: athome-ops (@athome-ops)
options:
  ip:
    description: One IPv4 or IPv6 address. Required unless I(state=list).
    type: str
  unban:
    description: Also unban the address in the jails that ban it (needs I(ip)).
    type: bool
    default: false
  state:
    description: Whether the address should be whitelisted, or only list the whitelist.
    type: str
    choices: [present, absent, list]
    default: present
  client:
    description: The fail2ban-client executable.
    type: str
    default: fail2ban-client
  conf_dir:
    description: fail2ban configuration directory, passed as C(-c) and holding C(jail.d/).
    type: path
    default: /etc/fail2ban
  socket:
    description:
      - Server socket, passed as C(-s) when set.
      - When not set, the C(socket) of C([Definition]) in C(conf_dir)'s fail2ban.conf,
        fail2ban.d/*.conf, fail2ban.local, fail2ban.d/*.local (the one fail2ban-client uses).
    type: path
  transport:
    description:
      - C(auto) uses one socket connection through a helper under fail2ban's own
        interpreter and falls back to C(fail2ban-client) when that route fails;
        C(client) always runs C(fail2ban-client) (one process per command).
      - The configuration test (I(validate)) runs in the helper on the socket route (fail2ban's
        own reader, as C(fail2ban-client -t) reads), and as C(fail2ban-client -t) with I(transport=client)
        or when the helper cannot import fail2ban's reader.
    type: str
    choices: [auto, client]
    default: auto
  jails:
    description: Jails to act on; empty means every running jail (from C(status)).
    type: list
    elements: str
    default: []
  path:
    description: The managed file; defaults to C(conf_dir/jail.d/zz-athome-whitelist.local) (read last).
    type: path
  backup:
    description: Keep a timestamped copy of the managed file before each change.
    type: bool
    default: true
  backup_keep:
    description: Keep only the newest this many copies of the managed file (0 keeps them all).
    type: int
    default: 10
  validate:
    description:
      - Test fail2ban's configuration after writing the managed file and roll back when it fails.
      - The test is what C(fail2ban-client -c conf_dir -t) does, run by the socket helper with
        fail2ban's own reader, or C(fail2ban-client -c conf_dir -t) itself (see I(transport)).
    type: bool
    default: true
  expire_days:
    description:
      - Remove managed addresses added more than this many days ago, from the managed file and
        from the running jails (C(delignoreip)), on any run with I(state=present) or I(state=absent);
        reported in C(expired). C(0) keeps them for good.
      - The managed file dates each address on a comment line C(# added ADDR DATE) (UTC), which
        fail2ban ignores. An address without such a line (added by hand or by an older run) is
        dated by the first run with I(expire_days) set. The address of the run itself never
        expires; requested again when it was due, it is dated anew.
      - Addresses that other config files whitelist stay in those jails' runtime lists.
    version_added: "1.2.0"
    type: int
    default: 0
extends_documentation_fragment:
  - athome.voip.attributes
"""

EXAMPLES = r"""
- name: Whitelist 3.3.3.3 on every jail, now and after reloads.
  fail2ban_ignoreip:
    ip: 3.3.3.3
    state: present

- name: Unban 3.3.3.3 where it is banned and whitelist it.
  fail2ban_ignoreip:
    ip: 3.3.3.3
    unban: true

- name: Show the whitelist.
  fail2ban_ignoreip:
    state: list
  register: wl
"""

RETURN = r"""
banned_in:
  description: With I(unban), the jails that banned the address before this run.
  returned: always
  type: list
  elements: str
  sample: [asterisk]
unbanned:
  description: Jails where the address was (would be, in check mode) unbanned.
  returned: always
  type: list
  elements: str
ban_method:
  description: How bans were found (banned, get-banned or status); empty without I(unban).
  returned: always
  type: str
jails:
  description: The jails acted on.
  returned: always
  type: list
  elements: str
runtime:
  description: Each jail's runtime ignore list after the run (what it would be, in check mode).
  returned: always
  type: dict
  sample: {asterisk: [127.0.0.0/8, "::1", 3.3.3.3]}
managed:
  description: Addresses in the managed file after the run.
  returned: always
  type: list
  elements: str
whitelist:
  description: Sorted union of the runtime ignore lists of every jail.
  returned: always
  type: list
  elements: str
runtime_changed:
  description: Jails whose runtime ignore list was (would be) changed.
  returned: always
  type: list
  elements: str
file_changed:
  description: Whether the managed file was (would be) changed.
  returned: always
  type: bool
kept_by_config:
  description: With I(state=absent), jails whose other config files whitelist the address.
  returned: always
  type: list
  elements: str
transport:
  description: How the server was reached, C(socket) (one connection) or C(client) (C(fail2ban-client) per command).
  returned: always
  type: str
  sample: socket
transport_note:
  description: Why C(fail2ban-client) was used with I(transport=auto); empty otherwise.
  returned: always
  type: str
expired:
  description: Managed addresses removed (would be, in check mode) because they were older than I(expire_days).
  returned: always
  type: list
  elements: str
  sample: [4.4.4.4]
address_changed:
  description: Whether the address of this run was (would be) added or removed, at runtime or in the file.
  returned: always
  type: bool
config_test:
  description:
    - How the configuration was tested after the managed file changed; empty when it was not.
    - C(helper) (fail2ban's reader in the socket helper) or C(client) (C(fail2ban-client -t)).
  returned: always
  type: str
  sample: helper
config_test_note:
  description: Why C(fail2ban-client -t) ran on the socket route (fail2ban's reader not importable there).
  returned: always
  type: str
path:
  description: The managed file.
  returned: always
  type: str
backups_pruned:
  description: Older copies of the managed file removed (beyond I(backup_keep)).
  returned: always
  type: list
  elements: str
backup_file:
  description: The backup made before the change, if any.
  returned: changed and backup
  type: str
"""

import os
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.athome.voip.plugins.module_utils.fail2ban import (
    Client,
    Fail2banError,
    backups_to_prune,
    base_ignoreip,
    is_single_address,
    expired_addresses,
    later_overrides,
    managed_jails,
    parse_managed,
    parse_stamps,
    read_text,
    render_managed,
)
from ansible_collections.athome.voip.plugins.module_utils.fail2ban_socket import TransportError, open_client


def read(path):
    return read_text(path)


def show_runtime(runtime):
    return "".join("%s: %s\n" % (j, " ".join(sorted(runtime[j]))) for j in sorted(runtime))


def write(module, path, content):
    fd, tmp = tempfile.mkstemp(dir=module.tmpdir)
    with os.fdopen(fd, "wb") as f:
        f.write(content.encode("utf-8"))
    module.atomic_move(tmp, path)


def config_ok(module, client, executable, conf_dir, result):
    """(ok, message) of fail2ban's configuration test: in the socket helper, which already
    runs under fail2ban's interpreter and reads the config with fail2ban's own reader as
    `-t` does, else `fail2ban-client -c conf_dir -t`. result["config_test"] says which."""
    found = client.config_test(conf_dir)
    if found is not None:
        result["config_test"] = "helper"
        return found
    result["config_test"] = "client"
    result["config_test_note"] = client.config_note if client.name == "socket" else ""
    rc, out, err = module.run_command([executable, "-c", conf_dir, "-t"])
    return rc == 0, (err or out).strip()[-500:]


def restore(module, path, before):
    if before is None:
        os.unlink(path)
    else:
        write(module, path, before)


def check_config(module, client, executable, conf_dir, path, before, after, result):
    """fail2ban's config test (config_ok) on the new config; when it fails, restore the old
    file and fail.

    A config that already failed the same test without our change (a jail whose log
    file is missing) is not blamed on us: the new file is written back unvalidated,
    with a warning. The old config is tested only when the new one fails, so a
    normal change costs one test."""
    ok, message = config_ok(module, client, executable, conf_dir, result)
    if ok:
        return
    restore(module, path, before)
    baseline_ok, baseline_msg = config_ok(module, client, executable, conf_dir, result)
    if not baseline_ok:
        write(module, path, after)
        module.warn("fail2ban's config fails its own test before this change (%s); "
                    "the whitelist file is written unvalidated" % baseline_msg)
        return
    module.fail_json(
        msg="fail2ban rejected the new whitelist file, previous content restored (the address is "
        "whitelisted until the next reload): %s" % message,
        **result
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            ip=dict(type="str"),
            unban=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent", "list"]),
            client=dict(type="str", default="fail2ban-client"),
            conf_dir=dict(type="path", default="/etc/fail2ban"),
            socket=dict(type="path"),
            transport=dict(type="str", default="auto", choices=["auto", "client"]),
            jails=dict(type="list", elements="str", default=[]),
            path=dict(type="path"),
            backup=dict(type="bool", default=True),
            backup_keep=dict(type="int", default=10),
            validate=dict(type="bool", default=True),
            expire_days=dict(type="int", default=0),
        ),
        required_if=[("state", "present", ["ip"]), ("state", "absent", ["ip"]), ("unban", True, ["ip"])],
        supports_check_mode=True,
    )
    p = module.params
    ip, state = p["ip"], p["state"]
    if (state != "list" or p["unban"]) and not is_single_address(ip):
        module.fail_json(msg="not a single IPv4/IPv6 address: %r" % (ip,))
    path = p["path"] or os.path.join(p["conf_dir"], "jail.d", "zz-athome-whitelist.local")
    client, note = open_client(
        Client(module, p["client"], p["conf_dir"], p["socket"]), p["transport"], p["client"],
        p["conf_dir"], p["socket"], module.get_bin_path, read_text,
    )
    runtime_before = {}
    result = dict(
        changed=False, path=path, runtime_changed=[], file_changed=False, kept_by_config=[],
        banned_in=[], unbanned=[], ban_method="", backups_pruned=[], transport=client.name,
        transport_note=note, config_test="", config_test_note="", expired=[], address_changed=False,
    )
    try:
        run(module, p, client, path, result)
    except (Fail2banError, TransportError) as e:
        module.fail_json(msg=str(e), **result)
    finally:
        client.close()


def run(module, p, client, path, result):
    ip, state = p["ip"], p["state"]
    jails = client.jails(p["jails"])
    if p["unban"]:
        result["banned_in"], result["ban_method"] = client.banned_in(ip, jails)
    runtime = dict((j, client.ignoreip(j)) for j in jails)
    runtime_before = dict(runtime)
    before = read(path)
    # Sections already in the file stay, even for a jail that is not running now.
    file_jails = sorted(set(jails) | set(managed_jails(before)))
    base = base_ignoreip(p["conf_dir"], file_jails, exclude=path)
    managed = parse_managed(before or "")
    wanted = list(managed)
    changes = []  # (jail, client command) for the runtime
    if state == "present":
        changes = [(j, "addignoreip") for j in jails if ip not in runtime[j]]
        in_base_everywhere = all(ip in (base[j] or []) for j in file_jails)
        if ip not in wanted and not in_base_everywhere:
            wanted.append(ip)
    elif state == "absent":
        wanted = [a for a in wanted if a != ip]
        result["kept_by_config"] = [j for j in jails if ip in (base[j] or [])]
        changes = [
            (j, "delignoreip") for j in jails if ip in runtime[j] and j not in result["kept_by_config"]
        ]
    # The date each managed address was added, and those past expire_days (never this run's own).
    added, now, days = parse_stamps(before), time.time(), p["expire_days"] or 0
    if state == "present" and ip in wanted:
        if ip not in managed or expired_addresses([ip], added, now, days):
            added[ip] = now  # new here, or requested again when it was due to expire: dated anew
    if days > 0:
        for address in wanted:
            added.setdefault(address, now)  # an address without a date is dated at first sight
    if state != "list":
        result["expired"] = expired_addresses(wanted, added, now, days, keep=ip)
        wanted = [a for a in wanted if a not in result["expired"]]
    result["address_changed"] = bool(changes) or (ip in wanted) != (ip in managed)
    # 1. The runtime whitelist first, so the address cannot be banned again
    #    between its unban and its whitelisting.
    for jail, command in changes:
        result["runtime_changed"].append(jail)
        if not module.check_mode:
            runtime[jail] = client.ignoreip_change(jail, command, ip)
        elif command == "addignoreip":
            runtime[jail] = runtime[jail] + [ip]
        else:
            runtime[jail] = [a for a in runtime[jail] if a != ip]
    # 2. Then the unban.
    for jail in result["banned_in"]:
        if not module.check_mode:
            client.unban(jail, ip)
        result["unbanned"].append(jail)
    # 2b. Expired addresses leave the runtime too (not where other config files whitelist them).
    for address in result["expired"]:
        for jail in jails:
            if address in runtime[jail] and address not in (base[jail] or []):
                if not module.check_mode:
                    runtime[jail] = client.ignoreip_change(jail, "delignoreip", address)
                else:
                    runtime[jail] = [a for a in runtime[jail] if a != address]
    # 3. Then the persistent file, validated (check_config).
    after = before
    if state != "list" and (before is not None or wanted):
        after = render_managed(wanted, file_jails, base, added)
        managed = wanted
    if after != before:
        result["file_changed"] = True
        if not module.check_mode:
            if p["backup"] and before is not None:
                result["backup_file"] = module.backup_local(path)
                folder, filename = os.path.split(path)
                for old in backups_to_prune(os.listdir(folder), filename, p["backup_keep"]):
                    os.unlink(os.path.join(folder, old))
                    result["backups_pruned"].append(os.path.join(folder, old))
            write(module, path, after)
            if p["validate"]:
                check_config(module, client, p["client"], p["conf_dir"], path, before, after, result)
    overriding = later_overrides(p["conf_dir"], path, file_jails) if state != "list" else []
    if overriding:
        module.warn("these files are read after %s and set ignoreip, overriding the managed "
                    "whitelist on the next reload: %s" % (path, ", ".join(overriding)))
    result["transport"] = client.name
    result["transport_note"] = result["transport_note"] or getattr(client, "note", "")
    result["changed"] = bool(
        result["runtime_changed"] or result["file_changed"] or result["unbanned"] or result["expired"]
    )
    whitelist = set()
    for entries in runtime.values():
        whitelist.update(entries)
    result.update(jails=jails, runtime=runtime, managed=managed, whitelist=sorted(whitelist))
    if module._diff and result["changed"]:
        result["diff"] = [
            dict(before_header=path, after_header=path, before=before or "", after=after or ""),
            dict(
                before_header="runtime ignoreip",
                after_header="runtime ignoreip",
                before=show_runtime(runtime_before),
                after=show_runtime(runtime),
            ),
        ]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
