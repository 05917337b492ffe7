"""Progress bars for long work outside the training engine (experiments, ``bionets bench``)."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(what: str, total: int) -> tqdm:
    """A progress bar over ``total`` units of work (fits, epochs, cases): on stderr where that is a
    terminal (a log gets none of its frames), cleared when done."""
    return tqdm(total=total, desc=what, leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)
