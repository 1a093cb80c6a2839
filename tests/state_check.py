"""Checks that live Redis state equals a clean in-memory replay of the same events."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

import pytest
import redis

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.redis_store import RedisStore
from schemas.keys import RedisKeys

#: Tables compared row by row (batch-invariant models only: MF's result depends on batching).
TABLES = {"session": ("sess", "isess", "df", "meta"), "cooc": ("win", "mass")}
#: Rows trimmed to a cap: once a row reaches it, which tail members survive (and so how much of
#: a re-added member's count was lost) depends on how the batches fell (a row is trimmed only
#: past its cap plus slack); for such rows the head members (what serving reads) must agree,
#: not every member.
CAPPED = {("session", "isess"): 100}
HEAD = 20


def read_rows(store, model, table: str, keys: list[str]) -> list[dict[str, float]]:
    """A model table's rows from ``store``: partition-local tables are msgpack strings."""
    read = store.get_local_rows if table in model.local_tables else store.get_rows
    return read(table, keys)


def _head(row: dict[str, float], size: int = HEAD) -> dict[str, float]:
    return dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:size])


def assert_heads_agree(got: dict[str, float], want: dict[str, float], what) -> None:
    """Each row's first HEAD / 2 members are among the other's first HEAD: a capped row's
    counts may differ a little with the interleaving (CAPPED), so members near the HEAD-th
    place may swap; the members serving ranks first may not."""
    assert set(_head(got, HEAD // 2)) <= set(_head(want)), what
    assert set(_head(want, HEAD // 2)) <= set(_head(got)), what


def assert_live_equals_replay(client, prefix: str, events, history_len: int,
                              models=("session", "cooc"), layout: str = "shared") -> None:
    """``layout``: STREAMREC_STATE_WRITER of the worker (single: rows as msgpack strings)."""
    as_strings = layout in ("single", "owned")
    mapper = SignalMapper()
    replayed = {n: build(n).bind(MemoryStore()) for n in models}
    for start in range(0, len(events), 500):
        signals = mapper.map(events[start:start + 500])
        for model in replayed.values():
            model.learn(signals)
    for name, model in replayed.items():
        live = RedisStore(client, prefix, name, rows_as_strings=as_strings)
        for table in TABLES[name]:
            rows = model.store.rows.get(table, {})
            if name == "cooc" and table == "mass":
                continue  # carries the forward-decay landmark: compared through similar()
            keys = sorted(rows)
            for key, got in zip(keys, read_rows(live, model, table, keys)):
                if (name, table) in CAPPED and max(len(got), len(rows[key])) >= CAPPED[
                        (name, table)]:
                    assert_heads_agree(got, rows[key], (table, key))
                    continue
                assert got == pytest.approx(rows[key], rel=1e-9), (name, table, key, got, rows[key])
    if "cooc" in replayed:
        # counts carry a forward-decay factor set by whichever event came first; the
        # normalised neighbours (what serving uses) do not
        items = sorted(replayed["cooc"].store.rows["cooc"])
        live_cooc = build("cooc").bind(RedisStore(client, prefix, "cooc",
                                                  rows_as_strings=as_strings))
        raw = replayed["cooc"].store.rows["cooc"]
        for item, got, want in zip(items, live_cooc.similar(items),
                                   replayed["cooc"].similar(items)):
            if len(raw[item]) >= replayed["cooc"].neighbours:  # capped: see CAPPED
                assert_heads_agree(got, want, item)
                continue
            assert got == pytest.approx(want, rel=1e-6), (item, sorted(set(got) ^ set(want)))
    keys = RedisKeys(prefix)
    for user in {e.user_id for e in events}:
        mine = [e.item_id for e in events if e.user_id == user][::-1][:history_len]
        assert [x.decode() for x in client.lrange(keys.user_history(user), 0, -1)] == mine


def applied(client, prefix: str) -> int:
    return int(client.hget(RedisKeys(prefix).stats, "events_applied") or 0)


def assert_store_holds(store, memory_model) -> None:
    """Every row and vector of ``memory_model``'s state is in ``store``, exactly."""
    import numpy as np

    for table, rows in memory_model.store.rows.items():
        keys = sorted(rows)
        assert read_rows(store, memory_model, table, keys) == [rows[k] for k in keys], table
    for table, vectors in memory_model.store.vectors.items():
        keys = sorted(vectors)
        got, found = store.get_vectors(table, keys, len(next(iter(vectors.values()))))
        assert found.all() and np.array_equal(got, np.stack([vectors[k] for k in keys])), table


@contextmanager
def killed_mid_apply(monkeypatch):
    """Within: a Redis Cluster commit's writes outside its redo record's slot stop half way,
    as when the worker dies there (the commit raises ``ConnectionError``)."""
    import state.redis_store

    send = state.redis_store.apply_commands

    def half_then_die(client, commands, scripts, before_send=None, wait=None):
        send(client, commands[:len(commands) // 2], scripts, before_send, wait)
        raise redis.ConnectionError("killed mid-commit")

    monkeypatch.setattr(state.redis_store, "apply_commands", half_then_die)
    try:
        with pytest.raises(redis.ConnectionError):
            yield
    finally:
        monkeypatch.setattr(state.redis_store, "apply_commands", send)


class FrozenCommit:
    """``apply()`` run in a thread of its own that freezes (GC, swap, SIGSTOP) after a Redis
    Cluster commit's transaction, before its writes to other nodes, until :meth:`wake`."""

    def __init__(self, monkeypatch, apply: Callable[[], object]) -> None:
        import state.redis_store

        send, self._woken, self._outcome = state.redis_store.apply_commands, threading.Event(), []

        def freeze_there(client, commands, scripts, before_send=None, wait=None):
            if threading.current_thread() is self._thread and not self._woken.is_set():
                self._woken.wait(30)
            return send(client, commands, scripts, before_send, wait)

        monkeypatch.setattr(state.redis_store, "apply_commands", freeze_there)
        self._thread = threading.Thread(target=self._run, args=(apply,))
        self._thread.start()
        time.sleep(0.5)  # its (first) transaction is in; its other writes wait

    def _run(self, apply) -> None:
        try:
            self._outcome.append(apply())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self._outcome.append(exc)

    def wake(self) -> object:
        """Let it go on; what ``apply()`` returned or raised."""
        self._woken.set()
        self._thread.join(30)
        return self._outcome[0]


def redis_snapshot(client, prefix: str) -> dict:
    """Every key under ``prefix`` Redis holds (every node of a cluster) with its serialized
    value (not other tests' keys: a Redis may be shared, and their leases lapse meanwhile)."""
    return {key: client.dump(key)
            for key in client.scan_iter(match=f"{prefix}:*", count=10_000)}
