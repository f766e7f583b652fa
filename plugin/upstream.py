"""The sidecar's one connection to Triton: its gRPC channel, the stubs the sidecar calls, and how a
Triton error becomes the one answer a caller gets (``GateError``)."""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Reconnect quickly after Triton restarts: recovery should take well under a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Triton's errors quote what the client sent (a model name, an input's name): an answer of one
    # client's request larger than gRPC's default metadata limit (8-16 KiB) must still come back, as
    # that request's answer, and not as a connection failure under everyone's calls.
    ("grpc.max_metadata_size", 2**31 - 1),
    ("grpc.absolute_max_metadata_size", 2**31 - 1),
]


class GateError(Exception):
    """The one answer a caller gets when it gets no response."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def ended_by_triton(details: str) -> GateError:
    """A call Triton or the connection ended (CANCELLED, not the caller's doing: that cancels the caller's
    coroutine instead), as when Triton shuts down: retryable, as Triton being away is."""
    return GateError(grpc.StatusCode.UNAVAILABLE, f"Triton ended the call: {details}")


class Upstream:
    """Triton's gRPC service as the sidecar calls it: one channel, one stub per method it uses.

    The stubs are plain attributes (``infer``, ``infer_wire``, ``model_config``, ``server_ready``, ``stream``) so a
    unit test can put a stand-in in their place."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
        pb = service_pb2

        def unary(method: str, request, response):
            return self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request.SerializeToString,
                                            response_deserializer=response.FromString)

        self.infer = unary("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)
        self.infer_wire = self.channel.unary_unary(f"/{SERVICE}/ModelInfer")
        """ModelInfer with the request and its answer as bytes, sent and returned as they are (no protobuf)."""
        self.model_config = unary("ModelConfig", pb.ModelConfigRequest, pb.ModelConfigResponse)
        self.server_ready = unary("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse)
        self.stream = self.channel.stream_stream(
            f"/{SERVICE}/ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self.repository_index = unary("RepositoryIndex", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse)
        self.repository_load = unary("RepositoryModelLoad", pb.RepositoryModelLoadRequest,
                                     pb.RepositoryModelLoadResponse)

    async def call(self, req: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        """Triton's response to ``req``, or its error as a GateError."""
        return await self.answer(self.infer(req, timeout=self.timeout_s))

    async def relay(self, wire: bytes) -> bytes:
        """Triton's answer to a request's bytes, as Triton's bytes, or its error as a GateError."""
        return await self.answer(self.infer_wire(wire, timeout=self.timeout_s))

    @staticmethod
    async def answer(call: grpc.aio.UnaryUnaryCall) -> service_pb2.ModelInferResponse | bytes:
        """Triton's response to a started call (bytes for ``infer_wire``'s), or its error as a GateError."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or ""
        # (raised outside the handler: raising inside it leaves this frame, the call and its request in
        # a reference cycle with the error, freed only by a garbage collection)
        if code == grpc.StatusCode.CANCELLED:
            raise ended_by_triton(details)
        if code == grpc.StatusCode.UNAVAILABLE and "timeout" not in details.lower():
            details = f"Triton is unreachable: {details}"
        raise GateError(code, details)

    async def exiting(self) -> bool:
        """Whether Triton is shutting down (or away): its ServerReady then fails ("Server exiting").
        A ready=false answer is not that: with strict readiness Triton is "not ready" while any model
        loads, unloads or failed to load, and requests for other models are still served."""
        try:
            await self.server_ready(service_pb2.ServerReadyRequest(), timeout=self.timeout_s)
            return False
        except grpc.aio.AioRpcError:
            return True

    async def close(self) -> None:
        await self.channel.close()
