import pytest
from hypothesis import given, strategies as st
from redis.crc import key_slot

from schemas.keys import RedisKeys, decode_id, encode_id

NASTY = ["a:b", "a/b", "{a}", "}{", "a\0b", "naïve", "ключ", "🙂", "%41", "a b", "*", "?[x]"]


@pytest.mark.parametrize("raw", NASTY)
def test_encoding_roundtrips_and_is_key_safe(raw):
    encoded = encode_id(raw)
    assert decode_id(encoded) == raw
    assert not set(encoded) & set(":{}/\0 *?[]")
    assert encoded.isascii()


def test_distinct_ids_never_share_a_key():
    keys = RedisKeys("sr")
    built = {keys.feed(raw) for raw in NASTY} | {keys.feed("a"), keys.feed("a:b:feed")}
    assert len(built) == len(NASTY) + 2


@given(st.text(min_size=1, max_size=50))
def test_user_keys_share_one_cluster_slot_whatever_the_id(raw):
    keys = RedisKeys("sr")
    assert key_slot(keys.feed(raw).encode()) == key_slot(keys.user_history(raw).encode())
    assert decode_id(encode_id(raw)) == raw


def test_hash_tag_of_user_id_with_braces_cannot_escape():
    keys = RedisKeys("sr")
    assert key_slot(keys.feed("{x}").encode()) != key_slot(b"x") or \
        keys.feed("{x}") == "sr:{u:%7Bx%7D}:feed"
    assert keys.feed("{x}") == "sr:{u:%7Bx%7D}:feed"


def test_shared_keys_have_their_own_tags_and_specs_cover_every_builder():
    keys = RedisKeys("p")
    assert keys.trending.startswith("p:{trend}") and keys.trending_meta.startswith("p:{trend}")
    patterns = " ".join(spec.pattern for spec in keys.specs())
    for fragment in (":feed", ":hist", "{trend}:z", "{trend}:meta", "{feedq}", "{stats}"):
        assert fragment in patterns
