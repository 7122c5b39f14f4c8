"""Secrets stay out of process arguments, environments and what a run leaves on disk.

- Extravars go to <private data dir>/env/extravars (0600, every string `!unsafe`),
  never on the ansible-playbook command line that every local user can read.
- S3 keys found in the environment move into state/aws/credentials (0600); no
  ansible process inherits them.
- Private data dirs live under state/run/ and what a killed service left there is
  removed at the next start.

Real parts: SeaweedFS S3 and sshd on loopback, ansible-runner, the `athome` CLI.
Processes are observed through /proc (Linux), as another local user would.
"""

from __future__ import annotations

import configparser
import contextlib
import email
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import date, datetime
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from dispatcher import config, runner
from dispatcher.auth import ServerKey
from dispatcher.errors import ConfigError
from dispatcher.jobqueue import DirQueue
from dispatcher.service import Dispatcher
from tests import recordings_support as rs
from tests import servers
from tests.messages import AUTH
from tests.servers import wait_for

REPO = Path(__file__).resolve().parent.parent
REQUESTER = "ana@example.test"
IMAP_PASSWORD = "imap-pw-run-secrets-7c1f"
SMTP_PASSWORD = "smtp-pw-run-secrets-9e4a"
SMTP_USER = "service@example.test"
# Stands for the rest of the service's environment: ansible processes inherit it (that
# proves the sampler reads environments), kept artifacts must not record it.
CANARY_VAR, CANARY = "ATHOME_TEST_ENV_CANARY", "canary-4b1d-environment"
BUCKET, RESULTS = "athome-secrets-voip1", "athome-secrets-results"
DAY = date(2025, 11, 4)
CALLS = rs.generate_calls([DAY], 60, seed=11)
WINDOW = ("2025-11-04 00:00", "2025-11-04 23:59")  # as intake queues it (ISO)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secrets_of(s3) -> list[str]:
    return [s3.ACCESS_KEY, s3.SECRET_KEY]


# ------------------------------------------------------------------ /proc sampler


