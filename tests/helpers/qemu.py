"""QEMU's own tools as judges of qcow2 images: `qemu-img check`, `compare` and `info`."""

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.mounting import TIMEOUT

SIZE_ANSWER = re.compile(r"(qemu-io> )?[0-9.]+ (bytes|[KMGTPE]iB)")
"""qemu-io's answer to `length` (anything else is its error opening the image)."""


def qemu_img(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def qemu_json(*args: str | os.PathLike):
    result = qemu_img(*args, "--output=json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_clean(image: Path) -> dict:
    """`qemu-img check`: exit 0 and nothing leaked or corrupt; returns its JSON report."""
    result = qemu_img("check", "-f", "qcow2", "--output=json", image)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    for problem in ("leaks", "corruptions", "check-errors"):
        assert report.get(problem, 0) == 0, report
    return report


def assert_identical(image: Path, expected: Path) -> None:
    result = qemu_img("compare", "-f", "qcow2", "-F", "raw", image, expected)
    assert result.returncode == 0, result.stdout + result.stderr


@contextmanager
def qemu_io_holding(path: Path, *options: str, fmt: str = "raw") -> Iterator[str]:
    """An interactive qemu-io with `path` open (and QEMU's locks on it taken); yields its
    answer to `length` once it has given one. Ready only then: polling for its lock with
    another QEMU tool instead can make qemu-io's own open fail on that tool's lock."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", fmt, *options, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("length\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().strip()
        assert SIZE_ANSWER.fullmatch(answer), f"qemu-io did not open {path}: {answer}"
        yield answer
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
