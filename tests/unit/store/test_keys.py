"""Redis key names: one slot per entity, no two entities sharing a key."""

from __future__ import annotations

import pytest

from featurestore.store.keys import (
    entity_token,
    entity_tokens,
    events_channel,
    hot_key,
    legacy_watermark_key,
    lock_key,
    row_key,
    row_keys,
    versions_key,
    watermark_key,
)
from featurestore.store.slots import key_slot


def _hash_tag(key: bytes) -> bytes:
    start = key.index(b"{")
    return key[start + 1 : key.index(b"}", start)]


def test_views_of_one_entity_share_the_hash_tag() -> None:
    token = entity_token([42])
    a, b = row_key("p", "user_profile", token), row_key("p", "user_activity", token)
    assert a == b"p:user_profile:{42}"
    assert _hash_tag(a) == _hash_tag(b) == b"42"


@pytest.mark.parametrize(
    ("values", "token"),
    [
        ([7], b"7"),
        ([-7], b"-7"),
        (["a|b"], b"a%7Cb"),
        (["{x}"], b"%7Bx%7D"),
        (["100%"], b"100%25"),
        ([1, "x"], b"1|x"),
    ],
)
def test_tokens_escape_separators_and_braces(values: list[int | str], token: bytes) -> None:
    assert entity_token(values) == token


def test_distinct_entities_never_collide() -> None:
    assert entity_token(["a|b"]) != entity_token(["a", "b"])
    assert entity_token(["a%7Cb"]) != entity_token(["a|b"])


def test_columnar_tokens_equal_row_tokens() -> None:
    assert entity_tokens([[1, 2]]) == [b"1", b"2"]
    assert entity_tokens([["x", "y"]]) == [b"x", b"y"]
    assert entity_tokens([[1, 2], ["a", "b"]]) == [b"1|a", b"2|b"]
    assert row_keys("p", "v", [b"1"]) == [b"p:v:{1}"]


def test_bool_is_not_a_join_key() -> None:
    with pytest.raises(TypeError, match="not bool"):
        entity_token([True])


def test_meta_keys_live_apart_from_rows() -> None:
    # Issue 12 gave bookkeeping keys the hash tag {__meta__} (one slot on a Redis Cluster);
    # they were b"p:__meta__:watermark:v" before (legacy_watermark_key), the channel kept its name.
    assert watermark_key("p", "v") == b"p:{__meta__}:watermark:v"
    assert watermark_key("p", "v", "shard-0-of-3") == b"p:{__meta__}:watermark:v:shard-0-of-3"
    assert legacy_watermark_key("p", "v") == b"p:__meta__:watermark:v"
    assert events_channel("p") == b"p:__meta__:events"


def test_every_bookkeeping_key_shares_one_slot() -> None:
    meta = [watermark_key("p", "v"), watermark_key("q", "w", "shard-1-of-2"), lock_key("p"), hot_key("p")]
    meta.append(versions_key("p"))
    assert len({key_slot(k) for k in meta}) == 1
    assert key_slot(row_key("p", "v", b"__meta__")) == key_slot(meta[0])  # the tag is what hashes
