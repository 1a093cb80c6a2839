"""Progress bars that suit where they are written: a live bar on a terminal, a plain line every
few seconds in a log (tqdm's carriage-return frames would make one endless line there)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

#: Seconds between progress lines when the output is not a terminal.
LOG_INTERVAL_S = 5.0


class _Lines:
    """A text stream adapter: each tqdm frame becomes one plain line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str = "ev", file: TextIO | None = None,
             disable: bool = False, leave: bool = True) -> tqdm:
    """A tqdm bar on ``file`` (stderr by default); off a terminal, one line per
    :data:`LOG_INTERVAL_S` and a last one when it closes."""
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=disable, leave=leave)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), disable=disable,
                leave=True, mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 4,
                dynamic_ncols=False, ncols=100, ascii=True)
