"""The bench behind scripts/bench.py (its entry point and documentation), one job a module.

Why a package: one 1900-line script mixed starting processes, QEMU's side, eleven
phases and the report, so a change to one phase meant reading all of it. The layout,
data flowing one way (cli -> phases -> report):

- `anchor`: the QEMU anchor (`qemu_backup.py`), imported from `--anchors` at run time.
- `harness`: the processes of a run -- cowfs commands, mounts, writer children, py-spy --
  and their teardown; the timed I/O several phases share. Starting and taking down a
  mount is tests/helpers/mounting.py's, shared with the tests (tests/ is put on sys.path
  here, so that every module of the package can import `helpers.mounting`).
- `workspace`: one run's state (`Bench`): the pristine image and its copies, the
  workloads, and how a cowfs backup is timed.
- `qemu`: QEMU's side of every comparison.
- `phases`: the phases (a)-(m), a table of functions, and the order they run in.
- `report`: medians, spreads, the table of ratios against the floors, the checks.
- `cli`: the options and `main`.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))
