"""Redis Cluster addressing: hash slots as Redis computes them, and the cluster URL."""

from __future__ import annotations

import re

import pytest

from featurestore.config import Settings, redact_url
from featurestore.errors import ConfigError
from featurestore.store.keys import entity_token, row_key
from featurestore.store.slots import (
    ClusterAddress,
    group_by_slot,
    is_cluster_url,
    key_slot,
    parse_cluster_url,
    redact_cluster_url,
)


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        # CLUSTER KEYSLOT of a Redis 6.2 server, and the specification's own example
        (b"123456789", 12739),
        (b"foo", 12182),
        (b"{user1000}.following", 3443),
        (b"{user1000}.followers", 3443),
        (b"foo{}{bar}", 8363),  # an empty tag: the whole key hashes
        (b"foo{{bar}}zap", 4015),  # the tag is "{bar"
        (b"foo{bar}{zap}", 5061),  # the first tag only
        (b"", 0),
    ],
)
def test_slots_are_redis_cluster_slots(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot


def test_grouping_by_slot_is_key_slot() -> None:
    keys = [b"foo", b"{user1000}.following", b"p:v:{1}", b"p:w:{1}", b"foo{}{bar}", b"x{", b"x}{", b"", b"p:v:{2}"]
    groups = group_by_slot(keys)
    assert [i for at in groups.values() for i in at] != [] and sorted(i for at in groups.values() for i in at) == list(
        range(len(keys))
    )
    for slot, at in groups.items():
        assert all(key_slot(keys[i]) == slot for i in at) and at == sorted(at)


def test_an_entity_views_share_its_slot() -> None:
    token = entity_token(["a|b"])
    assert key_slot(row_key("p", "v1", token)) == key_slot(row_key("q", "v2", token)) == key_slot(token)


@pytest.mark.parametrize(
    ("url", "seeds", "user", "password", "tls"),
    [
        ("redis+cluster://h1:7000,h2:7001/", (("h1", 7000), ("h2", 7001)), None, None, False),
        ("redis+cluster://h1", (("h1", 6379),), None, None, False),
        ("rediss+cluster://u:p%40ss@h1:7000/0", (("h1", 7000),), "u", "p@ss", True),
        ("REDIS+CLUSTER://:pw@[::1]:7000,10.0.0.1:7000", (("::1", 7000), ("10.0.0.1", 7000)), None, "pw", False),
    ],
)
def test_cluster_urls_parse(
    url: str, seeds: tuple[tuple[str, int], ...], user: str | None, password: str | None, tls: bool
) -> None:
    assert is_cluster_url(url)
    assert parse_cluster_url(url) == ClusterAddress(seeds, user, password, tls)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://h:6379/0", "starts with redis+cluster://"),
        ("redis+cluster://h1:7000/3", "one database"),
        ("redis+cluster://h1:x,h2:7000/", "no valid port"),
        ("redis+cluster://:secret@h1:99999/", "no valid port"),
        ("redis+cluster://h1:7000,,h2:7000/", "is not host:port"),
    ],
)
def test_bad_cluster_urls_fail_in_one_line_without_the_password(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as caught:
        parse_cluster_url(url)
    assert "secret" not in str(caught.value)


def test_the_password_never_prints() -> None:
    url = "redis+cluster://user:secret@h1:7000,h2:7000/"
    assert redact_cluster_url(url) == "redis+cluster://user:***@h1:7000,h2:7000/"
    assert "secret" not in repr(parse_cluster_url(url))
    address = parse_cluster_url(url)
    assert address.node_url("h2", 7000) == "redis://user:secret@h2:7000/0"


def test_the_settings_take_a_cluster_url_and_never_print_its_password() -> None:
    settings = Settings(redis_url="redis+cluster://:secret@10.0.0.5:7000,10.0.0.6:7000/")
    assert "secret" not in repr(settings) and "10.0.0.6:7000" in repr(settings)
    assert redact_url(settings.redis_url) == "redis+cluster://:***@10.0.0.5:7000,10.0.0.6:7000/"
    with pytest.raises(ConfigError, match="no valid port") as caught:
        Settings(redis_url="redis+cluster://:secret@10.0.0.5:port/")
    assert "secret" not in str(caught.value)
    with pytest.raises(ConfigError, match=re.escape("redis://, rediss://, unix:// or redis+cluster://")):
        Settings(redis_url="http://10.0.0.5:6379")
