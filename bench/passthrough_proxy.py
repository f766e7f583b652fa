"""A plain pass-through gRPC proxy for Triton: the reference contender of ``bench/sidecar_bench.py``.

Every ``inference.GRPCInferenceService`` method is registered with generic raw-bytes handlers (no
deserializer, no serializer) and relayed to Triton as is, with the caller's metadata; Triton's status
is passed back. No gate, no parsing, no metrics: what any Python gRPC proxy costs at least.

    python bench/passthrough_proxy.py --triton HOST:PORT [--listen 127.0.0.1:0]
                                      [--kind aio|sync] [--grpc-env smdp|default]

``--kind aio``: grpc.aio server and channel on one event loop (as the sidecar).
``--kind sync``: the classic thread-pool server and a blocking channel.
``--grpc-env smdp`` starts gRPC with the same ``GRPC_EXPERIMENTS`` as ``smdp serve``; ``default``
sets it empty (gRPC's defaults). Prints ``listening on HOST:PORT`` once serving.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVICE = "inference.GRPCInferenceService"
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _metadata(context) -> tuple[tuple[str, str], ...]:
    md = context.invocation_metadata() or ()
    return tuple((k, v) for k, v in md if not k.startswith((":", "grpc-")) and k not in ("user-agent", "te"))


def _methods():
    from tritonclient.grpc import service_pb2

    return service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods


def _aio_handlers(grpc, channel) -> dict:
    handlers = {}
    for m in _methods():
        path = f"/{SERVICE}/{m.name}"
        if not m.client_streaming and not m.server_streaming:
            stub = channel.unary_unary(path)

            async def unary(request: bytes, context, stub=stub) -> bytes:
                try:
                    return await stub(request, metadata=_metadata(context))
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")

            handlers[m.name] = grpc.unary_unary_rpc_method_handler(unary)
        else:  # ModelStreamInfer: bidirectional, relayed message by message
            stub = channel.stream_stream(path)

            async def stream(requests, context, stub=stub):
                call = stub(requests, metadata=_metadata(context))
                try:
                    async for response in call:
                        yield response
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")

            handlers[m.name] = grpc.stream_stream_rpc_method_handler(stream)
    return handlers


def _sync_handlers(grpc, channel) -> dict:
    handlers = {}
    for m in _methods():
        path = f"/{SERVICE}/{m.name}"
        if not m.client_streaming and not m.server_streaming:
            stub = channel.unary_unary(path)

            def unary(request: bytes, context, stub=stub) -> bytes:
                try:
                    return stub(request, metadata=_metadata(context))
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details() or "")

            handlers[m.name] = grpc.unary_unary_rpc_method_handler(unary)
        else:
            stub = channel.stream_stream(path)

            def stream(requests, context, stub=stub):
                try:
                    yield from stub(requests, metadata=_metadata(context))
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details() or "")

            handlers[m.name] = grpc.stream_stream_rpc_method_handler(stream)
    return handlers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", required=True, help="host:port of Triton's gRPC endpoint")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--kind", choices=["aio", "sync"], default="aio")
    ap.add_argument("--grpc-env", choices=["smdp", "default"], default="smdp")
    ap.add_argument("--workers", type=int, default=64, help="thread pool size (--kind sync)")
    args = ap.parse_args()

    from smdp import GRPC_EXPERIMENTS  # imports no gRPC

    os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS if args.grpc_env == "smdp" else ""
    import grpc  # after GRPC_EXPERIMENTS: gRPC reads it once, when it starts

    host = args.listen.rsplit(":", 1)[0]
    if args.kind == "sync":
        from concurrent import futures

        channel = grpc.insecure_channel(args.triton, options=OPTIONS)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=OPTIONS,
                             maximum_concurrent_rpcs=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _sync_handlers(grpc, channel)),))
        port = server.add_insecure_port(args.listen)
        server.start()
        print(f"listening on {host}:{port}", flush=True)
        try:
            server.wait_for_termination()
        except KeyboardInterrupt:
            pass
        return 0

    import asyncio
    import signal

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(args.triton, options=OPTIONS)
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _aio_handlers(grpc, channel)),))
        port = server.add_insecure_port(args.listen)
        await server.start()
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0.5)
        await channel.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
