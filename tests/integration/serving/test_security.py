"""TLS, mutual TLS, certificate rotation and bearer tokens against real servers (port 0,
real Redis, the project's Feast repo), with certificates made at test time by trustme.

    tls_server    TLS + a token file + a plaintext health port; reflection needs a token
    mtls_server   mutual TLS (client certificates from the CA), no tokens
    open_server   tokens on loopback plaintext, with --reflection-open
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
import trustme
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from featurestore import AsyncClient, Client, PermissionDenied, Unauthenticated, Unavailable
from featurestore.cli import main as cli
from featurestore.config import SecuritySettings, ServerSettings, Settings
from featurestore.decode import PRESENT
from featurestore.embedded import free_port
from featurestore.errors import ConfigError, FeatureStoreError, NotFound
from featurestore.registry import load_registry
from featurestore.serving.auth import hash_token
from featurestore.serving.server import FeatureServer
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

READER = "reader-0123456789abcdefghij"
ADMIN = "admin-0123456789abcdefghijk"
BOTH = "both-0123456789abcdefghijkl"
USER = 4242  # a user whose profile the tests write
LOCAL = "127.0.0.1"


@dataclass
class Pki:
    """A CA and the files a test needs, written to `folder`."""

    ca: trustme.CA
    folder: Path

    def write(self, name: str, cert: trustme.LeafCert) -> tuple[Path, Path]:
        """cert and key PEM files for `cert`, as `name`.crt and `name`.key."""
        crt, key = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        crt.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        return crt, key

    def ca_file(self, name: str = "ca") -> Path:
        path = self.folder / f"{name}.pem"
        path.write_bytes(self.ca.cert_pem.bytes())
        return path


def expired(ca: trustme.CA, *identities: str) -> trustme.LeafCert:
    now = datetime.now(UTC)
    return ca.issue_cert(*identities, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(trustme.CA(), tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: its certificates are not trusted by `pki`'s servers or clients."""
    return Pki(trustme.CA(), tmp_path_factory.mktemp("other-pki"))


