"""Run the sidecar: in the foreground (``smdp serve``) or on a background thread (tests, bench, demo).

The background runner owns a private event loop so that synchronous code (pytest, the demo driver,
Locust) can start a real sidecar on an ephemeral port, talk to it over real gRPC, and always stop it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, TypeVar

from .config import SidecarConfig
from .server import RunningSidecar, Sidecar, start_sidecar

T = TypeVar("T")
log = logging.getLogger("smdp.sidecar")


class SidecarThread:
    """A real sidecar server on its own thread and loop; ``start()`` returns the bound port."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sidecar", daemon=True)
        self._running: RunningSidecar | None = None

    @property
    def port(self) -> int:
        if self._running is None:
            raise RuntimeError("sidecar is not running")
        return self._running.port

    @property
    def control_port(self) -> int | None:
        return self._running.control_port if self._running else None

    @property
    def control_url(self) -> str | None:
        port = self.control_port
        return None if port is None else f"127.0.0.1:{port}"

    @property
    def http_port(self) -> int | None:
        return self._running.http_port if self._running else None

    @property
    def http_url(self) -> str | None:
        """``host:port`` of the HTTP/REST listener, as tritonclient.http expects (None: off)."""
        port = self.http_port
        return None if port is None else f"127.0.0.1:{port}"

    @property
    def url(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "") else host
        return f"{host}:{self.port}"

    @property
    def sidecar(self) -> Sidecar:
        if self._running is None:
            raise RuntimeError("sidecar is not running")
        return self._running.sidecar

    def start(self, timeout: float = 30.0) -> int:
        self._thread.start()
        self._running = self.run(start_sidecar(self.config), timeout)
        return self._running.port

    def run(self, coro: Awaitable[T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the sidecar's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run a plain function on the sidecar's loop (between two decisions) and return its result."""
        fut: Future = Future()

        def invoke() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # hand it to the caller
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(invoke)
        return fut.result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._running is not None:
            try:
                self.run(self._running.stop(grace), timeout=grace + 10)
            finally:
                self._running = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "SidecarThread":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def serve_forever(config: SidecarConfig) -> int:
    """``smdp serve``: run until SIGINT/SIGTERM, then drain and stop (0); 1 when the native gate died."""
    running = await start_sidecar(config)
    # What start-up built (modules, configs, policies) lives as long as the process: frozen out of the
    # collector's generations, so that its collections walk only what requests allocate.
    gc.collect()
    gc.freeze()
    control = f", control API on port {running.control_port}" if running.control_port else ""
    if running.metrics_port:
        control += f", metrics on port {running.metrics_port}"
    if running.http_port:
        control += f", HTTP/REST on port {running.http_port}"
    print(f"sidecar listening on {config.listen.rsplit(':', 1)[0]}:{running.port} -> Triton {config.triton_url}"
          f"{control}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover - non-Unix
            pass
    waits = [asyncio.ensure_future(stop.wait())]
    died = running.sidecar.plane.died()
    if died is not None:
        # The native gate carries inference: if it dies, so does the sidecar (exit status 1), so
        # that supervision (compose's restart policy, Kubernetes) restarts both together.
        waits.append(died)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    gate_died = not stop.is_set()
    log.info("stopping sidecar")
    await running.stop(grace=5.0)
    waits[0].cancel()
    from .loop import slo_search

    await loop.run_in_executor(None, slo_search.shutdown)  # the SLO search's worker process, if one ran
    return 1 if gate_died else 0
