"""Erasure requests: the wire format, where they cut chunks, and what each model forgets."""

import time

import pytest

from online_models.registry import MODELS, NEARLINE_MODELS, build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from schemas.events import (Erasure, Interaction, encode_envelope, encode_erasure, json_schema,
                            split_message, split_source)
from stream.pipeline import event_chunks
from stream.state import SourceMessage


def erasure(user="alice", sessions=(), request="r1") -> Erasure:
    return Erasure(request_id=request, user_id=user, timestamp=time.time(),
                   session_ids=list(sessions))


def test_an_erasure_message_decodes_as_one_and_events_never_do():
    request = erasure(sessions=["s1", "s2"])
    assert split_source(encode_erasure(request)) == ([], [], request)
    assert request.keys == ["alice", "s1", "s2"]
    event = Interaction(event_id="e", user_id="alice", item_id="i", type="click",
                        timestamp=1.7e9)
    events, problems, found = split_source(encode_envelope([event]))
    assert (events, problems, found) == ([event], [], None)
    # the HTTP events endpoint decodes with split_message: an erasure is not an event there
    _, problems = split_message(encode_erasure(request))
    assert "unknown field `erase`" in str(problems[0][2])


@pytest.mark.parametrize("body, field", [
    (b'{"erase": {"request_id": "r", "user_id": "", "timestamp": 1.7e9}}', "erase.user_id"),
    (b'{"erase": {"request_id": "r", "timestamp": 1.7e9}}', "erase"),
    (b'{"erase": {"request_id": "r", "user_id": "a", "timestamp": 5}}', "erase.timestamp"),
    (b'{"erase": {"request_id": "r", "user_id": "a", "user_id": "b", "timestamp": 1.7e9}}',
     "erase.user_id"),
    (b'{"erase": {"request_id": "r", "user_id": "a", "timestamp": 1.7e9}, "x": 1}', "$"),
    (b'{"erase": {"request_id": "r", "user_id": "a", "timestamp": 1.7e9, '
     b'"session_ids": [""]}}', "erase.session_ids[0]"),
])
def test_a_bad_erasure_is_a_problem_naming_its_field(body, field):
    events, problems, found = split_source(body)
    assert events == [] and found is None and len(problems) == 1
    assert problems[0][2].errors[0]["field"] == field


def test_the_json_schema_describes_erasure_messages():
    schema = json_schema()
    assert schema["$defs"]["Erasure"]["required"] == ["request_id", "user_id", "timestamp"]
    assert schema["$defs"]["Erasure"]["additionalProperties"] is False


def source(offset, events=(), request=None, partition=0):
    return SourceMessage("interactions", partition, offset, list(events), erasure=request)


def test_an_erasure_starts_a_chunk_where_the_chunk_holds_events_it_erases():
    def click(n, user="alice", session=None):
        return Interaction(event_id=f"e{n}", user_id=user, item_id="i", type="click",
                           timestamp=1.7e9, session_id=session)

    def offsets(sources):
        return [[m.offset for m in chunk] for chunk in event_chunks(sources, max_events=100)]

    # alice's events before her erasure must be learnt before it: a new chunk
    assert offsets([source(0, [click(0)]), source(1, [click(1, "bob")], partition=1),
                    source(2, request=erasure()), source(3, [click(2)])]) == [[0, 1], [2, 3]]
    # so must a named session's, whoever's events they are
    assert offsets([source(0, [click(0, "carol", "s1")]),
                    source(1, request=erasure(sessions=["s1"]))]) == [[0], [1]]
    # an erasure of a user the chunk holds nothing of joins it (applied first, same effect)
    assert offsets([source(0, [click(0, "bob")]), source(1, request=erasure()),
                    source(2, [click(1)]), source(3, request=erasure(request="r2"))]) == [
        [0, 1, 2], [3]]
    # consecutive erasures, and one before any event, share a chunk
    assert offsets([source(0, request=erasure()), source(1, request=erasure("bob")),
                    source(2, [click(0)])]) == [[0, 1, 2]]


