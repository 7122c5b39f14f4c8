"""A real small disk for fault tests: a tmpfs mounted by the test (root only) that a
filler file can make full, for real ENOSPC from the kernel (no patched os.write)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


class SmallDisk:
    def __init__(self, mountpoint: Path):
        self.path = mountpoint
        self.filler = mountpoint / ".filler"

    def fill(self) -> int:
        """Write the filler until the kernel refuses a single byte more; returns its size."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):  # big blocks, then down to the last byte
                block = b"\0" * chunk
                while True:
                    try:
                        f.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        assert self.is_full(), "the disk still takes data"
        return self.filler.stat().st_size

    def is_full(self) -> bool:
        probe = self.path / ".probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return True
        finally:
            os.close(fd)
            os.unlink(probe)
        return False

    def leave(self, nbytes: int) -> None:
        """Free nbytes (whole pages) from a full disk: writes larger than that are cut short."""
        size = self.filler.stat().st_size
        os.truncate(self.filler, max(0, size - nbytes))

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()


@contextlib.contextmanager
def small_disk(mountpoint: Path, size: str = "2m") -> Iterator[SmallDisk]:
    """Mount a tmpfs of `size` on mountpoint for the block; always unmounted after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs for the disk-full tests (root needed): {proc.stderr}")
    try:
        yield SmallDisk(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
