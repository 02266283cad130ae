"""The QEMU anchor, `../shared/anchors/qemu_backup.py`, as every module of the bench sees it.

Why a stand-in: the anchor's directory is known only once `--anchors` is parsed, but
the modules of this package refer to it at import time (`from .anchor import qb`). `qb`
answers with the anchor's attributes once `load()` has imported it, and raises before.
The anchor is imported, never copied: its image, writer, comparison and latency helpers
are the ones QEMU's side of the bench runs too, so both sides measure alike.
"""

import sys
from pathlib import Path
from types import ModuleType
from typing import Any


class _Anchor:
    """Stands for the anchor module: attribute reads go to it once `load()` has run."""

    module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if self.module is None:
            raise RuntimeError(f"qb.{name}: the anchor is not loaded yet (anchor.load)")
        return getattr(self.module, name)


qb: Any = _Anchor()
"""The anchor module (`qemu_backup`), after `load()`."""


def load(directory: Path) -> None:
    """Import `qemu_backup` from `directory`, quiet (its own bench logs nothing)."""
    sys.path.insert(0, str(directory))
    import qemu_backup  # the path is known only at run time

    qemu_backup.QUIET = True
    qb.module = qemu_backup
