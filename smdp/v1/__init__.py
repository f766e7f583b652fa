"""Generated gRPC code of ``proto/smdp/v1/smdp.proto`` (package ``smdp.v1``): do not edit.

The module path mirrors the proto package so that protoc's own imports (``from smdp.v1 import
smdp_pb2``) resolve without rewriting. Regenerate with ``python scripts/gen_proto.py``.
"""
