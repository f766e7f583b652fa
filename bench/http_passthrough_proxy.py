"""A plain pass-through HTTP proxy for Triton: the HTTP contender of ``bench/sidecar_bench.py``.

Every request is relayed to Triton's HTTP endpoint as it came (method, path, headers, body) and
Triton's answer is passed back, with the same HTTP library (aiohttp, server and client) and the same
settings as the sidecar's HTTP listener: no gate, no parsing. What any Python HTTP proxy costs at least.

    python bench/http_passthrough_proxy.py --triton HOST:PORT [--listen 127.0.0.1:0]

Prints ``listening on HOST:PORT`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
from aiohttp import web

HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                 "proxy-connection", "te", "trailer"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", required=True, help="host:port of Triton's HTTP endpoint")
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args()
    base = f"http://{args.triton}"

    async def serve() -> None:
        session = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

        async def relay(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
            async with session.request(request.method, base + request.path_qs, data=body or None,
                                       headers=headers) as up:
                data = await up.read()
                return web.Response(status=up.status, body=data,
                                    headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = args.listen.rsplit(":", 1)
        site = web.TCPSite(runner, host, int(port))
        await site.start()
        print(f"listening on {host}:{runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
