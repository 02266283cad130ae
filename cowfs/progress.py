"""The live progress bar of a foreground mount on a terminal."""

import trio
from tqdm import tqdm

from .bars import bytes_bar
from .job import Job

REFRESH_S = 0.5


async def show_progress(job: Job) -> None:
    """Redraw until cancelled; the bar shows bytes done of the bytes the sync mode selects."""
    name = job.source.rsplit("/", 1)[-1]
    with bytes_bar(f"backup {name}") as bar:
        try:
            while True:
                _draw(bar, job)
                await trio.sleep(REFRESH_S)
        finally:
            _draw(bar, job)  # the last state, not the one of half a second ago


def _draw(bar: tqdm, job: Job) -> None:
    status = job.status()
    bar.total = status.bytes_total
    bar.n = status.bytes_done
    bar.set_postfix_str(status.state, refresh=False)
    bar.refresh()