def settings(feature_repo: Path, redis_url: str, **security: Any) -> Settings:
    return Settings(
        repo=feature_repo,
        redis_url=redis_url,
        server=ServerSettings(host=LOCAL, port=0, registry_refresh_s=0),
        security=SecuritySettings(**security),
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(
        f"# test tokens\n{hash_token(READER)} read reader\n{hash_token(ADMIN)} admin ops\n"
        f"{hash_token(BOTH)} read,admin both\n"
    )
    return path


@pytest.fixture(scope="module")
async def tls_server(feature_repo: Path, redis_url: str, pki: Pki, token_file: Path) -> AsyncIterator[FeatureServer]:
    cert, key = pki.write("server", pki.ca.issue_cert(LOCAL, "localhost"))
    server = FeatureServer(
        settings(feature_repo, redis_url, tls_cert=cert, tls_key=key, auth_tokens=token_file, health_port=free_port())
    )
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def mtls_server(feature_repo: Path, redis_url: str, pki: Pki) -> AsyncIterator[FeatureServer]:
    cert, key = pki.write("mtls-server", pki.ca.issue_cert(LOCAL))
    server = FeatureServer(settings(feature_repo, redis_url, tls_cert=cert, tls_key=key, tls_client_ca=pki.ca_file()))
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def open_server(feature_repo: Path, redis_url: str) -> AsyncIterator[FeatureServer]:
    hashes = f"{hash_token(READER)} read reader"
    server = FeatureServer(settings(feature_repo, redis_url, auth_token_hashes=hashes, reflection_open=True))
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def profile(redis_client: aioredis.Redis, feature_repo: Path) -> int:
    """USER's user_profile row, written as materialization writes it; its age is 33."""
    registry = load_registry(feature_repo)
    layout = registry.views["user_profile"].layout
    columns = {f.name: [33] if f.name == "age" else [0] if f.fixed else ["x"] for f in layout.features}
    rows = encode_rows(layout, np.array([int(time.time() * 1e6)], dtype=np.int64), columns)
    row_keys = keys.row_keys(registry.project, "user_profile", keys.entity_tokens([[USER]]))
    await guarded_write(redis_client, [(row_keys, rows)], 0, [])
    return USER


def target(server: FeatureServer) -> str:
    return f"{LOCAL}:{server.port}"


def requests(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("featurestore_requests_total", {"method": method, "code": code})
    return value or 0.0


# TLS


async def test_tls_serves_features_to_a_client_trusting_the_ca(
    tls_server: FeatureServer, pki: Pki, profile: int
) -> None:
    async with AsyncClient(target(tls_server), tls_ca=pki.ca_file(), token=READER) as client:
        await client.wait_until_serving(10)
        result = await client.get_online_features({"user_id": [profile]}, ["user_profile:age"])
    assert result.values("age").tolist() == [33] and result.statuses("age").tolist() == [PRESENT]

    def sync_call() -> Any:
        with Client(target(tls_server), tls_ca=str(pki.ca_file()), token=READER) as client:
            return client.get_online_features({"user_id": [profile]}, ["user_profile:age"])

    assert (await asyncio.to_thread(sync_call)).values("age").tolist() == [33]


@pytest.mark.parametrize("trust", ["other-ca", "plaintext"])
async def test_a_client_that_cannot_verify_the_server_gets_unavailable(
    tls_server: FeatureServer, other: Pki, trust: str
) -> None:
    tls_ca = other.ca_file() if trust == "other-ca" else None
    async with AsyncClient(target(tls_server), tls_ca=tls_ca, token=READER, timeout_s=5) as client:
        with pytest.raises(Unavailable) as info:
            await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_is_open_on_the_tls_port_and_the_plaintext_health_port(
    tls_server: FeatureServer, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem.bytes())
    channels = [
        aio.secure_channel(target(tls_server), credentials),
        aio.insecure_channel(f"{LOCAL}:{tls_server.health_port}"),
    ]
    for channel in channels:
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    async with aio.insecure_channel(f"{LOCAL}:{tls_server.health_port}") as channel:
        # The health port serves health only: the features stay behind TLS and tokens.
        call = channel.unary_unary("/featurestore.v1.FeatureStore/GetOnlineFeatures")
        with pytest.raises(grpc.RpcError) as info:
            await call(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# Mutual TLS


async def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_server: FeatureServer, pki: Pki) -> None:
    cert, key = pki.write("client", pki.ca.issue_cert("client.example"))
    async with AsyncClient(target(mtls_server), tls_ca=pki.ca_file(), tls_cert=cert, tls_key=key) as client:
        await client.wait_until_serving(10)
        result = await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
    assert result.rows == 1


@pytest.mark.parametrize("client_cert", ["none", "other-ca", "expired"])
async def test_mtls_refuses_a_client_without_a_valid_certificate(
    mtls_server: FeatureServer, pki: Pki, other: Pki, client_cert: str
) -> None:
    paths: dict[str, Path] = {}
    if client_cert == "other-ca":
        paths["tls_cert"], paths["tls_key"] = other.write("stranger", other.ca.issue_cert("client.example"))
    elif client_cert == "expired":
        paths["tls_cert"], paths["tls_key"] = pki.write("expired-client", expired(pki.ca, "client.example"))
    async with AsyncClient(target(mtls_server), tls_ca=pki.ca_file(), **paths) as client:  # type: ignore[arg-type]
        with pytest.raises(Unavailable):
            await client.get_online_features({"user_id": [1]}, ["user_profile:age"])


# Rotation


async def health_over_tls(port: int, ca: trustme.CA) -> int:
    """The health status over a new TLS connection trusting only `ca`; raises grpc.RpcError."""
    credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own: a handshake, never a shared one
    async with aio.secure_channel(f"{LOCAL}:{port}", credentials, options=own) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def refused_over_tls(port: int, ca: trustme.CA) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        await health_over_tls(port, ca)
    return info.value.code()


async def test_rotated_certificate_files_serve_new_connections_without_a_restart(
    feature_repo: Path, redis_url: str, pki: Pki, other: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = pki.write("rotating", pki.ca.issue_cert(LOCAL))
    server = FeatureServer(settings(feature_repo, redis_url, tls_cert=cert, tls_key=key))
    await server.start()
    try:
        port = server.port
        kept = aio.secure_channel(f"{LOCAL}:{port}", grpc.ssl_channel_credentials(pki.ca.cert_pem.bytes()))
        kept_health = health_pb2_grpc.HealthStub(kept)
        await kept_health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await health_over_tls(port, pki.ca) >= 0 and server.certificates is not None
        assert server.certificates.loads == 1

        new = other.ca.issue_cert(LOCAL)  # a certificate only `other`'s clients trust
        cert.write_bytes(new.cert_chain_pems[0].bytes())  # half a rotation: the old key does not fit
        with caplog.at_level(logging.WARNING, logger="featurestore.serving.tls"):
            assert await health_over_tls(port, pki.ca) >= 0  # the previous certificate stays
            assert await health_over_tls(port, pki.ca) >= 0
        assert [r.getMessage() for r in caplog.records if "keeping the current TLS certificate" in r.getMessage()]
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1  # once, not per handshake
        key.write_bytes(new.private_key_pem.bytes())  # the rotation completes

        assert await health_over_tls(port, other.ca) >= 0  # new connections: the new certificate
        assert await refused_over_tls(port, pki.ca) == grpc.StatusCode.UNAVAILABLE
        assert server.certificates.loads == 2 and server.port == port
        await kept_health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # an open connection stays
        await kept.close()

        stale = expired(other.ca, LOCAL)  # an expired certificate is refused by clients
        cert.write_bytes(stale.cert_chain_pems[0].bytes())
        key.write_bytes(stale.private_key_pem.bytes())
        assert await refused_over_tls(port, other.ca) == grpc.StatusCode.UNAVAILABLE
        assert server.certificates.loads == 3
    finally:
        await server.stop(0)


# Tokens


READ_CALLS = [
    ("get_online_features", ({"user_id": [1]}, ["user_profile:age"]), {}),
    ("search_similar", ("no_such_view",), {"ids": [1], "k": 1}),
    ("predict", ("no_such_model", {"user_id": [1]}), {}),
    ("rank", ("no_such_model", {"user_id": [1]}), {"candidate_ids": [1]}),
]


@pytest.fixture
async def tls_client(tls_server: FeatureServer, pki: Pki) -> Any:
    """A factory of TLS clients of `tls_server` with a given token."""
    made: list[AsyncClient] = []

    def make(token: str | None) -> AsyncClient:
        made.append(AsyncClient(target(tls_server), tls_ca=pki.ca_file(), token=token))
        return made[-1]

    yield make
    for client in made:
        await client.close()


@pytest.mark.parametrize(("method", "args", "kwargs"), READ_CALLS, ids=[c[0] for c in READ_CALLS])
@pytest.mark.parametrize("token", [None, "not-a-known-token-0123456789", ADMIN])
async def test_read_calls_need_a_token_with_the_read_scope(
    tls_client: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], token: str | None
) -> None:
    expected = PermissionDenied if token == ADMIN else Unauthenticated
    with pytest.raises(expected) as info:
        await getattr(tls_client(token), method)(*args, **kwargs)
    if token == ADMIN:
        assert "token 'ops' has the scopes admin" in str(info.value) and "needs read" in str(info.value)


@pytest.mark.parametrize(("method", "args", "kwargs"), READ_CALLS, ids=[c[0] for c in READ_CALLS])
@pytest.mark.parametrize("token", [READER, BOTH])
async def test_read_calls_pass_with_the_read_scope(
    tls_client: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], token: str
) -> None:
    try:
        await getattr(tls_client(token), method)(*args, **kwargs)
    except FeatureStoreError as exc:  # past the gate: the call's own answer (an unknown view or model)
        assert isinstance(exc, NotFound | Unavailable), exc


async def admin_call(server: FeatureServer, pki: Pki, metadata: tuple[tuple[str, str], ...] | None) -> Any:
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem.bytes())
    async with aio.secure_channel(target(server), credentials) as channel:
        call = channel.unary_unary("/featurestore.v1.FeatureStoreAdmin/CacheStatus")
        return await call(b"", timeout=5, metadata=metadata)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {ADMIN}"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {ADMIN}x"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {READER}"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {ADMIN}"),), grpc.StatusCode.OK),
        ((("authorization", f"bearer {BOTH}"),), grpc.StatusCode.OK),
    ],
    ids=["none", "basic", "empty", "wrong", "read-scope", "admin", "both-lowercase-scheme"],
)
async def test_admin_needs_the_admin_scope(
    tls_server: FeatureServer, pki: Pki, metadata: tuple[tuple[str, str], ...] | None, code: grpc.StatusCode
) -> None:
    before = requests("CacheStatus", code.name)
    if code == grpc.StatusCode.OK:
        assert await admin_call(tls_server, pki, metadata)
    else:
        with pytest.raises(grpc.RpcError) as info:
            await admin_call(tls_server, pki, metadata)
        assert info.value.code() == code
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing.get("featurestore-error") in ("Unauthenticated", "PermissionDenied")
    assert requests("CacheStatus", code.name) == before + 1  # counted per code, refusals too


