"""One look for every progress bar of cowfs (tqdm does the drawing): bytes done of the
bytes a job selects, on stderr. tqdm is imported only when a bar is drawn, so commands
that show none start faster."""

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def bytes_bar(desc: str) -> "tqdm":
    from tqdm import tqdm

    return tqdm(
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
    )
