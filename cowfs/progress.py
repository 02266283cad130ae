"""The live progress bar of a foreground mount on a terminal (tqdm does the drawing)."""

import sys

import trio
from tqdm import tqdm

from .job import Job

REFRESH_S = 0.5


async def show_progress(job: Job) -> None:
    """Redraw until cancelled; the bar shows bytes done of the bytes the sync mode selects."""
    name = job.source.rsplit("/", 1)[-1]
    with tqdm(
        desc=f"backup {name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        while True:
            status = job.status()
            bar.total = status["bytes_total"]
            bar.n = status["bytes_done"]
            bar.set_postfix_str(str(status["state"]), refresh=False)
            bar.refresh()
            await trio.sleep(REFRESH_S)
