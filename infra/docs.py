"""Reference docs generated from the code, so they cannot drift: ``streamrec docs``."""

from __future__ import annotations

from pathlib import Path

from infra.settings import Settings
from schemas.keys import RedisKeys

DOCS = Path(__file__).resolve().parents[1] / "docs"


def redis_keys_markdown() -> str:
    rows = "\n".join(f"| `{s.pattern}` | {s.type} | {s.ttl} | {s.owner} | {s.bound} | {s.meaning} |"
                     for s in RedisKeys("sr").specs())
    return f"""# Redis key contract

Generated from `schemas/keys.py` (`streamrec docs`); the prefix `sr` is `STREAMREC_KEY_PREFIX`.

- `<user>` is the user id **percent-encoded** (RFC 3986: everything except `A-Za-z0-9_.-~`
  becomes `%XX` of its UTF-8 bytes). `alice:{{1}}` → `alice%3A%7B1%7D`. Front ends in other
  languages: `encodeURIComponent(id)` gives the same result except for `!'()*`, which it
  leaves alone: encode those too (`%21 %27 %28 %29 %2A`).
- Per-user keys carry the Redis Cluster hash tag `{{u:<user>}}`: a user's keys share a slot.
  Shared keys have their own tags (`{{trend}}`, `{{feedq}}`, `{{stats}}`).
- Serving reads model state and never writes it; only the owner writes a key.

| key | type | TTL | written by | size bound | meaning |
|---|---|---|---|---|---|
{rows}

## Reading a feed

```
GET sr:{{u:alice}}:feed
{{"user_id":"alice","items":[{{"item_id":"i42","score":3.1,"reason":"trending"}}],
 "recommendation_id":"5f0c…","generated_at":1795345798.7,"source":"trending",
 "model_version":"trending-v1"}}
```

A missing key means no feed was built yet (new user, or TTL passed): ask the HTTP API
(`GET /v1/users/<id>/feed`), which computes one on demand.
"""


def configuration_markdown() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default if field.default not in ("", None) else "(empty)"
        rows.append(f"| `STREAMREC_{name.upper()}` | `{default}` | {field.description} |")
    return ("# Configuration\n\nGenerated from `infra/settings.py` (`streamrec docs`). Every "
            "process role reads these environment variables; invalid values stop the process "
            "with the field's name.\n\n| variable | default | meaning |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


GENERATED = {"redis-keys.md": redis_keys_markdown, "configuration.md": configuration_markdown}


def write_docs(folder: Path = DOCS) -> list[Path]:
    folder.mkdir(exist_ok=True)
    written = []
    for name, render in GENERATED.items():
        (folder / name).write_text(render())
        written.append(folder / name)
    return written
