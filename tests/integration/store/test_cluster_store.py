"""The store on a real Redis Cluster (3 masters, 3 replicas on loopback): per-slot reads on
every master at once, redirections, guarded writes, scans, events, and dead or stuck masters."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from featurestore.embedded import EmbeddedRedisCluster
from featurestore.errors import Unavailable
from featurestore.store.cluster import ClusterPipe
from featurestore.store.events import EventSubscriber, Gap, WarmEvent, WrittenEvent, publish_warm, publish_written
from featurestore.store.keys import hot_key, versions_key
from featurestore.store.layout import DType, FeatureSpec, Layout, decode_rows, encode_rows
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import ClusterClient, connect, guarded_write, mget, scan_keys
from featurestore.store.slots import key_slot, parse_cluster_url

LAYOUT = Layout("v", (FeatureSpec("x", DType.INT64),))


def _keys(n: int, view: str = "v") -> list[bytes]:
    return [b"p:%s:{%d}" % (view.encode(), i) for i in range(n)]


def _rows(x: list[int], ts_us: int | None = None) -> list[bytes]:
    ts = int(time.time() * 1e6) if ts_us is None else ts_us
    return encode_rows(LAYOUT, [ts] * len(x), {"x": x})


def _owner_ports(url: str) -> list[int]:
    """Slot -> the port of its master, from CLUSTER SLOTS."""
    host, port = parse_cluster_url(url).seeds[0]
    with redis.Redis(host=host, port=port) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    owners = [0] * 16384
    for start, end, master, *_ in ranges:
        owners[start : end + 1] = [int(master[1])] * (end - start + 1)
    return owners


@pytest.fixture
async def pipe(redis_cluster_url: str) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe.from_url(redis_cluster_url)
    yield pipe
    await pipe.close()


async def test_a_read_spans_every_master_and_keeps_the_callers_order(
    cluster_client: ClusterClient, pipe: RedisPipe, redis_cluster_url: str
) -> None:
    assert isinstance(pipe, ClusterPipe)
    keys = _keys(2000)
    counts = await guarded_write(
        cluster_client, [(keys[:1000], _rows(list(range(1000)))), (keys[1000:], _rows(list(range(1000, 2000))))], 0, []
    )
    assert (counts.written, counts.skipped) == (2000, 0)
    owners = _owner_ports(redis_cluster_url)
    assert len({owners[key_slot(k)] for k in keys}) == 3  # the rows live on every master
    wanted = [keys[7], b"p:v:{missing}", keys[1999], keys[7], *keys[500:600]]
    got = await pipe.execute(b"MGET", *wanted)
    decoded = decode_rows(LAYOUT, got)
    assert got[1] is None and got[0] == got[3]
    assert decoded.columns["x"][[0, 2, 3]].tolist() == [7, 1999, 7]
    assert decoded.columns["x"][4:].tolist() == list(range(500, 600))
    assert await mget(cluster_client, keys) == await pipe.execute(b"MGET", *keys)


async def test_concurrent_reads_share_the_connections_and_each_gets_its_rows(
    cluster_client: ClusterClient, pipe: RedisPipe
) -> None:
    keys = _keys(500)
    await guarded_write(cluster_client, [(keys, _rows(list(range(500))))], 0, [])
    picks = [random.Random(seed).sample(range(500), 50) for seed in range(64)]
    results = await asyncio.gather(*(pipe.execute(b"MGET", *[keys[i] for i in pick]) for pick in picks))
    for pick, rows in zip(picks, results, strict=True):
        assert decode_rows(LAYOUT, rows).columns["x"].tolist() == pick


async def test_older_rows_never_overwrite_newer_ones_on_a_cluster(
    cluster_client: ClusterClient, pipe: RedisPipe
) -> None:
    keys = _keys(300)
    now = int(time.time() * 1e6)
    sha: list[str] = []
    await guarded_write(cluster_client, [(keys, _rows([1] * 300, now))], 0, sha)
    older, newer = _rows([2] * 150, now - 1), _rows([3] * 150, now + 1)
    counts = await guarded_write(cluster_client, [(keys[:150], older), (keys[150:], newer)], 0, sha)
    assert (counts.written, counts.skipped) == (150, 150)
    assert decode_rows(LAYOUT, await pipe.execute(b"MGET", *keys)).columns["x"].tolist() == [1] * 150 + [3] * 150
    # A master that lost the script (a promoted replica may never have had it) gets it again.
    await cluster_client.rows.each_master(b"SCRIPT", b"FLUSH")
    counts = await guarded_write(cluster_client, [(keys, _rows([4] * 300, now + 2))], 0, sha)
    assert counts.written == 300


async def test_commands_on_one_key_go_to_the_master_of_its_slot(cluster_client: ClusterClient, pipe: RedisPipe) -> None:
    hot = hot_key("p")
    assert await pipe.execute(b"ZADD", hot, 2, b"a", 1, b"b") == 2
    assert await pipe.execute(b"ZREVRANGE", hot, 0, -1) == [b"a", b"b"]
    assert await pipe.execute(b"EXPIRE", hot, 60) == 1
    await cluster_client.hset(versions_key("p"), "v", 3)  # type: ignore[misc]
    assert await pipe.execute(b"HGETALL", versions_key("p")) == [b"v", b"3"]
    assert await pipe.execute(b"PING") == b"PONG"
    with pytest.raises(Unavailable, match="WRONGTYPE"):
        await pipe.execute(b"HGETALL", hot)


async def test_a_scan_walks_every_master(cluster_client: ClusterClient) -> None:
    keys = _keys(3000)
    await guarded_write(cluster_client, [(keys, _rows(list(range(3000))))], 0, [])
    await guarded_write(cluster_client, [(_keys(10, "other"), _rows(list(range(10))))], 0, [])
    found = [k async for batch in scan_keys(cluster_client, b"p:v:{*}", count=500) for k in batch]
    assert sorted(set(found)) == sorted(keys)


def _node_ids(url: str) -> dict[int, str]:
    host, port = parse_cluster_url(url).seeds[0]
    with redis.Redis(host=host, port=port) as client:
        lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()  # type: ignore[no-untyped-call]
    return {int(line.split()[1].split(":")[1].split("@")[0]): line.split()[0] for line in lines}


def _cluster(port: int, *args: Any) -> Any:
    with redis.Redis(host="127.0.0.1", port=port) as client:
        return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


async def test_a_read_follows_ask_and_moved_while_a_slot_migrates(
    cluster_client: ClusterClient, redis_cluster_url: str
) -> None:
    key = b"p:v:{migrating}"
    slot = key_slot(key)
    await guarded_write(cluster_client, [([key], _rows([42]))], 0, [])
    pipe = ClusterPipe.from_url(redis_cluster_url)
    try:
        assert await pipe.execute(b"MGET", key)  # the pipe has read the slot map
        owners, ids = _owner_ports(redis_cluster_url), _node_ids(redis_cluster_url)
        source = owners[slot]
        target = next(p for p in set(owners) if p != source)
        _cluster(target, "SETSLOT", slot, "IMPORTING", ids[source])
        _cluster(source, "SETSLOT", slot, "MIGRATING", ids[target])
        with redis.Redis(host="127.0.0.1", port=source) as client:
            client.migrate("127.0.0.1", target, [key], 0, 5000)
        # The key moved, the slot not yet: the source answers ASK, and ASKING + MGET on the target works.
        assert decode_rows(LAYOUT, await pipe.execute(b"MGET", key)).columns["x"].tolist() == [42]
        for port in set(owners):
            _cluster(port, "SETSLOT", slot, "NODE", ids[target])
        # The slot moved: the source answers MOVED, the pipe reads the map again.
        assert decode_rows(LAYOUT, await pipe.execute(b"MGET", key)).columns["x"].tolist() == [42]
        assert _owner_ports(redis_cluster_url)[slot] == target
        # And back, so the session's cluster keeps its even split.
        _cluster(source, "SETSLOT", slot, "IMPORTING", ids[target])
        _cluster(target, "SETSLOT", slot, "MIGRATING", ids[source])
        with redis.Redis(host="127.0.0.1", port=target) as client:
            client.migrate("127.0.0.1", source, [key], 0, 5000)
        for port in set(owners):
            _cluster(port, "SETSLOT", slot, "NODE", ids[source])
        assert decode_rows(LAYOUT, await pipe.execute(b"MGET", key)).columns["x"].tolist() == [42]
    finally:
        await pipe.close()


class _Heard:
    def __init__(self) -> None:
        self.events: list[WrittenEvent | WarmEvent] = []
        self.gaps: list[Gap] = []

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        self.events.append(event)

    def on_gap(self, gap: Gap) -> None:
        self.gaps.append(gap)


async def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_events_published_on_one_node_reach_subscribers_on_others(
    cluster_client: ClusterClient, redis_cluster_url: str
) -> None:
    seeds = parse_cluster_url(redis_cluster_url).seeds
    heard = [_Heard(), _Heard()]
    # One subscriber on the URL (its first seed), one on a URL that starts with another node.
    urls = [redis_cluster_url, "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in reversed(seeds)) + "/"]
    subscribers = [EventSubscriber(url, "p") for url in urls]
    try:
        for subscriber, listener in zip(subscribers, heard, strict=True):
            subscriber.add(listener)
            subscriber.start()
            await subscriber.wait_subscribed()
        for n in range(1, 4):
            await publish_written(cluster_client, "p", ["v"], ids={"v": [n]})
        await publish_warm(cluster_client, "p", 7)  # `featurestore-materialize warm`
        await _until(lambda: all(len(h.events) == 4 for h in heard))
        for listener in heard:
            assert [e.versions for e in listener.events if isinstance(e, WrittenEvent)] == [{"v": n} for n in (1, 2, 3)]
            # Published on another node: the cluster bus may deliver it before the others.
            assert WarmEvent(7) in listener.events
    finally:
        for subscriber in subscribers:
            await subscriber.close()


def _split_by_master(url: str, keys: list[bytes]) -> dict[int, list[bytes]]:
    owners = _owner_ports(url)
    split: dict[int, list[bytes]] = {}
    for key in keys:
        split.setdefault(owners[key_slot(key)], []).append(key)
    return split


@pytest.mark.slow
async def test_a_stuck_master_times_out_and_a_dead_one_fails_over_to_its_replica(
    make_cluster: Callable[[], EmbeddedRedisCluster],
) -> None:
    cluster = make_cluster()
    client = connect(cluster.url)
    pipe = ClusterPipe.from_url(cluster.url, timeout_s=0.3)
    subscriber = EventSubscriber(cluster.url, "p")
    heard = _Heard()
    subscriber.add(heard)
    try:
        assert isinstance(client, ClusterClient)
        keys = _keys(300)
        await guarded_write(client, [(keys, _rows(list(range(300))))], 0, [])
        by_master = _split_by_master(cluster.url, keys)
        victim = parse_cluster_url(cluster.url).seeds[0][1]  # also where the subscriber listens
        elsewhere = [k for port, ks in by_master.items() if port != victim for k in ks]
        subscriber.start()
        await subscriber.wait_subscribed()
        for port in by_master:  # the replicas have every row before a master goes
            with redis.Redis(host="127.0.0.1", port=port) as node:
                assert node.execute_command("WAIT", 1, 5000) == 1  # type: ignore[no-untyped-call]

        # Stuck (SIGSTOP, shorter than the node timeout): a call touching it fails after
        # the timeout, naming it; calls elsewhere are served; it serves again after.
        cluster.pause(victim)
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"{victim} did not answer within 0.3 s"):
            await pipe.execute(b"MGET", *keys)
        assert time.monotonic() - started < 1.0
        assert len(await pipe.execute(b"MGET", *elsewhere)) == len(elsewhere)
        cluster.resume(victim)
        await asyncio.sleep(0.1)
        assert decode_rows(LAYOUT, await pipe.execute(b"MGET", *keys)).found.all()

        # Dead (SIGKILL): calls touching it fail fast until its replica is promoted, then
        # the same pipe serves every row again; nothing restarted.
        cluster.kill(victim)
        killed = time.monotonic()
        with pytest.raises(Unavailable, match=str(victim)):
            await pipe.execute(b"MGET", *keys)
        assert time.monotonic() - killed < 1.0  # refused at once, not a timeout
        assert len(await pipe.execute(b"MGET", *elsewhere)) == len(elsewhere)
        for _ in range(5):  # connection failures in a row open the dead master's breaker
            with pytest.raises(Unavailable):
                await pipe.execute(b"MGET", *keys)
        with pytest.raises(Unavailable, match="failing at once"):  # known down: not even a connect
            await pipe.execute(b"MGET", *keys)
        while True:
            try:
                rows = await pipe.execute(b"MGET", *keys)
                break
            except Unavailable:
                assert time.monotonic() - killed < 15, "the replica was not promoted"
                await asyncio.sleep(0.05)
        recovered_s = time.monotonic() - killed
        assert decode_rows(LAYOUT, rows).columns["x"].tolist() == list(range(300))
        assert victim not in cluster.master_ports()
        print(f"reads recovered {recovered_s:.2f} s after the master died")
        # Writes and events follow the new master too; the subscriber moved to another node.
        await _until(lambda: Gap.RESUBSCRIBED in heard.gaps)
        assert (await guarded_write(client, [(keys, _rows([7] * 300))], 0, [])).written == 300
        await publish_written(client, "p", ["v"])
        await _until(lambda: len(heard.events) == 1)
    finally:
        await subscriber.close()
        await pipe.close()
        await client.aclose()
