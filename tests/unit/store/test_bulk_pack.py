"""The numpy packers of store/bulk.py against hiredis's packer, command by command."""

from __future__ import annotations

import hiredis
import numpy as np
import pytest

from featurestore.store.bulk import pack_evalsha, pack_set_nx

RNG = np.random.default_rng(7)
# Key lengths interleaved, a NUL byte inside a key, expiries of 1 to 14 digits.
KEYS = [b"p:v:{%d}" % v for v in RNG.integers(0, 10**7, 300)] + [b"p:v:{a\x00b}", b"k", b""]
ROWS = RNG.integers(0, 256, (len(KEYS), 41), dtype=np.uint8)


def _commands(packed: memoryview) -> list[list[bytes]]:
    """Requests are RESP arrays of bulk strings: hiredis's reader parses them back."""
    reader = hiredis.Reader()
    reader.feed(bytes(packed))
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


@pytest.mark.parametrize("expiring", [False, True])
def test_set_nx_packs_what_hiredis_packs_in_the_order_it_returns(expiring: bool) -> None:
    expire_at = 10 ** RNG.integers(0, 14, len(KEYS)) + RNG.integers(0, 9, len(KEYS)) if expiring else None
    packed, order = pack_set_nx(KEYS, ROWS, expire_at)
    assert sorted(order.tolist()) == list(range(len(KEYS)))
    expected = []
    for i in order.tolist():
        pxat = () if expire_at is None else (b"PXAT", int(expire_at[i]))
        expected.append(hiredis.pack_command((b"SET", KEYS[i], ROWS[i].tobytes(), *pxat, b"NX")))  # type: ignore[arg-type]
    assert bytes(packed) == b"".join(expected)


def test_evalsha_calls_keep_each_key_with_its_row() -> None:
    sha = "f" * 40
    packed, calls = pack_evalsha(sha, KEYS, ROWS, 86_400_000, per_call=128)
    commands = _commands(packed)
    assert calls == len(commands) == 3
    seen = []
    for command in commands:
        name, digest, count, *rest = command
        n = int(count)
        assert (name, digest, len(rest)) == (b"EVALSHA", sha.encode(), 2 * n + 1)
        assert rest[n] == b"86400000"
        seen += list(zip(rest[:n], rest[n + 1 :], strict=True))
    assert sorted(seen) == sorted((k, r.tobytes()) for k, r in zip(KEYS, ROWS, strict=True))
