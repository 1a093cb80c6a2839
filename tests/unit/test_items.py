"""Item descriptions: the items contract, the MovieLens loader and the content model."""

import json

import pytest

from online_models.base import Query
from online_models.content import ContentModel
from online_models.signals import SignalMapper
from replay.loaders import LogFormatError, load_items, load_movielens_items
from replay.protocols import ItemTimeline
from schemas.events import Interaction
from schemas.items import ItemRecord, encode_items, latest_per_item, split_items

T = 1.7e9


def record(item, categories=(), tags=(), ts=T, **fields):
    return ItemRecord(item_id=item, timestamp=ts, categories=list(categories), tags=list(tags),
                      **fields)


# --- the contract --------------------------------------------------------------------------
def test_an_envelope_keeps_its_valid_records_and_names_each_bad_field():
    raw = json.dumps({"items": [{"item_id": "a", "timestamp": T, "categories": ["Drama"]},
                                {"item_id": "b", "timestamp": T, "categories": [""]},
                                {"item_id": "c", "timestamp": "yesterday"}]}).encode()
    good, bad = split_items(raw)
    assert [r.item_id for r in good] == ["a"]
    assert [(i, e.errors[0]["field"]) for i, _, e in bad] == [(1, "items[1].categories[0]"),
                                                              (2, "items[2].timestamp")]


@pytest.mark.parametrize("raw, reason", [
    (b'{"item_id": "a", "item_id": "b", "timestamp": 1.7e9}', "key repeated"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (b"\xff\x00", "not JSON"),
    (b'{"item_id": "a", "timestamp": 4e9}', "future"),
    (b'{"item_id": "a", "timestamp": 1.7e9, "price": 3}', "unknown field"),
    (b'{"items": []}', "length >= 1"),
])
def test_invalid_messages_are_refused_with_a_reason(raw, reason):
    good, bad = split_items(raw)
    assert good == [] and len(bad) == 1
    assert reason in str(bad[0][2])


def test_oversized_messages_are_refused_before_parsing():
    good, bad = split_items(encode_items([record("a", tags=["x" * 60] * 60)]), max_bytes=100)
    assert good == [] and "exceeds the 100-byte limit" in str(bad[0][2])


def test_the_newest_description_of_an_item_wins_in_any_order():
    old, new = record("a", ["Drama"], ts=T), record("a", ["Comedy"], ts=T + 1)
    assert latest_per_item([new, old])["a"] is new
    assert latest_per_item([old, new])["a"] is new


# --- the content model ---------------------------------------------------------------------
def liked(user, *items, ts=T):
    return SignalMapper().map([Interaction(event_id=f"{user}-{item}", user_id=user, item_id=item,
                                           type="like", timestamp=ts + n)
                               for n, item in enumerate(items)])


CATALOGUE = [record("c1", ["Comedy"]), record("c2", ["Comedy"]), record("c3", ["Comedy"]),
             record("d1", ["Drama"]), record("d2", ["Drama"]), record("h1", ["Horror"])]


def test_an_item_nobody_touched_is_recommended_for_its_description_and_explained():
    model = ContentModel()
    model.learn_items(CATALOGUE)
    model.learn(liked("u", "c1", "c2"))
    [rec] = model.recommend([Query("u", exclude=frozenset({"c1", "c2"}))], k=3)
    assert rec.items[0] == "c3"  # never interacted with: only its description says Comedy
    assert model.explain([Query("u")], [["c3", "h1"]]) == [["category:Comedy", ""]]


def test_withdrawn_items_leave_and_older_descriptions_change_nothing():
    model = ContentModel()
    model.learn_items(CATALOGUE)
    model.learn(liked("u", "c1"))
    model.learn_items([record("c3", ["Comedy"], ts=T + 5, available=False)])
    assert model.learn_items([record("c3", ["Comedy"], ts=T + 1)]) == 0  # older: ignored
    [rec] = model.recommend([Query("u", exclude=frozenset({"c1"}))], k=3)
    assert "c3" not in rec.items and rec.items[0] == "c2"


def test_learning_a_description_twice_changes_no_state():
    model = ContentModel()
    model.learn_items(CATALOGUE)
    before = {t: dict(rows) for t, rows in model.store.rows.items()}
    assert model.learn_items(CATALOGUE) == 0
    assert {t: dict(rows) for t, rows in model.store.rows.items()} == before


def test_document_frequency_follows_changed_descriptions():
    model = ContentModel()
    model.learn_items(CATALOGUE)
    model.learn_items([record("h1", ["Comedy"], ts=T + 1)])
    df = model.store.get_rows("df", ["all"])[0]
    assert df["category:Comedy"] == 4 and df.get("category:Horror", 0) == 0


def test_the_session_steers_an_anonymous_query():
    model = ContentModel()
    model.learn_items(CATALOGUE)
    [rec] = model.recommend([Query("nobody", ("d1",), exclude=frozenset({"d1"}))], k=1)
    assert rec.items == ["d2"]


# --- the MovieLens loader and the replay timeline -----------------------------------------
@pytest.fixture
def movielens(tmp_path):
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n"
        "2,Old Film (1950),(no genres listed)\n3,Undated,Drama\n")
    (tmp_path / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n5,1,pixar,1000000000\n6,1,Pixar,1000000500\n"
        "7,99,ghost,1000000600\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,999999999\n")
    return tmp_path


def test_movielens_descriptions_arrive_when_they_could_be_known(movielens):
    records = load_movielens_items(movielens)
    toy = [r for r in records if r.item_id == "1"]
    assert [r.timestamp for r in toy] == [788918400.0, 1e9, 1000000500.0]  # 1995-01-01, tags
    assert toy[0].categories == ["Animation", "Comedy"] and toy[0].title == "Toy Story"
    assert toy[-1].tags == ["1990s", "pixar"]  # the same tag twice counts once
    assert [r.categories for r in records if r.item_id == "2"] == [[]]
    assert load_items(movielens / "ratings.csv", "movielens") == records
    assert load_items(movielens, "yoochoose") == []


def test_movielens_descriptions_need_movies_csv(tmp_path):
    with pytest.raises(LogFormatError, match="movies.csv"):
        load_movielens_items(tmp_path)


def test_the_timeline_hands_out_each_description_once_never_ahead_of_time():
    timeline = ItemTimeline([record("b", ts=T + 10), record("a", ts=T)])
    assert [r.item_id for r in timeline.until(T + 5)] == ["a"]
    assert timeline.until(T + 5) == []
    assert [r.item_id for r in timeline.until(T + 10)] == ["b"]


def test_committed_items_json_schema_file_is_current():
    from pathlib import Path

    from schemas.items import json_schema

    path = Path(__file__).resolve().parents[2] / "schemas" / "item.schema.json"
    assert json.loads(path.read_text()) == json_schema(), "run `make docs`"
