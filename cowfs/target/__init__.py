"""Target formats. Each writes clusters at image offsets and knows nothing of FUSE or jobs."""

from .qcow2 import Qcow2Target
from .raw import RawTarget

__all__ = ["Qcow2Target", "RawTarget"]