async def test_refusals_log_one_line_without_traceback_or_token(
    tls_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-token-0123456789abcdef"
    with caplog.at_level(logging.DEBUG):
        for _ in range(20):
            with pytest.raises(Unauthenticated):
                await tls_client(wrong).get_online_features({"user_id": [1]}, ["user_profile:age"])
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refusals) <= 1  # at most one line per LOG_EVERY_S, whatever the flood
    assert not [r for r in caplog.records if r.exc_info]
    assert wrong not in caplog.text and "Traceback" not in caplog.text


async def test_reflection_needs_a_token_unless_open(
    tls_server: FeatureServer, open_server: FeatureServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def services(channel: aio.Channel, metadata: Any = None) -> set[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5):
            return {s.name for s in reply.list_services_response.service}
        return set()

    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem.bytes())
    async with aio.secure_channel(target(tls_server), credentials) as channel:
        before = requests("ServerReflectionInfo", "UNAUTHENTICATED")
        with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as info:
            await services(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not [r for r in caplog.records if r.exc_info]  # a refused stream writes no traceback either
        assert requests("ServerReflectionInfo", "UNAUTHENTICATED") == before + 1
        assert "featurestore.v1.FeatureStore" in await services(channel, (("authorization", f"Bearer {ADMIN}"),))
    async with aio.insecure_channel(target(open_server)) as channel:
        assert "featurestore.v1.FeatureStore" in await services(channel)  # --reflection-open
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status >= 0  # health: open without a token
    async with AsyncClient(target(open_server)) as client:
        with pytest.raises(Unauthenticated):  # the features are not
            await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
    async with AsyncClient(target(open_server), token=READER) as client:
        assert (await client.get_online_features({"user_id": [1]}, ["user_profile:age"])).rows == 1


async def test_the_token_file_is_re_read_when_it_changes(tls_server: FeatureServer, pki: Pki, token_file: Path) -> None:
    original = await asyncio.to_thread(token_file.read_text)
    newcomer = "newcomer-0123456789abcdefghij"
    async with (
        AsyncClient(target(tls_server), tls_ca=pki.ca_file(), token=newcomer) as new,
        AsyncClient(target(tls_server), tls_ca=pki.ca_file(), token=READER) as old,
    ):
        with pytest.raises(Unauthenticated):
            await new.get_online_features({"user_id": [1]}, ["user_profile:age"])
        # The newcomer arrives, the reader is revoked: no restart.
        await asyncio.to_thread(token_file.write_text, original.replace(hash_token(READER), hash_token(newcomer)))
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await new.get_online_features({"user_id": [1]}, ["user_profile:age"])
                    break
                except Unauthenticated:
                    assert time.monotonic() < deadline, "the token file was not re-read within 10 s"
                    await asyncio.sleep(0.1)
            with pytest.raises(Unauthenticated):
                await old.get_online_features({"user_id": [1]}, ["user_profile:age"])
        finally:
            await asyncio.to_thread(token_file.write_text, original)
            assert tls_server.keyring is not None
            await asyncio.to_thread(tls_server.keyring.reload)


# The command line


async def test_cache_status_cli_sends_the_token_over_tls(
    tls_server: FeatureServer,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "admin.token").write_text(ADMIN + "\n")
    argv = ["cache-status", "--target", target(tls_server), "--tls-ca", str(pki.ca_file()), "--json"]
    assert await asyncio.to_thread(cli.main, [*argv, "--token-file", str(tmp_path / "admin.token")]) == 0
    assert '"enabled": true' in capsys.readouterr().out
    monkeypatch.setenv("FEATURESTORE_TOKEN", READER)
    assert await asyncio.to_thread(cli.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("cache-status: ") and "PERMISSION_DENIED" in err and READER not in err
    assert err.count("\n") == 1
    monkeypatch.delenv("FEATURESTORE_TOKEN")
    assert await asyncio.to_thread(cli.main, argv) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# Start-up


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="featurestore.serving"):
        yield caplog


@pytest.mark.parametrize(
    ("host", "security", "warned"),
    [
        ("0.0.0.0", {}, True),
        (LOCAL, {}, False),
        ("0.0.0.0", {"auth_token_hashes": f"{hash_token(READER)} read"}, True),  # tokens in clear text
    ],
    ids=["open-any", "loopback", "tokens-without-tls"],
)
async def test_an_unprotected_non_loopback_bind_logs_one_warning(
    feature_repo: Path, redis_url: str, server_log: pytest.LogCaptureFixture, host: str, security: Any, warned: bool
) -> None:
    server = FeatureServer(
        Settings(
            repo=feature_repo,
            redis_url=redis_url,
            server=ServerSettings(host=host, port=0, registry_refresh_s=0),
            security=SecuritySettings(**security),
        )
    )
    await server.start()
    await server.stop(0)
    warnings = [r.getMessage() for r in server_log.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if w.startswith("gRPC on ")]) == (1 if warned else 0), warnings
    if warned and not security:
        [warning] = warnings
        assert f"gRPC on 0.0.0.0:{server.port} has neither TLS nor tokens" in warning and "--auth-tokens" in warning


