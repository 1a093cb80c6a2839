"""How every benchmark ends: one aligned ``name: value`` line per figure, then the same figures
as one JSON line (the last line of output, for machines)."""

from __future__ import annotations

import json


def print_result(result: dict) -> None:
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
    print(json.dumps(result))
