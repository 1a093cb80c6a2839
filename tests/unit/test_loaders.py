import json

import pytest

from replay.loaders import LogFormatError, iter_realtime, load_log, load_otto, load_yoochoose
from tests.conftest import SHARED_DATA


def test_yoochoose_dwell_is_gap_to_next_click_in_session(tmp_path):
    path = tmp_path / "clicks.txt"
    path.write_text("SessionId\tItemId\tTime\n1\t10\t1700000100.0\n1\t11\t1700000103.5\n"
                    "1\t12\t1700000160\n2\t10\t1700000101\n")
    events = load_yoochoose(path)
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)
    by_item = {(e.session_id, e.item_id): e for e in events}
    assert by_item[("1", "10")].dwell_ms == 3500
    assert by_item[("1", "11")].dwell_ms == 56500
    assert by_item[("1", "12")].dwell_ms is None and by_item[("2", "10")].dwell_ms is None
    assert all(e.type == "click" and e.user_id == f"s{e.session_id}" for e in events)


def test_yoochoose_original_csv_format(tmp_path):
    path = tmp_path / "yoochoose-clicks.dat"
    path.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n")
    events = load_yoochoose(path)
    assert [e.item_id for e in events] == ["214536502", "214536500"]
    assert events[0].dwell_ms == 180591


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("SessionId\tItemId\tTime\n1\t10\tnot-a-time\n")
    with pytest.raises(LogFormatError, match="bad.txt:2"):
        load_yoochoose(path)
    otto = tmp_path / "bad.jsonl"
    otto.write_text('{"session": 1, "events": [{"aid": 1, "ts": 1, "type": "teleport"}]}\n')
    with pytest.raises(LogFormatError, match="bad.jsonl:1"):
        load_otto(otto)
    with pytest.raises(LogFormatError, match="unknown format"):
        load_log(path, "nope")


def test_otto_types_mapped(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"session": 5, "events": [
        {"aid": 1, "ts": 1_659_304_800_000, "type": "clicks"},
        {"aid": 1, "ts": 1_659_304_900_000, "type": "carts"},
        {"aid": 2, "ts": 1_659_305_000_000, "type": "orders"}]}) + "\n")
    assert [e.type for e in load_otto(path)] == ["click", "add_to_cart", "purchase"]


def test_realtime_schedule_scales_with_speed(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("SessionId\tItemId\tTime\n1\t10\t1700000100\n1\t11\t1700000110\n")
    assert [due for due, _ in iter_realtime(load_yoochoose(path), speed=10)] == [0.0, 1.0]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data absent (outside the team)")
def test_shared_logs_load():
    clicks = load_log(SHARED_DATA / "yoochoose-rsc15-100k", "yoochoose")
    assert len(clicks) == 70_278 + 13_568
    assert len(load_log(SHARED_DATA / "otto-sample" / "train.jsonl", "otto")) == 862


def test_diginetica_views(tmp_path):
    path = tmp_path / "train-item-views.csv"
    path.write_text("sessionId;userId;itemId;timeframe;eventdate\n1;;81766;526309;2016-05-09\n"
                    "1;;31331;1031018;2016-05-09\n2;7;32118;243569;2016-05-10\n")
    events = load_log(path, "diginetica")
    by_item = {e.item_id: e for e in events}
    assert by_item["81766"].dwell_ms == 1031018 - 526309
    assert by_item["81766"].timestamp == pytest.approx(1462752000 + 526.309)
    assert [e.session_id for e in events] == ["1", "1", "2"]


def test_retailrocket_events(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("timestamp,visitorid,event,itemid,transactionid\n"
                    "1433221332117,257597,view,355908,\n1433221400000,257597,addtocart,355908,\n"
                    "1433224214164,257597,transaction,248676,4000\n")
    events = load_log(path, "retailrocket")
    assert [e.type for e in events] == ["view", "add_to_cart", "purchase"]
    # the purchase came 47 min after the cart: a new session (30 min inactivity)
    assert events[0].session_id == events[1].session_id != events[2].session_id


@pytest.mark.parametrize("name, text", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t5\t891717742\n22\t377\t1\t878887116\n"),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::377::1::978300000\n"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.0,964981247\n"
                    "2,377,1.5,964980000\n"),
])
def test_movielens_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    events = load_log(path, "movielens")
    assert len(events) == 3
    kinds = {e.item_id: e.type for e in events}
    assert kinds["377"] == "dislike" and "like" in kinds.values() and "view" in kinds.values()


