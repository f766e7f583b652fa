import smdp  # noqa: F401  (process-wide gRPC defaults, set before gRPC starts)
