"""Commands packed for Redis: the fast path for large byte strings packs exactly as hiredis."""

import msgspec
import pytest
from hiredis import pack_command

from infra.redis_client import pack


@pytest.mark.parametrize("command", [
    ("SADD", "sr:seen:1", "a", "b"),  # small: hiredis itself
    ("EVALSHA", "f" * 40, 2, "k1", "k2", 3600.0, 1.7e9 + 0.125, 10_000, 0,
     *[x for j in range(50) for x in (f"item{j}", j * 0.37)]),  # many args, last a float
    ("EVALSHA", "f" * 40, 100, *[f"sr:m:cooc:cooc:é{i}" for i in range(100)], 60_000,
     *[msgspec.msgpack.encode({f"m{j}": j / 3 for j in range(i)}) for i in range(100)]),
    ("MSET", *[x for i in range(40) for x in (f"k{i}", bytes(range(i % 7)) * 300)]),
    ("MSET", *[x for i in range(40) for x in (f"sr:m:é:{{{i}}}", b"v" * i)]),  # names: UTF-8
    ("MSET", *[x for i in range(40) for x in (b"k%d" % i, b"v")]),  # bytes names: general path
    ("MSET", *[x for i in range(40) for x in (f"k{i}", 1.5 if i == 3 else b"v")]),  # a float
])
def test_pack_is_byte_identical_to_hiredis(command):
    assert pack(command) == pack_command(command)


def test_a_reset_socket_while_reading_replies_is_redis_connection_error():
    """A node killed mid-reply resets the socket: the fast reply reader must raise redis's
    ConnectionError (what every caller retries as transient), not the raw OSError."""
    import hiredis
    import redis

    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    from infra.redis_client import _replies

    class ResetParser:  # as redis-py's hiredis parser builds its reader
        _reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)

        def read_from_socket(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    connection = type("Connection", (), {"_parser": ResetParser()})()
    with pytest.raises(redis.ConnectionError, match="reset by peer"):
        list(_replies(connection, 1))
