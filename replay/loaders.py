"""Loaders that turn public interaction logs into :class:`schemas.events.Interaction` streams.

Every loader yields events in event-time order with deterministic event ids, so a replay or a
``streamrec produce`` of the same file is reproducible and producer duplicates are detectable.

Dwell for click logs that lack it is derived as web analytics does: the time until the same
session's next click (unknown for a session's last click). Whether a short dwell is a skip is
the signal mapping's decision, not the loader's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from schemas.events import MAX_DWELL_MS, Interaction

YOOCHOOSE_DIR_FILES = ("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt")
OTTO_TYPES = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}


class LogFormatError(ValueError):
    """A log file does not match the format it was loaded as (names file and line)."""


def _with_session_dwell(rows: list[tuple[str, str, float]], source: str) -> list[Interaction]:
    """rows: (session, item, ts) → click events with dwell = gap to the session's next click."""
    rows.sort(key=lambda r: (r[0], r[2]))
    events = []
    for i, (session, item, ts) in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        dwell = (min(int((nxt[2] - ts) * 1000), MAX_DWELL_MS)
                 if nxt is not None and nxt[0] == session else None)
        events.append(Interaction(event_id=f"{source}:{session}:{i}", user_id=f"s{session}",
                                  item_id=item, type="click", timestamp=ts,
                                  session_id=session, dwell_ms=dwell))
    events.sort(key=lambda e: e.timestamp)
    return events


def load_yoochoose(path: str | Path) -> list[Interaction]:
    """YooChoose / RSC15 clicks: TSV ``SessionId ItemId Time`` (header) or the original
    CSV ``session,timestamp(ISO),item,category`` without header. A folder loads the shared
    100k sample's train then test file."""
    path = Path(path)
    if path.is_dir():
        return sorted((e for name in YOOCHOOSE_DIR_FILES for e in load_yoochoose(path / name)),
                      key=lambda e: e.timestamp)
    rows: list[tuple[str, str, float]] = []
    with open(path, newline="") as handle:
        first = handle.readline()
        if first.startswith("SessionId"):
            columns = first.strip().split("\t")
            s_col, i_col, t_col = (columns.index(c) for c in ("SessionId", "ItemId", "Time"))
            reader, delimiter_rows = csv.reader(handle, delimiter="\t"), None
        else:
            from datetime import datetime
            handle.seek(0)
            reader, delimiter_rows = csv.reader(handle), True
        for line_no, row in enumerate(reader, start=2 if delimiter_rows is None else 1):
            try:
                if delimiter_rows is None:
                    rows.append((row[s_col], row[i_col], float(row[t_col])))
                else:
                    ts = datetime.fromisoformat(row[1].replace("Z", "+00:00")).timestamp()
                    rows.append((row[0], row[2], ts))
            except (IndexError, ValueError) as exc:
                raise LogFormatError(f"{path}:{line_no}: not a YooChoose row ({exc})") from None
    return _with_session_dwell(rows, path.stem)


def load_otto(path: str | Path) -> list[Interaction]:
    """OTTO JSONL: ``{"session": int, "events": [{"aid", "ts" (ms), "type"}]}`` per line."""
    path = Path(path)
    events = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                doc = json.loads(line)
                session = str(doc["session"])
                for j, ev in enumerate(doc["events"]):
                    events.append(Interaction(
                        event_id=f"otto:{session}:{j}", user_id=f"s{session}",
                        item_id=str(ev["aid"]), type=OTTO_TYPES[ev["type"]],
                        timestamp=ev["ts"] / 1000.0, session_id=session))
            except (KeyError, TypeError, ValueError) as exc:
                raise LogFormatError(f"{path}:{line_no}: not an OTTO line ({exc!r})") from None
    events.sort(key=lambda e: e.timestamp)
    return events


LOADERS = {"yoochoose": load_yoochoose, "otto": load_otto}


def load_log(path: str | Path, fmt: str) -> list[Interaction]:
    """Load ``path`` in format ``fmt`` (one of :data:`LOADERS`)."""
    try:
        loader = LOADERS[fmt]
    except KeyError:
        raise LogFormatError(f"unknown format {fmt!r}; known: {', '.join(LOADERS)}") from None
    return loader(path)


def iter_realtime(events: list[Interaction], speed: float) -> Iterator[tuple[float, Interaction]]:
    """(seconds after start at which to send, event) for a replay at ``speed``× real time."""
    if not events:
        return
    t0 = events[0].timestamp
    for event in events:
        yield (event.timestamp - t0) / speed, event
