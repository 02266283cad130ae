"""QEMU's own tools as judges of qcow2 images: `qemu-img check`, `compare` and `info`."""

import json
import os
import subprocess
from pathlib import Path


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
