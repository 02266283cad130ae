"""Target formats. Each writes clusters at image offsets and knows nothing of FUSE or jobs."""

from .raw import RawTarget

__all__ = ["RawTarget"]
