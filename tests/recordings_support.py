"""Generated recordings for the RAMAIS tests and bench: local trees, S3 buckets, expectations.

The expected selection is computed from what the generator *meant* to write
(direction, which side holds the extension, call time), never by parsing the
names again, so the modules' parser is checked against an independent truth.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from tests.collection_paths import MODULE_UTILS, MODULES

DIRECTIONS = ("in", "out", "external", "q", "internal")
# 112 is a substring of 1121, 1121 of 11210; phone numbers below contain them too.
EXTENSIONS = ("112", "1121", "1122", "11210", "2010", "3001", "1013010")
SUFFIXES = ("wav", "wav", "wav", "mp3", "gsm")


def helpers():
    """The collection's plugins/module_utils/recordings.py, imported straight from its file."""
    spec = importlib.util.spec_from_file_location("athome_recordings", MODULE_UTILS / "recordings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def s3_module(helpers_module=None):
    """The collection's recordings_s3_select module, imported with its module_utils import satisfied."""
    sys.modules["ansible_collections.athome.voip.plugins.module_utils.recordings"] = (
        helpers_module or helpers()
    )
    spec = importlib.util.spec_from_file_location("recordings_s3_select", MODULES / "recordings_s3_select.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class Call:
    direction: str
    dst: str
    src: str
    when: datetime
    uniqueid: str
    suffix: str

    @property
    def name(self) -> str:
        return (
            f"{self.direction}-{self.dst}-{self.src}-{self.when:%Y%m%d}-{self.when:%H%M%S}-"
            f"{self.uniqueid}.{self.suffix}"
        )

    @property
    def parties(self) -> set[str]:
        """The extensions this call belongs to (what the generator put where)."""
        if self.direction in ("in", "external", "q"):
            return {self.dst}
        if self.direction == "out":
            return {self.src}
        return {self.dst, self.src}

    def relpath(self, layout: str) -> str:
        return f"{self.when:%Y/%m/%d}/{self.name}" if layout == "dated" else self.name

    def body(self) -> bytes:
        """Distinct content per file (its own name, repeated) so ZIP entries can be compared."""
        reps = 1 + int(self.uniqueid.split(".")[1]) % 7
        return (self.name + "\n").encode() * reps


def phone(rng: random.Random) -> str:
    # Phone numbers that embed extensions (112, 1121, 1122...) as substrings.
    embed = rng.choice(("", "1121", "112", "1122", "11210", "2010"))
    digits = "55" + "".join(rng.choice("0123456789") for _ in range(11 - len(embed)))
    pos = rng.randint(2, len(digits))
    return digits[:pos] + embed + digits[pos:]


def make_call(
    rng: random.Random,
    when: datetime,
    direction: str | None = None,
    ext: str | None = None,
    seq: list | None = None,
) -> Call:
    direction = direction or rng.choice(DIRECTIONS)
    ext = ext or rng.choice(EXTENSIONS)
    other = phone(rng)
    if direction in ("in", "external", "q"):
        dst, src = ext, other
    elif direction == "out":
        dst, src = other, ext
    else:  # internal: extension to extension
        dst, src = ext, rng.choice([e for e in EXTENSIONS if e != ext])
    if seq is None:
        seq = [0]
    seq[0] += 1
    uniqueid = f"{int(when.timestamp())}.{seq[0]}"
    return Call(direction, dst, src, when, uniqueid, rng.choice(SUFFIXES))


def generate_calls(
    days: list[date], per_day: int, seed: int = 5, boundaries: list[datetime] = ()
) -> list[Call]:
    """per_day random calls on each day, plus calls at each boundary instant for every extension."""
    rng = random.Random(seed)
    seq = [0]
    calls = []
    for day in days:
        base = datetime(day.year, day.month, day.day)
        for _ in range(per_day):
            calls.append(make_call(rng, base + timedelta(seconds=rng.randrange(86400)), seq=seq))
    for when in boundaries:
        for direction in ("in", "out"):
            for ext in ("112", "1121"):
                calls.append(make_call(rng, when, direction, ext, seq=seq))
    return calls


def write_tree(root: Path, calls: list[Call], layout: str) -> None:
    made = set()
    for call in calls:
        path = root / call.relpath(layout)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(call.body())


def expected(calls: list[Call], extensions: list[str], start: str, end: str) -> list[Call]:
    """The calls the request must select: start <= when <= end + 59 s, extension is a party."""
    low = datetime.strptime(start, "%Y-%m-%d %H:%M")
    high = datetime.strptime(end, "%Y-%m-%d %H:%M") + timedelta(seconds=59)
    wanted = set(extensions)
    return sorted(
        (c for c in calls if low <= c.when <= high and c.parties & wanted),
        key=lambda c: (c.when, c.name),
    )


def seed_bucket(
    s3_server, bucket: str, prefix: str, calls: list[Call], layout: str = "dated", threads: int = 8
) -> None:
    """Create the bucket with boto3, then PUT the objects through the SeaweedFS filer HTTP
    API (no S3 signing: about 1,000 objects/s, recipe 06); they are listed by S3 at once."""
    client = s3_server.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    base = f"http://127.0.0.1:{s3_server.filer_port}/buckets/{bucket}/{prefix}"

    def put(call: Call) -> None:
        req = urllib.request.Request(base + call.relpath(layout), data=call.body(), method="PUT")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status in (200, 201), resp.status

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, calls))


def s3_env(s3_server) -> dict[str, str]:
    """What the controller-side module needs to find its credentials: the path of the sandbox's
    0600 credentials file (the keys themselves never enter an environment)."""
    return s3_server.credentials_file()