def events_of(user, session, items, start):
    return [Interaction(event_id=f"{user}-{session}-{n}", user_id=user, item_id=item,
                        type="click", timestamp=start + n, session_id=session)
            for n, item in enumerate(items)]


def learnt(name):
    model = build(name, **({"min_examples": 10_000} if name in NEARLINE_MODELS else {}))
    model.bind(MemoryStore())
    items = [f"i{n}" for n in range(12)]
    events = (events_of("alice", "s1", items[:6], 1.7e9) + events_of("alice", None, items[3:9],
                                                                      1.7e9 + 10)
              + events_of("bob", "s9", items[4:10], 1.7e9 + 20))
    model.learn(SignalMapper().map(events))
    return model


def held(model):
    """What the model (and its parts) hold per user-keyed table: key → row or vector."""
    out = {}
    for part in [model, *getattr(model, "parts", {}).values()]:
        for table in part.user_tables:
            rows = part.store.get_local_rows(table, ["alice", "s1", "bob", "s9"])
            out[(part.name, table)] = dict(zip(["alice", "s1", "bob", "s9"], rows))
        for table in part.user_vector_tables:
            dim = part.factors
            vectors, found = part.store.get_local_vectors(table, ["alice", "bob"], dim)
            out[(part.name, table)] = {key: vector.tolist() if ok else None
                                      for key, vector, ok in zip(["alice", "bob"], vectors,
                                                                 found.tolist())}
    return out


USER_STATE_MODELS = ["session", "cooc", "mf", "als", "content", "itemknn", "history", "isgd",
                     "user_blend_ctx", "two_tower"]


@pytest.mark.parametrize("name", USER_STATE_MODELS)
def test_forget_deletes_the_users_and_sessions_state_and_nothing_of_others(name):
    model = learnt(name)
    before = held(model)
    assert before, f"{name} declares no user-keyed tables"
    assert any(row not in ({}, None) for rows in before.values()
               for key, row in rows.items() if key in ("alice", "s1")), "nothing learnt"
    model.forget(["alice", "s1"])
    after = held(model)
    for table, rows in after.items():
        for key in ("alice", "s1"):
            assert rows.get(key) in (None, {}, ), f"{table} still holds {key}"
        for key in ("bob", "s9"):
            assert rows.get(key) == before[table].get(key), f"{table} changed {key}"
    assert ids_anywhere(model, {"alice", "s1"}) == [], "an erased id is still in the state"
    assert ids_anywhere(model, {"bob", "s9"}), "the other user's ids are gone too"


def ids_anywhere(model, ids) -> list:
    """Where any of ``ids`` is a row key, a row member or a vector key in the model's (and
    its parts') stores: (table, key)."""
    found = []
    for part in [model, *getattr(model, "parts", {}).values()]:
        for table, rows in part.store.rows.items():
            found += [(table, key) for key, row in rows.items()
                      if key in ids or ids & row.keys()]
        for table, vectors in part.store.vectors.items():
            found += [(table, key) for key in vectors if key in ids]
    return found


def test_gru4rec_drops_the_erased_sessions_from_its_window():
    model = learnt("gru4rec")
    held_before = model.examples_held
    model.forget(["alice", "s1"])
    assert set(model._sessions) == {"s9"}
    assert model.examples_held == held_before - 12 == len(model._sessions["s9"])


def forgotten_tables(model) -> set[str]:
    """The user- and session-keyed tables a model and its parts (recursively) forget."""
    return set(model.user_tables).union(*(forgotten_tables(part)
                                          for part in getattr(model, "parts", {}).values()))


def test_every_partition_local_table_keyed_by_user_or_session_is_forgotten():
    """A model's local tables are user- or session-keyed (forgotten) unless item-keyed
    (content's attrs): a new model with user state must name its tables, or an erasure would
    miss them."""
    for name in [n for n in MODELS if n not in NEARLINE_MODELS]:
        model = build(name)
        missing = set(model.local_tables) - forgotten_tables(model) - {"attrs"}
        assert not missing, f"{name}: local tables {missing} are not forgotten"
