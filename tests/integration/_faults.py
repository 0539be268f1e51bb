"""
What the fault tests share: sending one numbered message and reading the
reply code, counting deliveries by message, small file systems that fill
up, and a process's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import smtplib
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess

__all__ = [
    "Ext4",
    "attempt",
    "deliveredCounts",
    "ext4",
    "fill",
    "logOf",
    "mounted",
    "remount",
    "rssKiB",
    "summary",
]


def attempt(port: int, ident: str, recipient: str = "user@localhost", timeout: float = 30) -> int:
    """
    Send one message carrying C{X-Test-ID: ident} on a fresh connection.

    @return: 250 when it was accepted, else the code of the reply that
        refused it (at any stage), or 0 when the connection failed.
    """
    message = f"From: s@example.org\r\nSubject: {ident}\r\nX-Test-ID: {ident}\r\n\r\n{'x' * 900}\r\n"
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=timeout) as client:
            client.sendmail("s@example.org", [recipient], message)
        return 250
    except smtplib.SMTPRecipientsRefused as e:
        return int(next(iter(e.recipients.values()))[0])
    except smtplib.SMTPResponseException as e:
        return int(e.smtp_code)
    except (OSError, smtplib.SMTPException):
        return 0


def deliveredCounts(maildir: Path) -> Counter[str]:
    """
    How many times each C{X-Test-ID} arrived in a Maildir's C{new/}.
    """
    counts: Counter[str] = Counter()
    new = maildir / "new"
    if not new.is_dir():
        return counts
    for path in new.iterdir():
        with contextlib.suppress(FileNotFoundError):
            match = re.search(rb"^X-Test-ID: (\S+)", path.read_bytes(), re.M)
            counts[match.group(1).decode() if match else "?"] += 1
    return counts


def summary(acknowledged: set[str], counts: Counter[str], **more: object) -> str:
    """
    The line every fault test prints: acknowledged, delivered, lost,
    duplicated, and what else the test measured.
    """
    lost = acknowledged - set(counts)
    duplicated = sum(1 for i in acknowledged if counts[i] > 1)
    extra = " ".join(f"{k}={v}" for k, v in more.items())
    return (
        f"acknowledged={len(acknowledged)} delivered={len(set(counts) & acknowledged)}"
        f" lost={len(lost)} duplicated={duplicated} {extra}".rstrip()
    )


@contextlib.contextmanager
def mounted(path: Path, sizeKiB: int) -> Iterator[Path]:
    """
    A tmpfs of C{sizeKiB} on C{path} for the duration.  Where mounting is
    not permitted (not root, a container without the capability) the test
    skips, except under CI (C{CI=true}), which runs as root.
    """
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={sizeKiB}k,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs ({result.stderr.strip() or result.returncode}); needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Ext4:
    """
    An ext4 file system in a file, loop-mounted with C{errors=remount-ro}:
    what a disk that reports an error does to a running server (the kernel
    makes it read-only under it; a live C{mount -o remount,ro} is refused
    while the queue's database is open for writing).
    """

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path

    def mount(self, skip: bool = True) -> None:
        result = subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            reason = f"cannot loop-mount ext4 ({result.stderr.strip()}); needs root and loop devices"
            if not skip or os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], capture_output=True)

    def fail(self) -> None:
        """
        Report an error on the file system, as a failing disk would: the
        kernel makes it read-only at once.
        """
        device = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(self.path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("mailfw fault test\n")

    def repair(self) -> None:
        """
        What the operator does: unmount, check, mount again.
        """
        subprocess.run(["umount", str(self.path)], check=True, capture_output=True)
        subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True)
        self.mount(skip=False)


@contextlib.contextmanager
def ext4(path: Path, sizeMiB: int) -> Iterator[Ext4]:
    """
    An L{Ext4} of C{sizeMiB} mounted on C{path} for the duration.
    """
    path.mkdir(parents=True, exist_ok=True)
    image = path.parent / f"{path.name}.ext4"
    subprocess.run(["truncate", "-s", f"{sizeMiB}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    fs = Ext4(image, path)
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()
        image.unlink()


def remount(path: Path, mode: str) -> None:
    """
    Make the tmpfs on C{path} read-only (C{"ro"}) or writable (C{"rw"}).
    """
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(directory: Path) -> Path:
    """
    Fill the file system of C{directory} to the last block with one file.

    @return: the file, to remove when space should return.
    """
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (b"\0" * 65536, b"\0" * 512):
            try:
                while True:
                    f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def rssKiB(pid: int) -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def logOf(server: MailfwProcess) -> str:
    """
    The whole log of C{server}.
    """
    assert server.logPath is not None
    return server.logPath.read_text("utf-8", "replace") if server.logPath.exists() else ""
