"""The gRPC floor: a bare grpc.aio unary echo that answers with N bytes.

    python benchmarks/echo_server.py PORT [--threaded]

The request's first 8 bytes (little-endian) give the reply size; the rest is padding so
the request can match the size of a real lookup request. No protobuf, no work: what is
left is gRPC's own cost on this machine, the floor a lookup cannot beat.
"""

from __future__ import annotations

import gc
import sys
from concurrent import futures
from typing import Any

import grpc
from grpc import aio
from harness import run_on_uvloop

METHOD = "/bench.Echo/Echo"


async def serve(port: int) -> None:
    """Serve the echo on 127.0.0.1:`port` until killed."""
    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context: Any) -> bytes:
        size = int.from_bytes(request[:8], "little")
        reply = replies.get(size)
        if reply is None:
            reply = replies[size] = bytes(size)
        return reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    server = aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    gc.freeze()
    await server.wait_for_termination()


def serve_threaded(port: int) -> None:
    """The same echo on the classic threaded `grpc.server` (one worker thread: the calls
    are sequential, and more threads only contend for the GIL)."""
    replies: dict[int, bytes] = {}

    def echo(request: bytes, context: Any) -> bytes:
        size = int.from_bytes(request[:8], "little")
        reply = replies.get(size)
        if reply is None:
            reply = replies[size] = bytes(size)
        return reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=options)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    gc.freeze()
    server.wait_for_termination()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--threaded":
        serve_threaded(int(sys.argv[1]))
    else:
        run_on_uvloop(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
