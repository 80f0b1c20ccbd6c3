"""The gRPC health service of the server: grpc's asyncio servicer, completed for a drain.

    health = HealthServicer()
    await health.set("", SERVING)
    await health.enter_graceful_shutdown()   # NOT_SERVING for good, watchers told at once
    await health.end_watches()               # then every Watch stream ends (status OK)

grpc's servicer leaves `List` unimplemented (a caller got INTERNAL) and keeps every
`Watch` stream open forever, so a server stopping with grace waited the whole grace
period for its watchers and then cancelled them. Here `List` answers every service's
status, and `end_watches` (called by the server when its listener closes) ends each
Watch after its last status was sent.
"""

from __future__ import annotations

from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2

__all__ = ["HealthServicer"]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's asyncio health servicer with `List` and Watch streams that end on `end_watches`.

    It reads and writes the base class's `_server_status`, `_server_watchers` and
    `_watcher_count_by_service` (grpc_health.v1._async), as the base class's own methods do.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ending = False

    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        """Every service with a status, and that status (a snapshot)."""
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._server_status.items()
            }
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]) -> None:
        """The base class's Watch (each change of the service's status, from the current
        one), ending after `end_watches` once the last status was written."""
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._ending:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    async def end_watches(self) -> None:
        """End every Watch stream (each sends the current status first, if not yet sent)."""
        self._ending = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()