def test_kuairec_style_dwell_and_duration(tmp_path):
    path = tmp_path / "small_matrix.csv"
    path.write_text("user_id,video_id,play_duration,video_duration,time,date,timestamp,"
                    "watch_ratio\n14,148,4381,6067,2020-07-05 05:27:48.378,20200705,"
                    "1593898068.378,0.722\n14,183,11635,6100,2020-07-05 05:28:00.057,20200705,"
                    "1593898080.057,1.907\n")
    events = load_log(path, "kuairec")
    assert [(e.dwell_ms, e.item_duration_ms) for e in events] == [(4381, 6067), (11635, 6100)]
    from online_models.signals import SignalMapper

    weights = SignalMapper().map(events).weights
    assert weights[0] == -1.0 and weights[1] > 1.0  # 4.4 s play = skip; 1.9× replay = strong


def test_generic_csv_and_jsonl_with_mapping(tmp_path):
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("who,what,when,kind\na,x,1700000000000,like\na,y,1700000005000,\n")
    events = load_log(csv_path, "csv:user=who,item=what,ts=when,ts_unit=ms,type=kind")
    assert [(e.item_id, e.type, e.timestamp) for e in events] == [
        ("x", "like", 1.7e9), ("y", "click", 1.7e9 + 5)]
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text('{"u": 1, "i": 2, "t": 1700000000, "d": 1500}\n')
    [event] = load_log(jsonl, "jsonl:user=u,item=i,ts=t,dwell_ms=d")
    assert (event.user_id, event.item_id, event.dwell_ms) == ("1", "2", 1500)
    with pytest.raises(LogFormatError, match="lacks"):
        load_log(jsonl, "jsonl:user=u")
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what,when,kind\na,x,1700000000,teleport\n")
    with pytest.raises(LogFormatError, match="teleport|type"):
        load_log(bad, "csv:user=who,item=what,ts=when,type=kind")


def test_split_by_test_days(tmp_path):
    from replay.loaders import load_split

    path = tmp_path / "c.txt"
    day = 86400
    path.write_text("SessionId\tItemId\tTime\n" + "".join(
        f"{s}\t{s % 3}\t{1.7e9 + s * day + k}\n" for s in range(5) for k in range(2)))
    train, test = load_split(path, "yoochoose", test_days=1.5)
    assert {e.session_id for e in test} == {"3", "4"}
    assert {e.session_id for e in train} == {"0", "1", "2"}


@pytest.mark.parametrize("header", ["sessionId;userId;itemId;timeframe;eventdate",
                                    "session_id;user_id;item_id;timeframe;eventdate"])
def test_diginetica_both_header_spellings(tmp_path, header):
    path = tmp_path / "sample_train-item-views.csv"  # the name SR-GNN ships its sample under
    path.write_text(f"{header}\n1;NA;81766;526309;2016-05-09\n1;NA;31331;1031018;2016-05-09\n")
    assert [e.item_id for e in load_log(path, "diginetica")] == ["81766", "31331"]
    assert [e.item_id for e in load_log(tmp_path, "diginetica")] == ["81766", "31331"]


@pytest.mark.parametrize("folder, name, text", [
    ("ml-100k", "u.data", "196\t242\t3\t881250949\n186\t302\t5\t891717742\n"),
    ("ml-1m", "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"),
    ("ml-latest-small", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"
                                       "1,3,3.0,964981247\n"),
])
def test_movielens_folder_layouts(tmp_path, folder, name, text):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / name).write_text(text)
    (tmp_path / folder / "README.txt").write_text("not ratings")
    assert len(load_log(tmp_path / folder, "movielens")) == 2


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data absent (outside the team)")
def test_shared_movielens_folder_loads():
    folder = SHARED_DATA / "movielens-latest-small"
    events = load_log(folder, "movielens")
    assert len(events) == len((folder / "ratings.csv").read_text().splitlines()) - 1  # header
    assert events[0].timestamp <= events[-1].timestamp
