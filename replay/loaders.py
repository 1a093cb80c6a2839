"""Loaders that turn public interaction logs into :class:`schemas.events.Interaction` streams.

Every loader yields events in event-time order with deterministic event ids, so a replay or a
``streamrec produce`` of the same file is reproducible and producer duplicates are detectable.

Dwell for click logs that lack it is derived as web analytics does: the time until the same
session's next click (unknown for a session's last click). Whether a short dwell is a skip is
the signal mapping's decision, not the loader's.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
from pathlib import Path
from typing import Iterator

from schemas.events import (MAX_DWELL_MS, MIN_TIMESTAMP, Interaction, InvalidEvent,
                            validate_event)
from schemas.items import MAX_TAGS, ItemRecord, validate_item

YOOCHOOSE_DIR_FILES = ("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt")
OTTO_TYPES = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}
#: Keys of a generic loader's column mapping (``csv:user=…,item=…,ts=…``).
MAPPING_KEYS = ("user", "item", "ts", "ts_unit", "session", "type", "dwell_ms", "item_duration_ms")


class LogFormatError(ValueError):
    """A log file does not match the format it was loaded as (names file and line)."""


def _event(**fields) -> Interaction:
    """A validated event (constructing the struct directly would skip validation)."""
    return validate_event({k: v for k, v in fields.items() if v is not None})


def _with_session_dwell(rows: list[tuple[str, str, float]], source: str) -> list[Interaction]:
    """rows: (session, item, ts) → click events with dwell = gap to the session's next click."""
    rows.sort(key=lambda r: (r[0], r[2]))
    events = []
    for i, (session, item, ts) in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        dwell = (min(round((nxt[2] - ts) * 1000), MAX_DWELL_MS)
                 if nxt is not None and nxt[0] == session else None)
        events.append(_event(event_id=f"{source}:{session}:{i}", user_id=f"s{session}",
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
        missing = [name for name in YOOCHOOSE_DIR_FILES if not (path / name).is_file()]
        if missing:
            raise LogFormatError(f"{path} is a folder without {', '.join(missing)}; "
                                 "give a YooChoose clicks file instead")
        return sorted((e for name in YOOCHOOSE_DIR_FILES for e in load_yoochoose(path / name)),
                      key=lambda e: e.timestamp)
    rows: list[tuple[str, str, float]] = []
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
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
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                doc = json.loads(line)
                session = str(doc["session"])
                for j, ev in enumerate(doc["events"]):
                    events.append(_event(
                        event_id=f"otto:{session}:{j}", user_id=f"s{session}",
                        item_id=str(ev["aid"]), type=OTTO_TYPES[ev["type"]],
                        timestamp=ev["ts"] / 1000.0, session_id=session))
            except (KeyError, TypeError, ValueError) as exc:  # InvalidEvent is a ValueError
                raise LogFormatError(f"{path}:{line_no}: not an OTTO line ({exc})") from None
    events.sort(key=lambda e: e.timestamp)
    return events


SESSION_GAP_S = 1800.0


def _sessionize(rows: list[dict], source: str, gap_s: float = SESSION_GAP_S
                ) -> list[Interaction]:
    """rows: dicts with user, item, ts (+ optional type, dwell_ms, item_duration_ms, session).
    Rows without a session get one per user, split at ``gap_s`` of inactivity."""
    rows.sort(key=lambda r: (r["user"], r["ts"]))
    events, last_user, last_ts, n = [], None, 0.0, 0
    for i, r in enumerate(rows):
        if r["user"] != last_user or r["ts"] - last_ts > gap_s:
            n += 1
        last_user, last_ts = r["user"], r["ts"]
        events.append(_event(
            event_id=f"{source}:{i}", user_id=str(r["user"]), item_id=str(r["item"]),
            type=r.get("type", "click"), timestamp=float(r["ts"]),
            session_id=str(r.get("session") or f"{r['user']}:{n}"),
            dwell_ms=r.get("dwell_ms"), item_duration_ms=r.get("item_duration_ms")))
    events.sort(key=lambda e: e.timestamp)
    return events


def _short(fields: list[str], limit: int = 80) -> str:
    text = repr(fields)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _header_key(name: str) -> str:
    """``sessionId``, ``session_id`` and ``Session ID`` are one column."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _rows(path: Path, parse, delimiter: str = ",", header: bool = True,
          required: tuple[str, ...] = (), normalise: bool = False):
    """Parse each data line with ``parse(fields)``; errors name file and line.

    ``required``: header columns that must be present (checked before any row); with
    ``normalise`` column names are compared and passed on lower-case, without ``_`` or spaces.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        names = next(reader, []) if header else None
        if names is not None:
            if normalise:
                names = [_header_key(n) for n in names]
            missing = [c for c in required if c not in names]
            if missing:
                raise LogFormatError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                                     f"(found: {', '.join(names) or 'nothing'})")
        for line_no, fields in enumerate(reader, start=2 if header else 1):
            if not fields:
                continue
            try:
                row = parse(dict(zip(names, fields)) if names else fields)
            except (IndexError, KeyError, ValueError) as exc:
                raise LogFormatError(f"{path}:{line_no}: unexpected row {_short(fields)} "
                                     f"({type(exc).__name__}: {exc})") from None
            if row is not None:
                yield row


def load_diginetica(path: str | Path) -> list[Interaction]:
    """Diginetica ``train-item-views.csv``: ``sessionId;userId;itemId;timeframe;eventdate``
    (timeframe = ms since the session started; eventdate = YYYY-MM-DD). The sample file
    shipped with SR-GNN spells the header ``session_id;user_id;item_id;…``: both load."""
    from datetime import datetime, timezone

    def parse(r):
        day = datetime.strptime(r["eventdate"], "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return (r["sessionid"], r["itemid"], day.timestamp() + int(r["timeframe"]) / 1000.0)

    path = Path(path)
    rows = _rows(path, parse, delimiter=";", normalise=True,
                 required=("sessionid", "itemid", "timeframe", "eventdate"))
    return _with_session_dwell(list(rows), path.stem)


RETAILROCKET_TYPES = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}


def load_retailrocket(path: str | Path) -> list[Interaction]:
    """RetailRocket ``events.csv``: ``timestamp(ms),visitorid,event,itemid,transactionid``."""
    path = Path(path)
    return _sessionize(list(_rows(path, lambda r: {
        "user": r["visitorid"], "item": r["itemid"], "ts": int(r["timestamp"]) / 1000.0,
        "type": RETAILROCKET_TYPES[r["event"]]})), path.stem)


def _rating_type(rating: float) -> str:
    return "like" if rating >= 4 else "dislike" if rating <= 2 else "view"


def load_movielens(path: str | Path) -> list[Interaction]:
    """MovieLens ``u.data`` (tab), ``ratings.dat`` (``::``) or ``ratings.csv`` (header).
    Ratings ≥ 4 are likes, ≤ 2 dislikes, else views."""
    path = Path(path)
    if path.suffix == ".dat":
        def rows():
            with open(path, encoding="latin-1") as handle:
                for line_no, line in enumerate(handle, start=1):
                    try:
                        user, item, rating, ts = line.strip().split("::")
                        yield {"user": user, "item": item, "ts": float(ts),
                               "type": _rating_type(float(rating))}
                    except ValueError as exc:
                        raise LogFormatError(f"{path}:{line_no}: {exc!r}") from None
        return _sessionize(list(rows()), path.stem)
    if path.suffix == ".csv":
        return _sessionize(list(_rows(path, lambda r: {
            "user": r["userId"], "item": r["movieId"], "ts": float(r["timestamp"]),
            "type": _rating_type(float(r["rating"]))})), path.stem)
    return _sessionize(list(_rows(path, lambda f: {
        "user": f[0], "item": f[1], "ts": float(f[3]), "type": _rating_type(float(f[2]))},
        delimiter="\t", header=False)), path.stem)


_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def load_movielens_items(folder: str | Path) -> list[ItemRecord]:
    """Item descriptions of a MovieLens folder (``movies.csv``, and ``tags.csv`` if present),
    in time order, as the ``items`` topic would carry them: each movie described (title,
    genres as categories, its decade as a tag) on January 1st of its title's year (1990 for
    older ones: the log's earliest accepted time), then described again, whole, each time
    someone tags it (tags accumulate; at most :data:`MAX_TAGS` distinct, first come first
    kept). No description is ahead of the moment it could have been known."""
    folder = Path(folder)
    movies = folder / "movies.csv"
    if not movies.is_file():
        raise LogFormatError(f"{folder}: no movies.csv (MovieLens item descriptions)")
    base: dict[str, dict] = {}
    for row in _rows(movies, lambda r: r, required=("movieId", "title", "genres")):
        title = row["title"].strip()
        year = _TITLE_YEAR.search(title)
        genres = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
        released = (datetime.datetime(int(year.group(1)), 1, 1,
                                      tzinfo=datetime.timezone.utc).timestamp()
                    if year else MIN_TIMESTAMP)
        base[row["movieId"]] = {"item_id": row["movieId"], "title": _TITLE_YEAR.sub("", title),
                                "categories": genres[:32],
                                "tags": [f"{year.group(1)[:3]}0s"] if year else [],
                                "timestamp": max(released, MIN_TIMESTAMP)}
    records = [validate_item(fields) for fields in base.values()]
    tags = folder / "tags.csv"
    if tags.is_file():
        applied = sorted(_rows(tags, lambda r: (float(r["timestamp"]), r["movieId"],
                                                r["tag"].strip()[:64]),
                               required=("movieId", "tag", "timestamp")))
        for ts, movie, tag in applied:
            fields = base.get(movie)
            if fields is None or not tag:
                continue
            if tag.lower() not in {t.lower() for t in fields["tags"]} \
                    and len(fields["tags"]) < MAX_TAGS:
                fields["tags"] = fields["tags"] + [tag]
            fields["timestamp"] = max(fields["timestamp"], ts)
            records.append(validate_item(fields))
    return sorted(records, key=lambda r: r.timestamp)


#: Item description loaders by log format (a format without one replays without items).
ITEM_LOADERS = {"movielens": load_movielens_items}


def load_items(path: str | Path, fmt: str) -> list[ItemRecord]:
    """Item descriptions beside a log (e.g. MovieLens ``movies.csv``), or ``[]`` where the
    format or folder has none."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    loader = ITEM_LOADERS.get(fmt.partition(":")[0])
    if loader is None or not (folder / "movies.csv").is_file():
        return []
    try:
        return loader(folder)
    except InvalidEvent as exc:
        raise LogFormatError(f"{folder}: a row is no valid item description: {exc}") from None


def load_kuairec(path: str | Path) -> list[Interaction]:
    """KuaiRec/KuaiRand-style CSV: ``user_id, video_id, play_duration (ms),
    video_duration (ms), timestamp (s)``; plays become clicks with dwell and duration."""
    path = Path(path)

    def parse(r):
        ts = r.get("timestamp") or r.get("time_ms")
        ts = float(ts) / (1000.0 if "timestamp" not in r else 1.0)
        return {"user": r["user_id"], "item": r["video_id"], "ts": ts,
                "dwell_ms": min(int(float(r["play_duration"])), MAX_DWELL_MS),
                "item_duration_ms": max(1, min(int(float(r["video_duration"])), MAX_DWELL_MS))}

    return _sessionize(list(_rows(path, parse)), path.stem)


def load_generic(path: str | Path, mapping: dict[str, str]) -> list[Interaction]:
    """CSV/TSV (header) or JSONL with a column mapping: ``user``, ``item``, ``ts`` required;
    ``session``, ``type``, ``dwell_ms``, ``item_duration_ms`` optional; ``ts_unit`` = s|ms."""
    path = Path(path)
    missing = {"user", "item", "ts"} - set(mapping)
    if missing:
        raise LogFormatError(f"column mapping lacks {sorted(missing)}; e.g. "
                             "csv:user=visitor,item=item,ts=time,ts_unit=ms")
    scale = 1000.0 if mapping.get("ts_unit") == "ms" else 1.0

    def convert(r):
        row = {"user": r[mapping["user"]], "item": r[mapping["item"]],
               "ts": float(r[mapping["ts"]]) / scale}
        for key in ("session", "type", "dwell_ms", "item_duration_ms"):
            if key in mapping and r.get(mapping[key]) not in (None, ""):
                value = r[mapping[key]]
                row[key] = int(float(value)) if key.endswith("_ms") else str(value)
        return row

    columns = [mapping[key] for key in ("user", "item", "ts")]
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line_no, line in enumerate(handle, start=1):
                try:
                    rows.append(convert(json.loads(line)))
                except (KeyError, ValueError, TypeError) as exc:
                    raise LogFormatError(f"{path}:{line_no}: {exc!r}") from None
    else:
        rows = list(_rows(path, convert, delimiter="\t" if path.suffix == ".tsv" else ",",
                          required=tuple(columns)))
    return _sessionize(rows, path.stem)


LOADERS = {"yoochoose": load_yoochoose, "otto": load_otto, "diginetica": load_diginetica,
           "retailrocket": load_retailrocket, "movielens": load_movielens,
           "kuairec": load_kuairec}


def load_log(path: str | Path, fmt: str) -> list[Interaction]:
    """Load ``path`` in format ``fmt``: a name of :data:`LOADERS`, or ``csv:``/``jsonl:``
    followed by a column mapping (``csv:user=visitorid,item=itemid,ts=timestamp,ts_unit=ms``)."""
    name, _, spec = fmt.partition(":")
    if name in ("csv", "jsonl", "generic"):
        mapping = parse_mapping(spec)
        loader = lambda file: load_generic(file, mapping)  # noqa: E731
    elif name in LOADERS:
        loader = LOADERS[name]
    else:
        raise LogFormatError(f"unknown format {fmt!r}; known: {', '.join(LOADERS)}, "
                             "csv:<mapping>, jsonl:<mapping>")
    path = resolve_log_path(path, name)
    try:
        return loader(path)
    except csv.Error as exc:
        raise LogFormatError(f"{path}: not readable as {name} ({exc})") from None
    except InvalidEvent as exc:  # a row parsed, but is no valid event (e.g. a 1970 timestamp)
        raise LogFormatError(f"{path}: a row is no valid event: {exc}") from None


def parse_mapping(spec: str) -> dict[str, str]:
    """``user=visitorid,item=itemid,ts=timestamp,ts_unit=ms`` → a column mapping."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, column = part.partition("=")
        if not eq or not column or key not in MAPPING_KEYS:
            raise LogFormatError(f"bad column mapping {part!r}: expected KEY=COLUMN with KEY one "
                                 f"of {', '.join(MAPPING_KEYS)}")
        mapping[key] = column
    if mapping.get("ts_unit", "s") not in ("s", "ms"):
        raise LogFormatError(f"bad column mapping: ts_unit must be s or ms, not "
                             f"{mapping['ts_unit']!r}")
    return mapping


#: The files a format's standard folder layout holds, in the order they are looked for
#: (MovieLens latest/25M, 1M and 100K; Diginetica and the SR-GNN sample; the rest as published).
FOLDER_FILES = {
    "movielens": ("ratings.csv", "ratings.dat", "u.data"),
    "diginetica": ("train-item-views.csv", "sample_train-item-views.csv"),
    "otto": ("train.jsonl", "test.jsonl"),
    "retailrocket": ("events.csv",),
    "kuairec": ("big_matrix.csv", "small_matrix.csv"),
}


def resolve_log_path(path: str | Path, fmt: str) -> Path:
    """The file to load for ``path``: the path itself, or the format's file in a standard
    folder layout (:data:`FOLDER_FILES`). Raises :class:`LogFormatError` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise LogFormatError(f"{path}: no such file or folder")
    if not path.is_dir():
        return path
    if fmt == "yoochoose":
        return path  # load_yoochoose reads the shared sample's folder itself
    for name in FOLDER_FILES.get(fmt, ()):
        if (path / name).is_file():
            return path / name
    expected = " or ".join(FOLDER_FILES.get(fmt, ())) or "a file"
    raise LogFormatError(f"{path} is a folder; --format {fmt} needs a file ({expected} in it)")


def load_split(path: str | Path, fmt: str, test_days: float = 1.0
               ) -> tuple[list[Interaction], list[Interaction]]:
    """(train, test): a YooChoose folder uses its published train_full/test files; anything
    else is split by time — sessions that start in the last ``test_days`` days are the test."""
    path = Path(path)
    if path.is_dir() and fmt == "yoochoose" and all((path / f).is_file()
                                                     for f in YOOCHOOSE_DIR_FILES):
        return (load_yoochoose(path / YOOCHOOSE_DIR_FILES[0]),
                load_yoochoose(path / YOOCHOOSE_DIR_FILES[1]))
    events = load_log(path, fmt)
    if not events:
        raise LogFormatError(f"{path}: no events")
    start: dict[str, float] = {}
    for e in events:
        start.setdefault(e.session_id or e.user_id, e.timestamp)
    cutoff = events[-1].timestamp - test_days * 86400.0
    train = [e for e in events if start[e.session_id or e.user_id] < cutoff]
    test = [e for e in events if start[e.session_id or e.user_id] >= cutoff]
    return train, test
def iter_realtime(events: list[Interaction], speed: float) -> Iterator[tuple[float, Interaction]]:
    """(seconds after start at which to send, event) for a replay at ``speed``× real time."""
    if not events:
        return
    t0 = events[0].timestamp
    for event in events:
        yield (event.timestamp - t0) / speed, event
