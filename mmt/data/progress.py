"""Progress bars for the steps a user waits for (checking, packing, decoding, evaluating).

Library code draws them through `bar`, on stderr, and only where a person can see them: never
when stderr is not a terminal (pipes, logs, tests), and never inside `progress_bars(False)`,
which `mmt.train.train(progress=False)` (`mmt train --no-progress`) enters. Messages still go
through `logging`; the CLI's log handler writes around an open bar.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled = [True]


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Bars on (where stderr is a terminal) or off for the code inside."""
    before = _enabled[0]
    _enabled[0] = enabled
    try:
        yield
    finally:
        _enabled[0] = before


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr, shown only on a terminal and when bars are on; it disappears
    when done (the step's result is logged or printed instead)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if _enabled[0] else True)  # None: off unless stderr is a terminal