class ProcSampler(threading.Thread):
    """Reads /proc/<pid>/cmdline and environ of every ansible process below `root` (and of
    what those start: ssh, the module's Python) until stopped. Processes that vanish while
    being read are skipped. `root` itself is not sampled: its own environ block is what
    it was started with (systemd's EnvironmentFile) and only its user and root may read it."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.done = threading.Event()
        self.seen: dict[tuple[int, bytes], set[bytes]] = {}  # (pid, cmdline) -> environ blocks
        self.extravars_modes: dict[str, int] = {}  # `-e @FILE` -> its mode while in use

    def __enter__(self) -> ProcSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(timeout=30)
        self.sample()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(0.01)

    def _tree(self) -> tuple[dict[int, int], dict[int, bytes]]:
        parents, cmdlines = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat_line = Path(f"/proc/{pid}/stat").read_bytes()
                parents[pid] = int(stat_line.rsplit(b")", 1)[1].split()[1])
                cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
        return parents, cmdlines

    def _watched(self, pid: int, parents: dict[int, int], cmdlines: dict[int, bytes]) -> bool:
        """Below root, with a process whose cmdline says ansible on the way (itself included)."""
        ansible, hops = False, 0
        while pid in parents and hops < 64:
            if pid == self.root:
                return ansible
            ansible = ansible or b"ansible" in cmdlines.get(pid, b"")
            pid, hops = parents[pid], hops + 1
        return False

    def sample(self) -> None:
        parents, cmdlines = self._tree()
        for pid, cmdline in cmdlines.items():
            if pid == self.root or not cmdline or not self._watched(pid, parents, cmdlines):
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            self.seen.setdefault((pid, cmdline), set()).add(environ)
            args = cmdline.split(b"\0")
            for flag, value in zip(args, args[1:], strict=False):
                if flag == b"-e" and value.startswith(b"@"):
                    with contextlib.suppress(OSError):
                        self.extravars_modes[value[1:].decode()] = mode(Path(value[1:].decode()))

    @property
    def playbooks(self) -> list[bytes]:
        return [cmd for (_pid, cmd) in self.seen if b"ansible-playbook" in cmd]

    def assert_clean(self, secrets: list[str], not_on_cmdline: list[str]) -> None:
        assert self.playbooks, "the sampler saw no ansible-playbook process: nothing was checked"
        for (pid, cmdline), environs in self.seen.items():
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            for secret in secrets:
                assert secret.encode() not in cmdline, f"secret on the command line of {pid}: {shown}"
                for environ in environs:
                    assert secret.encode() not in environ, f"secret in the environment of {pid}: {shown}"
            for value in not_on_cmdline:
                assert value.encode() not in cmdline, f"{value!r} on the command line of {pid}: {shown}"
        extravars = [a for cmd in self.playbooks for a in cmd.split(b"\0") if a.startswith(b"@")]
        assert extravars and all(a.endswith(b"/env/extravars") for a in extravars), self.playbooks
        assert self.extravars_modes and set(self.extravars_modes.values()) == {0o600}, self.extravars_modes


def files_under(root: Path) -> list[Path]:
    return [Path(d, f) for d, _dirs, files in os.walk(root) for f in files]


def holders(root: Path, needles: list[str], skip: tuple[Path, ...] = ()) -> list[str]:
    """Every file under root (skip excepted) that contains one of the needles."""
    found = []
    for path in files_under(root):
        if path in skip:
            continue
        with contextlib.suppress(FileNotFoundError):
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return found


# ------------------------------------------------------------------ unit: extravars file


def test_extravars_file_tags_every_string_unsafe_and_is_private(tmp_path):
    from ansible.parsing.dataloader import DataLoader
    from ansible.utils.unsafe_proxy import AnsibleUnsafeText

    values = {
        "requester": "{{ 7*7 }}@example.com",
        "extensions": ["1121", "0012"],
        "nested": {"note": "{% raw %}x", "list": [{"deep": "ação"}]},
        "count": 3,
        "check": True,
        "nothing": None,
    }
    path = runner.write_extravars(tmp_path, values)
    assert path == tmp_path / "env" / "extravars"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    loaded = DataLoader().load_from_file(str(path))
    assert loaded == values, "Ansible reads back exactly what was written"
    for text in (
        loaded["requester"],
        loaded["nested"]["note"],
        loaded["nested"]["list"][0]["deep"],
    ):
        assert isinstance(text, AnsibleUnsafeText), repr(text)
    # a text a loader would read as a number stays quoted text, untagged: ansible-core 2.19
    # resolves an `!unsafe` scalar's type again (`!unsafe '0012'` -> 10); it holds no template
    assert "- '0012'" in path.read_text() and all(type(e) is not int for e in loaded["extensions"])
    assert all(not isinstance(k, AnsibleUnsafeText) for k in loaded), "keys stay plain"
    assert loaded["count"] == 3 and loaded["check"] is True and loaded["nothing"] is None
    assert "!unsafe '{{ 7*7 }}@example.com'" in path.read_text()


def test_scrub_removes_only_leftover_run_dirs(tmp_path):
    root = tmp_path / "run"
    assert runner.scrub_private_dirs(root) == 0, "no root yet: nothing to do"
    left = root / "athome-run-abc123"
    (left / "artifacts" / "job-1").mkdir(parents=True)
    (left / "artifacts" / "job-1" / "command").write_text('{"env": {"X": "y"}}')
    (left / "env").mkdir()
    (left / "env" / "extravars").write_text("a: 1\n")
    other = root / "not-ours"
    other.mkdir()
    assert runner.scrub_private_dirs(root) == 1
    assert not left.exists() and other.is_dir()


def test_a_run_under_private_root_leaves_nothing_and_keeps_no_environment(tmp_path, monkeypatch):
    """audios.yml refused on localhost (no host needed): the private dir goes, the kept
    artifacts hold neither the recorded environment nor the extravars file."""
    monkeypatch.setenv(CANARY_VAR, CANARY)
    root, kept = tmp_path / "state" / "run", tmp_path / "state" / "artifacts"
    inventory = servers.write_inventory(tmp_path / "inv.yml", {"sip_servers": {}})
    result = runner.run_playbook(
        "audios.yml",
        inventory=inventory,
        extravars={"server": "nowhere", "request_id": "req-priv-1", "requester": "{{ 7*7 }}@x.example"},
        timeout=120,
        artifacts_dir=kept,
        ident="req-priv-1-1",
        private_root=root,
    )
    errors = result.errors + [e for h in result.hosts.values() for e in h.errors]
    assert result.status == "failed" and "Bad request" in " ".join(errors), result.to_dict()
    assert root.is_dir() and mode(root) == 0o700 and list(root.iterdir()) == []
    names = {p.name for p in (kept / "req-priv-1-1").iterdir()}
    assert "stdout" in names and "job_events" in names
    assert not names & {"command", "env", "fact_cache"}, names
    assert holders(kept, [CANARY]) == []


# ------------------------------------------------------------------ unit: cloud credentials


def _cfg(tmp_path: Path, **extra) -> config.Config:
    data = {
        "state_dir": str(tmp_path / "state"),
        "mail": {
            "transport": "maildir",
            "from_address": "ops@example.test",
            "admin_addresses": ["admin@example.test"],
            "maildir": {"inbox": "in", "outbox": "out"},
        },
        "auth": {"senders": [REQUESTER], "tokens_file": "tokens.json", **AUTH},
        **extra,
    }
    return config.from_dict(data, base=tmp_path)


@pytest.fixture
def aws_env(monkeypatch):
    """Whatever the config puts in os.environ is undone after the test."""
    for name in (*config.AWS_SECRET_VARS, "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    return monkeypatch


def test_s3_keys_leave_the_environment_for_a_private_credentials_file(tmp_path, aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret/with%percent")
    aws_env.setenv("AWS_SESSION_TOKEN", "session-token")
    cfg = _cfg(tmp_path)
    path = tmp_path / "state" / "aws" / "credentials"
    assert cfg.aws_credentials_file == path
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path)
    assert not set(config.AWS_SECRET_VARS) & set(os.environ), "no process started from now on inherits them"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["credentials"], "no temporary left behind"
    parser = configparser.RawConfigParser()
    parser.read(path)
    assert dict(parser["default"]) == {
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "secret/with%percent",
        "aws_session_token": "session-token",
    }
    import botocore.session

    creds = botocore.session.Session().get_credentials()
    assert (creds.access_key, creds.secret_key, creds.method) == (
        "AKIDEXAMPLE",
        "secret/with%percent",
        "shared-credentials-file",
    )


def test_half_a_key_pair_is_refused_without_quoting_it(tmp_path, aws_env):
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "lonely-secret-value")
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path)
    text = " ".join(err.value.problems)
    assert "without AWS_ACCESS_KEY_ID" in text and "lonely-secret-value" not in text
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert not (tmp_path / "state" / "aws").exists()


def test_an_explicit_credentials_file_is_pointed_at_and_checked(tmp_path, aws_env):
    own = tmp_path / "aws-credentials"
    own.write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    cfg = _cfg(tmp_path, recordings={"aws_credentials_file": "aws-credentials"})
    assert cfg.aws_credentials_file == own and cfg.secret_problems == []
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(own)
    assert not (tmp_path / "state" / "aws").exists()

    missing = _cfg(tmp_path, recordings={"aws_credentials_file": "nope"})
    assert any("recordings.aws_credentials_file: cannot read" in p for p in missing.secret_problems)

    aws_env.setenv("AWS_ACCESS_KEY_ID", "A2")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "B2")
    both = _cfg(tmp_path, recordings={"aws_credentials_file": "aws-credentials"})
    assert any("one way only" in p for p in both.secret_problems)
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ, "taken out even when refused"

    with pytest.raises(ConfigError, match="recordings: unknown key 'aws_profile'"):
        _cfg(tmp_path, recordings={"aws_profile": "x"})


# ------------------------------------------------------------------ through the dispatcher


def s3_inventory(path: Path, endpoint: str) -> Path:
    return servers.write_inventory(
        path,
        {
            "sip_servers": {
                "voip1": {
                    "ansible_host": "127.0.0.1",
                    "audios_from": "s3",
                    "recordings_s3_bucket": BUCKET,
                    "recordings_s3_prefix": "voip1",
                    "recordings_s3_endpoint_url": endpoint,
                    "recordings_s3_results_bucket": RESULTS,
                    "recordings_s3_results_prefix": "ramais/",
                    "recordings_s3_url_expiry": 600,
                }
            },
            "recordings": {"audio": {"ansible_host": "127.0.0.1"}},  # not contacted on the S3 route
        },
    )


@pytest.fixture
def seeded_s3(s3_server):
    rs.seed_bucket(s3_server, BUCKET, "voip1/", CALLS)
    client = s3_server.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=RESULTS)
    return s3_server


class Site:
    """A Dispatcher in this process on the Maildir transport (as tests/test_dispatch_commands.py).

    Jobs are queued directly, as intake would queue them: what is under test is the run."""

    def __init__(self, workdir: Path, inventory: Path):
        self.workdir = workdir
        self.cfg = config.from_dict(
            {
                "state_dir": str(workdir / "state"),
                "inventory": str(inventory.parent),
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@example.test",
                    "admin_addresses": ["admin@example.test"],
                    "maildir": {"inbox": str(workdir / "inbox"), "outbox": str(workdir / "outbox")},
                },
                "auth": {"senders": [REQUESTER], "tokens_file": str(workdir / "tokens.json"), **AUTH},
                "worker": {"retry_backoff": [0], "playbook_timeout": 300},
            },
            base=workdir,
        )
        self.cfg.server_key().get(create=True)  # what `athome token add` makes at installation
        self.dispatcher = Dispatcher(self.cfg)

    def result_text(self) -> str:
        box = self.workdir / "outbox"
        texts = [
            email.message_from_bytes(p.read_bytes(), policy=default_policy)
            for sub in ("new", "cur")
            for p in (box / sub).glob("*")
        ]
        assert len(texts) == 1, [m["Subject"] for m in texts]
        return texts[0].get_body(("plain",)).get_content()


def ramais_job(server: str, requester: str, start: str, end: str) -> dict:
    """The job intake queues for `RAMAIS=1121 SERVER=<server> INICIO=<start> FIM=<end>`."""
    shown = [datetime.strptime(t, "%Y-%m-%d %H:%M").strftime("%d/%m/%Y %H:%M") for t in (start, end)]
    return {
        "command": "RAMAIS",
        "params": {"extensions": ["1121"], "server": server, "start": start, "end": end},
        "command_text": f"RAMAIS=1121 SERVER={server} INICIO={shown[0]} FIM={shown[1]}",
        "requester": requester,
        "message_id": f"<{time.time()}@example.test>",
        "references": "",
    }


def test_s3_ramais_run_shows_no_secret_to_any_process_or_artifact(workdir, seeded_s3, aws_env):
    s3 = seeded_s3
    # The service's environment as systemd gives it: S3 keys (athome.env) and the rest.
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3.ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3.SECRET_KEY)
    aws_env.setenv("AWS_CONFIG_FILE", os.devnull)
    aws_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws_env.setenv(CANARY_VAR, CANARY)
    site = Site(workdir, s3_inventory(workdir / "inventory" / "hosts.yml", s3.endpoint))
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(site.cfg.state_dir / "aws" / "credentials")

    job = site.dispatcher.jobs.put(ramais_job("voip1", REQUESTER, *WINDOW))
    with ProcSampler(os.getpid()) as sampler:
        assert site.dispatcher.work_once() == 1

    sampler.assert_clean(secrets_of(s3), not_on_cmdline=[REQUESTER, job.id])
    assert any(CANARY.encode() in env for envs in sampler.seen.values() for env in envs), (
        "the sampler reads the environments it checks"
    )
    # The run worked with the keys from the file: a presigned link to the ZIP.
    want = rs.expected(CALLS, ["1121"], *WINDOW)
    text = site.result_text()
    assert want and f"{len(want)} gravações" in text, text
    assert f"{s3.endpoint}/{RESULTS}/ramais/" in text
    # Nothing of the run is left in state/run; kept artifacts hold no environment.
    run_dir = site.cfg.state_dir / "run"
    assert mode(run_dir) == 0o700 and list(run_dir.iterdir()) == []
    [kept] = list(site.cfg.artifacts_dir.iterdir())
    assert kept.name == f"{job.id}-1"
    assert not {p.name for p in kept.iterdir()} & {"command", "env", "fact_cache"}
    # The access key id is in the presigned URL (that is how S3 links work); the secret never is.
    assert holders(site.cfg.artifacts_dir, [s3.SECRET_KEY, CANARY]) == []
    creds = site.cfg.state_dir / "aws" / "credentials"
    assert holders(site.cfg.state_dir, [s3.SECRET_KEY, CANARY], skip=(creds,)) == []


@pytest.fixture
def legacy_site(sshd, workdir):
    conn = dict(sshd.ansible_vars(), ansible_python_interpreter=servers.target_python())
    queue = workdir / "fila_audios"
    for sub in ("pending", "processing", "completed", "failed"):
        (queue / sub).mkdir(parents=True)
    inv = servers.write_inventory(
        workdir / "inventory" / "hosts.yml",
        {
            "sip_servers": {"gv1p": {"audios_from": "audio"}},
            "recordings": {
                "audio": {
                    "recordings_root": str(workdir / "tree"),
                    "recordings_publish_dir": str(workdir / "www"),
                    "recordings_publish_base_url": "http://127.0.0.1:9/recordings",
                    "recordings_legacy_queue": True,
                    "recordings_legacy_queue_dir": str(queue),
                }
            },
        },
        conn,
    )
    return Site(workdir, inv), queue


def test_a_requester_that_looks_like_a_template_reaches_the_host_literally(legacy_site):
    site, queue = legacy_site
    requester = "{{7*7}}@example.com"  # the whitelist would refuse it; the job is built directly
    job = site.dispatcher.jobs.put(ramais_job("gv1p", requester, "2025-11-03 08:00", "2025-11-04 18:30"))
    assert site.dispatcher.work_once() == 1
    done = [j.id for j in site.dispatcher.jobs.list("done")]
    assert done == [job.id], [j.result for j in site.dispatcher.jobs.list("failed")]
    doc = json.loads((queue / "pending" / f"{job.id}.json").read_text())
    assert doc["from_email"] == requester and doc["parameters"]["email"] == requester
    assert "49@example.com" not in json.dumps(doc)


# ------------------------------------------------------------------ the service killed mid-run


class StallServer:
    """Accepts TCP connections on loopback and never answers: an S3 endpoint that hangs,
    so the playbook is certainly in the middle of its S3 step when the test looks."""

    def __init__(self):
        self.sock = socket.create_server((servers.LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture(scope="module")
def submission(scratch):
    cert, key = scratch / "secrets-smtp.crt", scratch / "secrets-smtp.key"
    servers.make_cert(cert, key)
    sink = servers.SMTPSink(cert=cert, key=key, login=SMTP_USER, password=SMTP_PASSWORD).start()
    yield sink
    sink.stop()


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                line = Path(f"/proc/{entry.name}/stat").read_bytes()
                parents[int(entry.name)] = int(line.rsplit(b")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_a_service_killed_mid_run_leaves_no_secret_and_the_next_start_removes_its_run_dir(
    workdir, seeded_s3, submission
):
    s3 = seeded_s3
    smtp = submission.reset()
    stall = StallServer()
    inventory = s3_inventory(workdir / "inventory" / "hosts.yml", f"http://127.0.0.1:{stall.port}")
    cfg_path = workdir / "athome.yml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "state_dir": "state",
                "inventory": str(inventory.parent),
                "mail": {
                    "transport": "imap",
                    "from_address": SMTP_USER,
                    "admin_addresses": ["admin@example.test"],
                    "imap": {  # `athome work` never reads the mailbox
                        "host": "127.0.0.1",
                        "port": 9,
                        "security": "plain",
                        "user": SMTP_USER,
                        "password_env": "ATHOME_TEST_IMAP_PW",
                    },
                    "smtp": {
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "security": "starttls",
                        "user": SMTP_USER,
                        "password_env": "ATHOME_TEST_SMTP_PW",
                        "cafile": str(smtp.cert),
                    },
                },
                "auth": {"senders": [REQUESTER], "tokens_file": "tokens.json", **AUTH},
                "worker": {"retry_backoff": [0], "playbook_timeout": 300, "poll_interval": 1},
            }
        )
    )
    ServerKey(workdir / "athome.key").get(create=True)  # what `athome token add` makes
    state = workdir / "state"
    job = DirQueue(state / "queue").put(ramais_job("voip1", REQUESTER, *WINDOW))
    env = dict(
        os.environ,
        ATHOME_TEST_IMAP_PW=IMAP_PASSWORD,
        ATHOME_TEST_SMTP_PW=SMTP_PASSWORD,
        AWS_ACCESS_KEY_ID=s3.ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=s3.SECRET_KEY,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    env.pop("AWS_SHARED_CREDENTIALS_FILE", None)
    secrets = [*secrets_of(s3), IMAP_PASSWORD, SMTP_PASSWORD]
    cmd = [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg_path), "work"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_root = state / "run"
    try:
        with ProcSampler(proc.pid) as sampler:
            wait_for(lambda: stall.accepted, "the playbook's S3 request", proc=proc)
            left = list(run_root.glob("athome-run-*"))
            assert len(left) == 1 and list(left[0].glob("artifacts/*/command")), "a run is in progress"
            # SIGKILL, then what was below it, as systemd does with the unit's cgroup.
            below = descendants(proc.pid)
            proc.kill()
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
            wait_for(lambda: all(gone(p) for p in below), "the killed run's processes to go")
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read().decode(errors="replace")
        stall.close()
    sampler.assert_clean(secrets, not_on_cmdline=[REQUESTER, job.id])

    # What the killed run left: its private data dir (recorded environment, extravars)...
    [leftover] = list(run_root.glob("athome-run-*"))
    assert (leftover / "env" / "extravars").is_file()
    assert mode(run_root) == 0o700 and mode(leftover) == 0o700
    # ...and not one secret in any file under the state dir but the credentials file.
    creds = state / "aws" / "credentials"
    assert mode(creds) == 0o600 and mode(creds.parent) == 0o700
    assert holders(state, secrets, skip=(creds,)) == [], output
    assert s3.SECRET_KEY in creds.read_text()

    # The next start recovers: the leftover goes, the job runs again, against the real S3.
    s3_inventory(inventory, s3.endpoint)
    again = subprocess.run([*cmd, "--once"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "removed 1 private data dir" in again.stderr
    assert not leftover.exists() and list(run_root.iterdir()) == []
    [done] = DirQueue(state / "queue").list("done")
    assert done.id == job.id and done.attempts == 2
    [(_, rcpt, msg)] = smtp.wait_for(1)
    text = email.message_from_bytes(msg.as_bytes(), policy=default_policy).get_body(("plain",)).get_content()
    assert rcpt == [REQUESTER] and f"{s3.endpoint}/{RESULTS}/ramais/" in text, text
    # The access key id now sits in the presigned link of the reply; the secrets never.
    assert holders(state, [s3.SECRET_KEY, IMAP_PASSWORD, SMTP_PASSWORD], skip=(creds,)) == []
