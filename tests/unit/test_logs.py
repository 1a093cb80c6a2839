import json
import logging

from infra.logs import JsonFormatter


def test_json_lines_carry_the_extra_fields_and_exceptions():
    record = logging.LogRecord("streamrec.ingest", logging.INFO, __file__, 1, "batch %s", ("x",),
                               None)
    record.applied = 12
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "batch x" and doc["applied"] == 12 and doc["level"] == "INFO"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc"]
