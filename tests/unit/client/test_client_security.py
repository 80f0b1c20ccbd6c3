"""The clients' token and TLS options: argument checks, and the token sent with every call
of both clients (a real grpc.aio server on port 0 records what each call carried). TLS
itself, against the feature server, is in tests/integration/serving/test_security.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc import aio

from featurestore import AsyncClient, Client
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.client.core import call_metadata, channel_credentials
from featurestore.errors import InvalidArgument

TOKEN = "client-token-0123456789_~+/="


class Recording(pb_grpc.FeatureStoreServicer):
    """Answers every call with an empty response and records its `authorization` metadata."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def _record(self, method: str, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        self.seen.append((method, metadata.get("authorization")))

    async def GetOnlineFeatures(self, request: Any, context: Any) -> pb.GetOnlineFeaturesResponse:
        self._record("GetOnlineFeatures", context)
        return pb.GetOnlineFeaturesResponse()

    async def SearchSimilar(self, request: Any, context: Any) -> pb.SearchSimilarResponse:
        self._record("SearchSimilar", context)
        return pb.SearchSimilarResponse()

    async def Predict(self, request: Any, context: Any) -> pb.PredictResponse:
        self._record("Predict", context)
        return pb.PredictResponse()

    async def Rank(self, request: Any, context: Any) -> pb.RankResponse:
        self._record("Rank", context)
        return pb.RankResponse()


@pytest.fixture(scope="module")
async def recorder() -> AsyncIterator[tuple[str, Recording]]:
    servicer = Recording()
    server = aio.server()
    pb_grpc.add_FeatureStoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("get_online_features", ({"user_id": [1]}, ["v:f"]), {}),
    ("search_similar", ("v",), {"ids": [1], "k": 1}),
    ("predict", ("m", {"user_id": [1]}), {}),
    ("rank", ("m", {"user_id": [1]}), {"candidate_ids": [1]}),
]
METHODS = ["GetOnlineFeatures", "SearchSimilar", "Predict", "Rank"]


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "none"])
async def test_both_clients_send_the_token_with_every_call(recorder: tuple[str, Recording], token: str | None) -> None:
    target, servicer = recorder
    servicer.seen.clear()
    async with AsyncClient(target, token=token) as client:
        for name, args, kwargs in CALLS:
            await getattr(client, name)(*args, **kwargs)

    def blocking() -> None:
        with Client(target, token=token) as client:
            for name, args, kwargs in CALLS:
                getattr(client, name)(*args, **kwargs)

    await asyncio.to_thread(blocking)
    expected = None if token is None else f"Bearer {token}"
    assert servicer.seen == [(method, expected) for method in METHODS] * 2


@pytest.mark.parametrize(
    "token",
    ["has space", "line\nbreak", "ünïcode", "", "=leading", "Bearer\tx"],
    ids=["space", "newline", "non-ascii", "empty", "leading-equals", "tab"],
)
def test_a_malformed_token_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(InvalidArgument, match="token= must be a bearer token") as info:
        Client("127.0.0.1:1", token=token)
    assert token not in str(info.value) or not token


def test_call_metadata() -> None:
    assert call_metadata(None) is None
    assert call_metadata(TOKEN) == (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    folder = tmp_path_factory.mktemp("client-pki")
    files = {"tls_ca": folder / "ca.pem", "tls_cert": folder / "client.pem", "tls_key": folder / "client.key"}
    files["tls_ca"].write_bytes(ca.cert_pem.bytes())
    files["tls_cert"].write_bytes(leaf.cert_chain_pems[0].bytes())
    files["tls_key"].write_bytes(leaf.private_key_pem.bytes())
    return files


def test_channel_credentials_from_paths_or_ready_made(pem_files: dict[str, Path]) -> None:
    assert channel_credentials(None, None, None, None) is None
    assert isinstance(channel_credentials(None, pem_files["tls_ca"], None, None), grpc.ChannelCredentials)
    both = channel_credentials(None, str(pem_files["tls_ca"]), pem_files["tls_cert"], pem_files["tls_key"])
    assert isinstance(both, grpc.ChannelCredentials)
    assert isinstance(
        channel_credentials(None, None, pem_files["tls_cert"], pem_files["tls_key"]), grpc.ChannelCredentials
    )
    ready = grpc.ssl_channel_credentials()
    assert channel_credentials(ready, None, None, None) is ready


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"credentials": "ready", "tls_ca": "tls_ca"}, "pass credentials= or tls_ca=/tls_cert=/tls_key=, not both"),
        ({"tls_cert": "tls_cert"}, "tls_cert= and tls_key= go together"),
        ({"tls_key": "tls_key"}, "tls_cert= and tls_key= go together"),
        ({"tls_ca": "missing"}, "tls_ca='.*missing.pem' cannot be read: No such file"),
    ],
    ids=["both", "cert-alone", "key-alone", "missing-file"],
)
def test_bad_tls_arguments_are_refused_by_both_clients(
    pem_files: dict[str, Path], kwargs: dict[str, str], match: str
) -> None:
    def value(name: str, given: str) -> Any:
        if given == "ready":
            return grpc.ssl_channel_credentials()
        return pem_files[given] if given in pem_files else pem_files["tls_ca"].parent / f"{given}.pem"

    arguments = {name: value(name, given) for name, given in kwargs.items()}
    with pytest.raises(InvalidArgument, match=match):
        Client("127.0.0.1:1", **arguments)
    with pytest.raises(InvalidArgument, match=match):
        AsyncClient("127.0.0.1:1", **arguments)