@pytest.mark.parametrize("broken", ["missing-cert", "key-mismatch", "bad-token-file"])
async def test_unusable_security_files_stop_the_start_with_one_line(
    feature_repo: Path, redis_url: str, pki: Pki, tmp_path: Path, broken: str
) -> None:
    cert, key = pki.write("start", pki.ca.issue_cert(LOCAL))
    _, other_key = pki.write("start-other", pki.ca.issue_cert(LOCAL))
    (tmp_path / "tokens").write_text(f"{READER} read\n")
    security: dict[str, Any] = {
        "missing-cert": {"tls_cert": tmp_path / "nope.crt", "tls_key": key},
        "key-mismatch": {"tls_cert": cert, "tls_key": other_key},
        "bad-token-file": {"auth_tokens": tmp_path / "tokens"},
    }[broken]
    server = FeatureServer(settings(feature_repo, redis_url, **security))
    with pytest.raises(ConfigError) as info:
        await server.start()
    message = str(info.value)
    assert "\n" not in message and READER not in message
    expected = {
        "missing-cert": "nope.crt' cannot be read",
        "key-mismatch": "not a usable PEM pair",
        "bad-token-file": "line 1: expected",
    }
    assert expected[broken] in message


async def test_featurestore_serve_takes_tls_and_tokens_from_the_environment(
    feature_repo: Path, redis_url: str, pki: Pki, token_file: Path
) -> None:
    cert, key = pki.write("serve-cli", pki.ca.issue_cert(LOCAL))
    port, health_port = free_port(), free_port()
    environ = {
        **os.environ,
        "FEATURESTORE_REPO": str(feature_repo),
        "FEATURESTORE_REDIS_URL": redis_url,
        "FEATURESTORE_HOST": "0.0.0.0",
        "FEATURESTORE_PORT": str(port),
        "FEATURESTORE_REGISTRY_REFRESH_S": "0",
        "FEATURESTORE_TLS_CERT": str(cert),
        "FEATURESTORE_TLS_KEY": str(key),
        "FEATURESTORE_AUTH_TOKENS": str(token_file),
        "FEATURESTORE_HEALTH_PORT": str(health_port),
    }
    featurestore = Path(sys.executable).parent / "featurestore"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child server, waited for below
        [str(featurestore), "serve"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        async with aio.insecure_channel(f"{LOCAL}:{health_port}") as channel:  # the probe's view
            deadline = time.monotonic() + 60
            while True:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "not SERVING within 60 s"
                await asyncio.sleep(0.2)
        async with AsyncClient(f"{LOCAL}:{port}", tls_ca=pki.ca_file(), token=READER) as client:
            assert (await client.get_online_features({"user_id": [1]}, ["user_profile:age"])).rows == 1
        async with AsyncClient(f"{LOCAL}:{port}", tls_ca=pki.ca_file()) as client:
            with pytest.raises(Unauthenticated):
                await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-2000:]
    assert f"listening on 0.0.0.0:{port} (TLS, tokens)" in output
    assert "gRPC on " not in output  # protected: no warning
    assert "Traceback" not in output and READER not in output
