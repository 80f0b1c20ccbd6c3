"""benchmarks/relay.py: bytes through in order, the delay added each way, EOF passed on."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from relay import Relay, redis_hop  # benchmarks/ is not a package


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server (one thread per connection) that closes when its client does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def round_trip_s(sock: socket.socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += sock.recv(65536)
    assert got == payload
    return time.perf_counter() - start


@pytest.mark.parametrize("delay_ms", [0.0, 0.25])
def test_every_byte_comes_back_in_order(echo_port: int, delay_ms: float) -> None:
    relay = Relay(("127.0.0.1", echo_port), delay_ms=delay_ms)
    relay.start()
    sent = b"".join(i.to_bytes(4, "little") for i in range(200_000))  # 800 kB, many chunks
    with socket.create_connection(("127.0.0.1", relay.port)) as sock:
        writer = threading.Thread(target=sock.sendall, args=(sent,))
        writer.start()  # write while reading: neither side waits for the other
        got = bytearray()
        while len(got) < len(sent):
            got += sock.recv(1 << 16)
        writer.join()
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the end of the stream came through as well
    relay.close()
    assert bytes(got) == sent
    assert relay.counters[1] > 0  # the first pump counted its chunks


def test_each_round_trip_takes_twice_the_delay(echo_port: int) -> None:
    relay = Relay(("127.0.0.1", echo_port), delay_ms=5.0)
    relay.start()
    with (
        socket.create_connection(("127.0.0.1", echo_port)) as direct,
        socket.create_connection(("127.0.0.1", relay.port)) as held,
    ):
        round_trip_s(held, b"x")  # the relay's connection to the target is made
        direct_s = min(round_trip_s(direct, b"ping") for _ in range(20))
        held_s = sorted(round_trip_s(held, b"ping") for _ in range(20))
    relay.close()
    assert direct_s < 0.005
    assert held_s[0] >= 0.010  # never less than 2 x 5 ms: held from the kernel's arrival time
    assert held_s[10] < 0.010 + 0.005 + direct_s  # the median only a few ms more (a busy machine)


def test_a_redis_hop_relays_to_redis_and_counts_what_crossed(redis_url: str) -> None:
    with redis_hop(redis_url, delay_ms=0.25) as hop:
        assert hop.url != redis_url and hop.relay is not None
        client = redis.Redis.from_url(hop.url)
        client.set("relay-test", b"v")
        start = time.perf_counter()
        assert client.get("relay-test") == b"v"
        assert time.perf_counter() - start >= 0.0005
        client.close()
        counters = hop.counters()
        assert counters["up"]["chunks"] >= 2 and counters["down"]["chunks"] >= 2
        assert hop.cpu_s() > 0
    with redis_hop(redis_url, delay_ms=0) as hop:
        assert hop.url == redis_url and hop.relay is None
