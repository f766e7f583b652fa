"""Write Triton's protocol as a protobuf descriptor set, from the ``tritonclient`` wheel (and gRPC's
health and reflection protocols, from the ``grpcio-health-checking`` and ``grpcio-reflection`` wheels).

The native data plane compiles its message classes from this set (``protoc --descriptor_set_in``),
so its C++ types come from exactly the protocol the Python sidecar and clients use, with no copied
``.proto`` to drift from it.

    python native/gen_descriptors.py OUT.pb
"""

from __future__ import annotations

import sys

from google.protobuf import descriptor_pb2


def descriptor_set() -> bytes:
    from tritonclient.grpc import service_pb2

    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd) -> None:  # dependencies first, as protoc expects
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        out.file.append(proto)

    add(service_pb2.DESCRIPTOR)
    # the gate answers health and reflection itself, from these messages
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    add(health_pb2.DESCRIPTOR)
    add(reflection_pb2.DESCRIPTOR)
    return out.SerializeToString()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], "wb") as f:
        f.write(descriptor_set())
