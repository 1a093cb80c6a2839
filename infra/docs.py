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


#: Each role's metrics port setting and the modules that define what it exports.
ROLE_METRICS = {
    "worker": ("STREAMREC_WORKER_METRICS_PORT", ("stream.metrics", "infra.redis_client")),
    "api": ("STREAMREC_API_METRICS_PORT", ("serving.metrics", "infra.redis_client")),
    "feeds": ("STREAMREC_FEEDS_METRICS_PORT", ("serving.feed_metrics", "infra.redis_client")),
    "trainer": ("STREAMREC_TRAINER_METRICS_PORT", ("stream.trainer_metrics",)),
}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "gauge": ("",)}


def role_metrics(role: str) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(name, type, label names, help) of every metric ``role`` exports, by name; samples are
    ``name`` plus the type's suffixes (``_total``; ``_bucket``, ``_sum``, ``_count``)."""
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    found = {}
    for module in ROLE_METRICS[role][1]:
        for metric in vars(importlib.import_module(module)).values():
            if isinstance(metric, MetricWrapperBase):
                found[metric._name] = (metric._name, metric._type, tuple(metric._labelnames),
                                       metric._documentation)
    return [found[name] for name in sorted(found)]


def samples(name: str, kind: str) -> tuple[str, ...]:
    """The sample names a metric of this name and type exports."""
    return tuple(name + suffix for suffix in _SUFFIXES[kind])


def metrics_markdown() -> str:
    parts = ["# Metrics\n\nGenerated from the metric definitions (`streamrec docs`). Each role "
             "serves Prometheus text on its port setting (0, the default, is off); the alerting "
             "rules over them are `infra/prometheus/alerts.yml` (docs/reliability.md, "
             "\"Alerts\").\n"]
    for role, (setting, _modules) in ROLE_METRICS.items():
        rows = "\n".join(f"| `{'`, `'.join(samples(name, kind))}` | {kind} | "
                         f"{', '.join(f'`{label}`' for label in labels) or '—'} | {doc} |"
                         for name, kind, labels, doc in role_metrics(role))
        parts.append(f"\n## `streamrec {role}`: `{setting}`\n\n"
                     f"| samples | type | labels | meaning |\n|---|---|---|---|\n{rows}\n")
    return "".join(parts)


GENERATED = {"redis-keys.md": redis_keys_markdown, "configuration.md": configuration_markdown,
             "metrics.md": metrics_markdown}


def write_docs(folder: Path = DOCS) -> list[Path]:
    folder.mkdir(exist_ok=True)
    written = []
    for name, render in GENERATED.items():
        (folder / name).write_text(render())
        written.append(folder / name)
    return written
