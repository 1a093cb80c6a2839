"""Validation throughput: events/s through ``schemas.events.split_message``.

Baselines in the same process and on the same bytes: plain JSON parsing with no checks
(orjson.loads) and an equivalent pydantic v2 model (a common choice we did not take).
Usage: ``python bench/validation.py [--events 200000]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from schemas.events import encode_envelope, split_message  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402


class PydanticEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    event_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    type: Literal["impression", "click", "view", "dwell", "skip", "like", "dislike",
                  "add_to_cart", "purchase"]
    timestamp: float = Field(ge=946_684_800)
    session_id: str | None = Field(None, min_length=1, max_length=256)
    dwell_ms: int | None = Field(None, ge=0, le=86_400_000)
    item_duration_ms: int | None = Field(None, gt=0, le=86_400_000)
    schema_version: Literal[1] = 1


class PydanticEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[PydanticEvent] = Field(min_length=1, max_length=1000)
    schema_version: Literal[1] = 1


def rate(fn, messages, events) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for raw in messages:
            fn(raw)
        best = min(best, time.perf_counter() - start)
    return events / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500, help="events per envelope")
    args = parser.parse_args()
    events = list(UserSimulator(5000, 20000, seed=0).events(args.events, 1.7e9))
    messages = [encode_envelope(events[i:i + args.batch])
                for i in range(0, len(events), args.batch)]
    singles = [encode_envelope([e])[len(b'{"events":['):-len(b'],"schema_version":1}')]
               for e in events[:20_000]]
    assert split_message(singles[0])[0] and not split_message(singles[0])[1]
    results = {
        "envelope_events_per_s": rate(split_message, messages, len(events)),
        "single_event_messages_per_s": rate(split_message, singles, len(singles)),
        "baseline_orjson_parse_only_events_per_s": rate(orjson.loads, messages, len(events)),
        "pydantic_v2_events_per_s": rate(PydanticEnvelope.model_validate_json, messages,
                                         len(events)),
    }
    results["ratio_to_parse_only"] = (results["envelope_events_per_s"]
                                      / results["baseline_orjson_parse_only_events_per_s"])
    results["speedup_vs_pydantic"] = (results["envelope_events_per_s"]
                                      / results["pydantic_v2_events_per_s"])
    for name, value in results.items():
        print(f"{name:>42}: {value:,.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
