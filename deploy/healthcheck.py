"""Container health probe for the project's image: exit 0 when the target answers healthy, else 1.

    python deploy/healthcheck.py grpc HOST:PORT [SERVICE]   # grpc.health.v1 Check == SERVING
    python deploy/healthcheck.py http URL                   # HTTP status 200
    python deploy/healthcheck.py tcp HOST:PORT              # a TCP connection opens

Why a script rather than grpc_health_probe: the image already carries grpcio and grpcio-health-checking
(the sidecar and solver serve the health service with them), so the probe adds no binary to fetch,
pin and patch. Why three kinds: one image plays several roles (sidecar and solver speak gRPC, the
Locust master serves HTTP, a Locust worker only needs its master's port to be open). Docker runs it
every few seconds, so it imports only what its kind needs and holds no state. Every failure, a
malformed argument included, exits 1: Docker reserves exit code 2, and a probe that cannot even
run must read as unhealthy rather than pass.
"""

from __future__ import annotations

import socket
import sys

USAGE = "usage: healthcheck.py grpc HOST:PORT [SERVICE] | http URL | tcp HOST:PORT [--timeout S]"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535, got {address!r}")
    return host.strip("[]"), int(port)


def check_grpc(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    split_address(address)
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {service or '(server)'}: {status}"


def check_http(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status == 200, f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def check_tcp(address: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, f"{address}: open"
    except OSError as exc:
        return False, f"{address}: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    timeout_s = 3.0
    if "--timeout" in args:
        i = args.index("--timeout")
        try:
            timeout_s = float(args[i + 1])
        except (IndexError, ValueError):
            print(f"healthcheck: --timeout needs seconds\n{USAGE}", file=sys.stderr)
            return 1
        if not timeout_s > 0:
            print(f"healthcheck: --timeout must be > 0 seconds, got {timeout_s}", file=sys.stderr)
            return 1
        del args[i:i + 2]
    try:
        if len(args) in (2, 3) and args[0] == "grpc":
            ok, message = check_grpc(args[1], args[2] if len(args) == 3 else "", timeout_s)
        elif len(args) == 2 and args[0] == "http":
            ok, message = check_http(args[1], timeout_s)
        elif len(args) == 2 and args[0] == "tcp":
            ok, message = check_tcp(args[1], timeout_s)
        else:
            print(USAGE, file=sys.stderr)
            return 1
    except ValueError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
