"""Solve the batching SMDP: pick the truncation, run PI or RVI, evaluate the policy found.

Automatic truncation: start at ``initial_truncation`` (about B + E[K_B] + 3 sd), solve,
grow N by half and solve again warm-started from the previous policy, until the gain moves by less
than ``growth_rtol`` relative and the policy is unchanged on the common states. With the fluid tail
and deterministic service the first size is usually settled (one confirming warm solve); with
variable service (CV 1-2) the first size is within about 1e-7..1e-5 and the search takes two or
three growth steps (measured on the V100 profile); the plain ``tail="none"`` needs N far above the
queue's reach.

Default growth_rtol 1e-8 (PI): the gain error shrinks geometrically with N (each 1.5x step cut it
by 25x or more in every measured case), and the gain returned is the one at the *larger* N, so a
step that moves it by 1e-8 leaves it within about 4e-10 of the limit. Asking 1e-10 of the step
itself bought nothing: at B = 64, CV 1, load 0.6 it grew N 220 -> 331 -> 497 -> 746 although
the gain at 497 was already within 2e-12 and the policy never changed. 1e-8 is also well below
what the inputs support (profiles are measured to about 1e-3) and than RVI's default tolerance.
"""

from __future__ import annotations

import math
import time

import numpy as np

from solver.evaluate import MAX_TRUNCATION, summarize, table_actions
from solver.model import BatchingModel, ModelError
from solver.pi import LINEAR_SOLVERS, evaluate_policy, policy_iteration
from solver.policy import PolicyTable
from solver.result import SolveResult
from solver.rvi import relative_value_iteration
from solver.tail import TAILS, TruncatedSMDP, build, initial_truncation

METHODS = ("pi", "rvi")
GROWTH_RTOL = 1e-8
"""Default relative gain change per growth step that ends the automatic truncation (module doc)."""


def _start_actions(model: BatchingModel, policy: PolicyTable, size: int) -> np.ndarray:
    """A warm-start table in the SMDP's action set: waits at n >= B become full batches."""
    if policy.max_batch != model.max_batch:
        raise ModelError(f"warm_start is for max_batch {policy.max_batch}, the model has B = {model.max_batch}")
    a = policy.extended(size)
    n = np.arange(size)
    return np.where((a == 0) & (n >= model.max_batch), np.minimum(n, model.max_batch), a)


def _solve_at(
    smdp: TruncatedSMDP, method: str, start: np.ndarray | None, tol: float, max_iter: int, linear_solver: str | None = None
):
    """(actions, gain, (lower, upper), iterations, converged, values of the final policy)."""
    if method == "pi":
        out = policy_iteration(smdp, start, max_iter=max_iter, linear_solver=linear_solver)
        g = out.values.gain
        return out.actions, g, (g, g), out.iterations, out.converged, out.values
    h0 = None if start is None else evaluate_policy(smdp, start, linear_solver).h
    out = relative_value_iteration(smdp, h0, tol=tol, max_iter=max_iter)
    return out.actions, out.gain, (out.lower, out.upper), out.iterations, out.converged, None


def solve(
    model: BatchingModel,
    method: str = "pi",
    *,
    truncation: int | None = None,
    tail: str = "fluid",
    warm_start: PolicyTable | None = None,
    tol: float = 1e-9,
    max_iter: int = 100_000,
    growth_rtol: float | None = None,
    linear_solver: str | None = None,
) -> SolveResult:
    """Optimal stationary policy of ``model`` (minimal J = W + w P).

    method: "pi" (policy iteration, exact linear solves) or "rvi" (relative value iteration on the
    uniformised chain, stopping when the span of V_k+1 - V_k is below tol relative).
    truncation: fixed N (>= B), or None for the automatic choice (module docstring).
    tail: "fluid" (analytic drain cost above N, default), "first-order" (the drain without its
    variance term) or "none" (overflow lumped at N, the plain truncation).
    warm_start: a previous policy (for example at a nearby rate or weight) to start from.
    growth_rtol: gain change that counts as settled when N grows (default 1e-8 for PI, max(1e-8, 10 tol)
    for RVI; see the module docstring).
    linear_solver: "dense" (default) or "sparse" LU for policy evaluation (``solver.pi``); same answer.
    """
    started = time.perf_counter()
    if model.instances != 1:
        raise ModelError(f"solver.smdp solves one instance; the model has k = {model.instances} "
                         f"(use solver.instances.solve_instances)")
    if method not in METHODS:
        raise ModelError(f"method must be one of {METHODS}, got {method!r}")
    if tail not in TAILS:
        raise ModelError(f"tail must be one of {TAILS}, got {tail!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ModelError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ModelError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if linear_solver is not None and linear_solver not in LINEAR_SOLVERS:
        raise ModelError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    if growth_rtol is None:
        growth_rtol = GROWTH_RTOL if method == "pi" else max(GROWTH_RTOL, 10 * tol)
    if truncation is not None:
        if isinstance(truncation, bool) or not isinstance(truncation, (int, np.integer)):
            raise ModelError(f"truncation must be an integer >= B = {model.max_batch}, got {truncation!r}")
        if truncation < model.max_batch:
            raise ModelError(f"truncation {truncation} must be >= max_batch B = {model.max_batch}")
        if warm_start is not None and warm_start.truncation > truncation:
            warm_start = PolicyTable(warm_start.actions[: truncation + 1], warm_start.max_batch)

    N = int(truncation) if truncation is not None else max(initial_truncation(model), model.max_batch)
    start = None if warm_start is None else _start_actions(model, warm_start, N + 1)
    sizes: list[int] = []
    iterations = 0
    previous = None
    settled = truncation is not None
    while True:
        smdp = build(model, N, tail)
        actions, gain, bounds, its, ok, values = _solve_at(smdp, method, start, tol, max_iter, linear_solver)
        sizes.append(N)
        iterations += its
        if truncation is not None:
            break
        if previous is not None:
            prev_actions, prev_gain = previous
            common = prev_actions.size
            if abs(gain - prev_gain) <= growth_rtol * abs(gain) and np.array_equal(actions[:common], prev_actions):
                settled = True
                break
        if N >= MAX_TRUNCATION:
            break
        previous = (actions, gain)
        N = min(MAX_TRUNCATION, int(N * 1.5) + 1)
        start = _start_actions(model, PolicyTable(actions, model.max_batch), N + 1)
        if warm_start is not None and warm_start.truncation >= actions.size:
            # above the old N the caller's table knows better than the beyond-N rule
            hi = min(N, warm_start.truncation) + 1
            start[actions.size : hi] = _start_actions(model, warm_start, hi)[actions.size : hi]

    policy = PolicyTable(actions, model.max_batch)
    if values is None:
        values = evaluate_policy(smdp, table_actions(model, policy, smdp.n_states), linear_solver)
    ev = summarize(smdp, actions, values)
    return SolveResult(
        policy=policy,
        gain=float(gain),
        mean_latency_s=ev.mean_latency_s,
        mean_power_w=ev.mean_power_w,
        throughput_rps=ev.throughput_rps,
        mean_batch=ev.mean_batch,
        iterations=iterations,
        converged=bool(ok and settled),
        solve_time_s=time.perf_counter() - started,
        truncation=N,
        method=method,
        model=model,
        tail=tail,
        gain_bounds=(float(bounds[0]), float(bounds[1])),
        sizes_tried=tuple(sizes),
        evaluation=ev,
    )
