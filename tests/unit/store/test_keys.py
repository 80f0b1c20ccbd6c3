"""Redis key names: one slot per entity, no two entities sharing a key."""

from __future__ import annotations

import pytest

from featurestore.store.keys import entity_token, entity_tokens, row_key, row_keys, watermark_key


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
    assert watermark_key("p", "v") == b"p:__meta__:watermark:v"
