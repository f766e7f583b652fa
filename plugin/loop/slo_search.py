"""The SLO search off the sidecar's interpreter lock: ``solver.slo.solve_slo`` in a child process.

One job: run the search where its simulation loops (pure Python, hundreds of ms a search) do not hold
the GIL that the sidecar's request path needs (the Python data plane, the control API, the event
loop). One worker process serves every model of the sidecar: started at the first search with the
'forkserver' method (a clean interpreter, not a fork of a process that runs gRPC threads), kept for
the searches after, which queue on it. A worker that died is replaced at the next search (the search
that saw it die fails like any solver failure: the controller keeps its policy and retries).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from solver.model import BatchingModel
from solver.slo import SloResult, SloTarget, solve_slo
from solver.slo_bound import BestDelayResult, BestDelaySlo, solve_best_delay_slo

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
        return _pool


def _discard(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def _ready() -> bool:
    """Nothing: the worker imports this module (and with it the solver) to run it."""
    return True


def prestart() -> None:
    """Start the worker now (it imports the solver), so that the first search does not wait for it."""
    _executor().submit(_ready)


async def search(model: BatchingModel, target: SloTarget) -> SloResult:
    """``solve_slo(model, target)``, run in the worker process."""
    pool = _executor()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, solve_slo, model, target)
    except BrokenProcessPool:
        _discard(pool)
        raise


async def search_best_delay(model: BatchingModel, rule: BestDelaySlo, correction_s: float) -> BestDelayResult:
    """``solve_best_delay_slo(model, rule, correction_s=...)``: the bound derived and searched, in the worker."""
    pool = _executor()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, _best_delay, model, rule, correction_s)
    except BrokenProcessPool:
        _discard(pool)
        raise


def _best_delay(model: BatchingModel, rule: BestDelaySlo, correction_s: float) -> BestDelayResult:
    return solve_best_delay_slo(model, rule, correction_s=correction_s)


def shutdown() -> None:
    """Stop the worker (the sidecar's shutdown; a later search starts a new one)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
