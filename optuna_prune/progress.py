"""Progress on stderr for the long runs (a search, an evaluation): done of how much, and time left.

Every bar looks the same (tqdm's ``done/total [elapsed<remaining]``), so a user learns one format;
``enabled=False`` silences it for tests, scripts and ``--no-progress``.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A bar of ``total`` ``unit``s (None: a counter without an estimate), left on screen when done,
    so the finished phases of a long run stay readable above the current one."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
        dynamic_ncols=True, leave=True, mininterval=0.5,
    )
