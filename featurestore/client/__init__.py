"""The Python client: `Client` (blocking) and `AsyncClient` (asyncio), thin twins over `core`.

    with Client("127.0.0.1:50051") as client:
        result = client.get_online_features(
            entities={"user_id": [1, 2, 3]}, features=["user_profile:age", "user_activity"]
        )
        result.values("age")              # numpy int64 array, one value per entity row
        result.statuses("user_profile:age")  # uint8 FieldStatus per row (1 = PRESENT)

    core.py   request builders, response parsers, the result types, error translation
    sync.py   Client: build (core) -> one blocking stub call -> parse (core)
    aio.py    AsyncClient: the same, awaited

gRPC errors are raised as this package's errors (NotFound, InvalidArgument, MissingFeature,
Unavailable, ...: the class the server raised), chained to the RpcError.
"""

from featurestore.client.aio import AsyncClient
from featurestore.client.core import Neighbours, OnlineFeatures, Prediction, Ranking
from featurestore.client.sync import Client

__all__ = ["AsyncClient", "Client", "Neighbours", "OnlineFeatures", "Prediction", "Ranking"]
