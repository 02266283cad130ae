"""Error policies: what a failed copy means for the job (QEMU's on-source-error,
on-target-error and on-cbw-error).

Owns the decision only; the job carries it out. Never retries or sleeps itself.
"""

import enum
import errno

from .transfer import SourceError

RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
"""`ignore` retries a failing cluster after 0.1 s, doubling up to 5 s: quick for a
transient error, and a persistent one costs a log line every 5 s, not a busy loop."""


class SourcePolicy(enum.StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


class TargetPolicy(enum.StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"
    ENOSPC = "enospc"


class CbwPolicy(enum.StrEnum):
    BREAK_SNAPSHOT = "break-snapshot"
    """The guest write proceeds; the backup fails with the reason (QEMU 7.1's default)."""
    BREAK_GUEST_WRITE = "break-guest-write"
    """The guest write fails with EIO; the backup goes on (QEMU before 7.1)."""


class Action(enum.Enum):
    FAIL = "fail"
    RETRY = "retry"
    STOP = "stop"


def copier_action(error: OSError, on_source: SourcePolicy, on_target: TargetPolicy) -> Action:
    """What the copier does after `error` (a SourceError or TargetError)."""
    policy = on_source if isinstance(error, SourceError) else on_target
    match policy:
        case "report":
            return Action.FAIL
        case "ignore":
            return Action.RETRY
        case "stop":
            return Action.STOP
        case "enospc":
            return Action.STOP if error.errno == errno.ENOSPC else Action.FAIL
    raise AssertionError(f"unknown policy {policy!r}")


def retry_delay(failures: int) -> float:
    """Seconds to wait before retry number `failures` (1, 2, ...)."""
    return min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
