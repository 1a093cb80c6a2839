import json

import pytest

from replay.loaders import LogFormatError, iter_realtime, load_log, load_otto, load_yoochoose
from tests.conftest import SHARED_DATA


def test_yoochoose_dwell_is_gap_to_next_click_in_session(tmp_path):
    path = tmp_path / "clicks.txt"
    path.write_text("SessionId\tItemId\tTime\n1\t10\t100.0\n1\t11\t103.5\n1\t12\t160\n"
                    "2\t10\t101\n")
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
    path.write_text("SessionId\tItemId\tTime\n1\t10\t100\n1\t11\t110\n")
    assert [due for due, _ in iter_realtime(load_yoochoose(path), speed=10)] == [0.0, 1.0]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data absent (outside the team)")
def test_shared_logs_load():
    clicks = load_log(SHARED_DATA / "yoochoose-rsc15-100k", "yoochoose")
    assert len(clicks) == 70_278 + 13_568
    assert len(load_log(SHARED_DATA / "otto-sample" / "train.jsonl", "otto")) == 862
