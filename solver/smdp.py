"""Solve the batching SMDP: pick the truncation, run PI or RVI, evaluate the policy found.

Automatic truncation (the default): solve at a first size, grow N by ``growth`` (default 1.25) and
solve again warm-started from the previous policy, until the gain moves by less than
``growth_rtol`` relative and the policy is settled (below). The error of the fluid
tail shrinks geometrically in N, so the step differences also estimate it: once three sizes are
known, the contraction per step rho = d_k / d_k-1 predicts the distance of the last gain from the
limit, d_k rho / (1 - rho), and that prediction must be within ``growth_rtol`` as well (it is what
stops a slowly converging tail from passing on one small step). Two sizes settle only a step at
rounding level, and steps of opposite sign only when both are within ``growth_rtol``: at small B and
CV 1-2 the error changes sign as N grows and can stay flat over one step, so two gains can agree by
accident (``_gain_settled``).

The policy is settled when it is unchanged on the common states, or (PI, ``policy_by_gain``) when the
previous size's policy, carried to this size as its start (the fluid-seeded added states included),
loses at most NOISE_FLOOR x ``growth_rtol`` (1e-11) of the gain against this size's optimum: PI's
first evaluation gives that gain at no extra cost, and PI is monotone, so start gain - optimum >= 0
is exactly what the size step's policy change is worth. At CV 1-2 the optimal batch size of states
the chain visits once in 10^6-10^9 decisions keeps moving by one as N grows, at Q differences of
about 1e-9 relative (near-ties), with no effect on the gain; requiring them unchanged kept N two to
four times larger than the gain needs (B = 128, CV 1, load 0.3: 873 instead of 446; B = 256, CV 1,
load 0.6: 2667 instead of 2133). The bound is the one the gain rule treats as rounding, so the
policy is settled as far as the gain can tell. The policy returned is this size's optimum; against the
rule of equality (``policy_by_gain=False``) it differs, where it does, only on such near-tie states
(at most about 1e-8 of the stationary mass in the measured cases, docs/notes/issue-18.md), the gain
within 3e-11.

Only a size that could end the search (both settled, or the size cap reached) gets policy iteration's
final improvement over all actions (``policy_iteration(confirm=False)``, where its steps are windowed:
B >= 102 with a start): the others stop where the window finds nothing. The policy returned always
passes the full check, and a size whose window missed an improvement worth more than the policy bound
above shows it at the next size (that size starts from it, and its start gain carries the loss). The
full product is about a third of a large size's policy iteration (cold B = 256, CV 1: 3 of them).

First size: about B + E[K_B] + 3 sd (``initial_truncation``), or, with a warm start from a
neighbouring solve, the largest of the search's own sizes (N0, growth N0, ...) whose size
``RESUME_STEPS`` (2) steps up is within sqrt(growth) of the neighbour's N: a nearby rate or weight
settles at about the same N, so the search then takes the three sizes the stopping rule needs
instead of climbing from the bottom, and being on the same sizes, it returns the N a cold
solve would (unless the cold one would have stopped below the resumed start).

Why 1.25 and not 1.5 (the search before this one, still available as ``growth=1.5,
resume_warm_start=False``): N is returned one step past the first settled size, and the dense
evaluation is cubic in N, so the overshoot of the step is paid cubed. At B = 128, CV 1, load 0.6
the 1.5 steps went 437 -> 656 -> 985 -> 1478 although the gain is within 1e-8 of its limit from
N = 674 (bench/solve_bench.py); the 1.25 steps go 437 -> 547 -> 684 -> 856.

Each size after the first starts PI from the previous size's policy, with the states the step adds
set from the policy's own shape (``shape_seed``, default): a(n) ~ a + b sqrt(n) + c n fitted on the
previous policy's states [N/2, 0.9 N], extrapolated, never below the largest batch on those states
(``_shape_seeded_start``). Where too few states qualify, or with ``shape_seed=False`` (the seed
before), one improvement step on the previous values extended by the fluid tail (h(N + m) = h(N) +
the excursion's relative cost, ``_extended_values``): at CV 1 the beyond-N rule (full batches) is
wrong on a ramp of added states (78 of them at B = 128, load 0.6), the fluid seed on 0-2 there but
one to five batch sizes too high on most added states at B = 256 (the fluid drain serves full
batches). Cold B = 256, CV 1, load 0.6: 13 LUs and 16 PI iterations from the shape seed against 15
and 19. The seed is the start whose gain the policy rule reads, so a better seed can settle the
policy a size earlier: of 180 cold and warm solve pairs (docs/notes/issue-18.md, tenth pass) six models
(CV 2, load 0.3) stop one size earlier, gains within 5.3e-10 relative of the fluid seed's, the policies
differing on near-tie states carrying at most 5.4e-9 of the stationary mass. Policy
iteration then usually changes only a few states, which ``solver.pi.PolicyEvaluator`` solves by a
low-rank update of the last LU instead of a new one, and a size's first windowed step (87-383 states
at cold B = 256, CV 1) by GMRES preconditioned with that LU: one LU per size after the first. The arrivals' pmf and its prefix sums are
computed once for the first three sizes, then for a size and the next one
(``solver.tail.count_arrivals``).

Default growth_rtol 1e-8 (PI): the gain error shrinks geometrically with N (each 1.25x step cut it
by 4x or more in every measured case, each 1.5x step by 25x or more), and the gain returned is the
one at the larger N. 1e-8 is well below what the inputs support (profiles are measured to about
1e-3) and than RVI's default tolerance.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from solver.evaluate import MAX_TRUNCATION, summarize, table_actions
from solver.model import BatchingModel, ModelError
from solver.pi import LINEAR_SOLVERS, PolicyValues, control_limit_search, evaluate_policy, improve, policy_iteration, q_values
from solver.policy import PolicyTable
from solver.result import SolveResult
from solver.rvi import relative_value_iteration
from solver.tail import TAILS, PairArrays, TruncatedSMDP, build, count_arrivals, initial_truncation

METHODS = ("pi", "rvi")
GROWTH_RTOL = 1e-8
"""Default relative gain change per growth step that ends the automatic truncation (module doc)."""
GROWTH = 1.25
"""Default factor between successive sizes of the automatic truncation (module doc)."""
RESUME_STEPS = 2
"""A warm-started automatic search resumes this many of its sizes below the neighbour's N (module doc)."""
NOISE_FLOOR = 1e-3
"""A gain change below NOISE_FLOOR * growth_rtol is rounding, too small to estimate a contraction from."""


def _start_actions(model: BatchingModel, policy: PolicyTable, size: int) -> np.ndarray:
    """A warm-start table in the SMDP's action set: waits at n >= B become full batches."""
    if policy.max_batch != model.max_batch:
        raise ModelError(f"warm_start is for max_batch {policy.max_batch}, the model has B = {model.max_batch}")
    a = policy.extended(size)
    n = np.arange(size)
    return np.where((a == 0) & (n >= model.max_batch), np.minimum(n, model.max_batch), a)


class _SizeSolve(NamedTuple):
    """One size's solve in the automatic truncation's search."""

    actions: np.ndarray
    gain: float
    bounds: tuple[float, float]
    """(lower, upper) on the gain: RVI's span bounds; both the gain for PI."""
    iterations: int
    converged: bool
    values: PolicyValues | None
    """The final policy's values (PI); None for RVI."""
    start_gain: float | None
    """The start policy's gain, PI's first evaluation; None for RVI or without a start."""
    confirmed: bool
    """Whether the policy passed the improvement over all actions (``solver.pi.policy_iteration``'s ``confirm``)."""


def _solve_at(
    smdp: TruncatedSMDP, method: str, start: np.ndarray | None, tol: float, max_iter: int,
    linear_solver: str | None = None, confirm: bool = True,
) -> _SizeSolve:
    if method == "pi":
        out = policy_iteration(smdp, start, max_iter=max_iter, linear_solver=linear_solver, confirm=confirm)
        g = out.values.gain
        return _SizeSolve(out.actions, g, (g, g), out.iterations, out.converged, out.values,
                          None if start is None else out.start_gain, out.confirmed)
    h0 = None if start is None else evaluate_policy(smdp, start, linear_solver).h
    out = relative_value_iteration(smdp, h0, tol=tol, max_iter=max_iter)
    return _SizeSolve(out.actions, out.gain, (out.lower, out.upper), out.iterations, out.converged, None, None, True)


def _extended_values(smdp: TruncatedSMDP, values: PolicyValues, size: int) -> np.ndarray:
    """h on 0..size-1 from a solve on 0..N: h(N + m) = h(N) + the excursion's relative cost
    Delta(m) = C(m) - g D(m) (the tail's own estimate of what lies above N, ``solver.tail``)."""
    N = smdp.truncation
    m = np.arange(1, size - N, dtype=float)
    c = smdp.coeffs
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing model (w near the float range)
        delta = c.lin * m + c.quad * m * m + smdp.model.weight * c.energy * m - values.gain * c.time * m
    return np.concatenate([values.h, values.h[N] + delta])


def _seeded_start(smdp: TruncatedSMDP, start: np.ndarray, below: int, h: np.ndarray, gain: float) -> np.ndarray:
    """``start`` with its actions from state ``below`` up replaced by the greedy ones for (h, gain).

    The states a size step adds start from the beyond-N rule (full batches), which at CV 1 is wrong
    on a ramp of states; one improvement step on the previous size's values extended by the fluid
    tail (``_extended_values``) puts most of them right before the first evaluation. The common
    states keep the previous policy; policy iteration decides either way.
    """
    out = start.copy()
    out[below:] = improve(q_values(smdp, h, gain, first=below), start[below:])
    return out


SHAPE_FIT = (0.5, 0.9)
"""The shape seed fits the previous size's policy on these fractions of its truncation (``_shape_seeded_start``)."""
SHAPE_MIN_POINTS = 8
"""Fewer fitted states than this (all of them at n >= B): the shape seed falls back to ``_seeded_start``."""


def _shape_seeded_start(start: np.ndarray, below: int, max_batch: int) -> np.ndarray | None:
    """``start`` with its actions from state ``below`` up set from the previous policy's own shape:
    a(n) ~ a + b sqrt(n) + c n, fitted by least squares on the states n in [0.5, 0.9] x (below - 1)
    (n >= B; away from the top, where the tail's approximation bends the policy), extrapolated,
    rounded and clipped to [the largest batch on the fitted states, B]. None where fewer than ``SHAPE_MIN_POINTS`` states qualify.

    Above N the optimal batch size keeps growing with n (about as sqrt(n) at CV 1-2, flat at B
    where the queue saturates it); the fluid improvement step (``_seeded_start``) starts the added
    states one to five sizes too high at 1706 of the cold B = 256, CV 1 search, and each wrong
    state is one more state for policy iteration to change (docs/notes/issue-18.md, tenth pass)."""
    N = below - 1
    lo = max(max_batch, int(SHAPE_FIT[0] * N))
    hi = int(SHAPE_FIT[1] * N) + 1
    if hi - lo < SHAPE_MIN_POINTS:
        return None
    n = np.arange(lo, hi, dtype=float)
    basis = np.stack([np.ones_like(n), np.sqrt(n), n], axis=1)
    coef = np.linalg.lstsq(basis, start[lo:hi].astype(float), rcond=None)[0]
    m = np.arange(below, start.size, dtype=float)
    fitted = coef[0] + coef[1] * np.sqrt(m) + coef[2] * m
    out = start.copy()
    # never below the largest batch the fitted states use: where the policy reaches B inside the fit
    # range the curve bends back under it, while the batch size above keeps growing (or stays at B)
    floor = int(start[lo:hi].max())
    out[below:] = np.clip(np.rint(fitted), floor, max_batch).astype(start.dtype)
    return out


def _grow(N: int, growth: float) -> int:
    return int(N * growth) + 1


def _grow_steps(N: int, growth: float, steps: int) -> int:
    for _ in range(steps):
        N = _grow(N, growth)
    return N


def _gain_settled(gains: list[float], rtol: float) -> bool:
    """The last step moved the gain by <= rtol relative, and the sizes show that the gain is settled:
    two sizes only when that step is at rounding level; otherwise three, whose steps either have the
    same sign and contract geometrically (rho) with the predicted distance to the limit
    d rho / (1 - rho) within rtol too, or change sign with the previous step also within rtol.

    The gain's error can change sign as N grows and can stay flat over one step before dropping (at
    small B and CV 1-2 it went +1.1e-7, +1.0e-7, -1.9e-8 at N = 118, 148, 186), so two sizes can agree
    by accident and a small step after a large one can look like a fast contraction."""
    scale = rtol * abs(gains[-1])
    d = gains[-1] - gains[-2]
    if abs(d) > scale:
        return False
    if abs(d) <= NOISE_FLOOR * scale:
        return True
    if len(gains) < 3:
        return False
    d_prev = gains[-2] - gains[-3]
    if abs(d_prev) <= NOISE_FLOOR * scale:  # the previous step was already at rounding level
        return True
    if (d > 0) != (d_prev > 0):  # the error changed sign: no contraction to trust, both steps must be small
        return abs(d_prev) <= scale
    rho = abs(d) / abs(d_prev)
    return rho < 1 and abs(d) * rho / (1 - rho) <= scale


def _policy_settled(
    actions: np.ndarray, previous: np.ndarray, start_gain: float | None, gain: float, rtol: float, by_gain: bool
) -> bool:
    """The size step left the policy settled to the tolerance: unchanged on the common states, or
    (``by_gain``, PI) the previous size's policy, as this size's start, loses at most ``rtol`` of the
    gain against this size's optimum (module doc)."""
    if np.array_equal(actions[: previous.size], previous):
        return True
    return by_gain and start_gain is not None and start_gain - gain <= NOISE_FLOOR * rtol * abs(gain)


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
    growth: float = GROWTH,
    resume_warm_start: bool = True,
    control_limit_start: bool = False,
    policy_by_gain: bool = True,
    shape_seed: bool = True,
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
    linear_solver: "banded" (default), "dense" or "sparse" LU for policy evaluation (``solver.pi``); same answer.
    growth: factor between successive sizes of the automatic truncation (> 1; module docstring).
    resume_warm_start: with automatic N and a warm start, begin the search two steps below the warm
    start's size instead of at ``initial_truncation`` (never below it). ``growth=1.5,
    resume_warm_start=False, linear_solver="dense"`` is the solver as it was before (kept for
    comparison).
    policy_by_gain: the automatic N counts the policy as settled when the previous size's policy is
    within NOISE_FLOOR x growth_rtol of this size's optimal gain (module doc), not only when it is
    unchanged on the common states (False: the rule before, kept for comparison). PI only.
    shape_seed: start the states a size step adds from the previous policy's fitted shape (module doc);
    False: from one improvement step on the fluid-extended values (the seed before, kept for
    comparison). Same gain to the growth tolerance either way; it moves only PI's start. PI only.
    control_limit_start: without a warm start, start PI from the best control-limit policy
    (``solver.pi.control_limit_search``) instead of greedy; PI still decides, so the answer is the
    same. Off by default: on the V100 profiles the search costs more evaluations than it saves
    (docs/notes/issue-18.md).
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
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not (math.isfinite(growth) and growth > 1):
        raise ModelError(f"growth must be a finite number > 1, got {growth!r}")
    if growth_rtol is None:
        growth_rtol = GROWTH_RTOL if method == "pi" else max(GROWTH_RTOL, 10 * tol)
    if truncation is not None:
        if isinstance(truncation, bool) or not isinstance(truncation, (int, np.integer)):
            raise ModelError(f"truncation must be an integer >= B = {model.max_batch}, got {truncation!r}")
        if truncation < model.max_batch:
            raise ModelError(f"truncation {truncation} must be >= max_batch B = {model.max_batch}")
        if warm_start is not None and warm_start.truncation > truncation:
            warm_start = PolicyTable(warm_start.actions[: truncation + 1], warm_start.max_batch)

    resumed = truncation is None and warm_start is not None and resume_warm_start
    if truncation is not None:
        N = int(truncation)
    else:
        N = max(initial_truncation(model), model.max_batch)
        if resumed:
            # the search's own sizes, so that a warm solve tries what a cold one would from there;
            # the neighbour's sizes lie on a grid shifted by up to one step, hence the sqrt(growth)
            reach = warm_start.truncation * math.sqrt(growth)
            while _grow_steps(N, growth, RESUME_STEPS + 1) <= reach:
                N = _grow(N, growth)
    start = None if warm_start is None else _start_actions(model, warm_start, N + 1)
    searched = 0
    if start is None and control_limit_start and method == "pi":
        found = control_limit_search(build(model, N, tail), linear_solver)
        start, searched = found.actions, found.evaluations
    sizes: list[int] = []
    gains: list[float] = []
    iterations = 0
    previous = None
    previous_values = None
    settled = truncation is not None
    counts = None
    pairs: PairArrays | None = None
    # the arrivals' pmf of the first call covers three sizes: a resumed search visits them at least (the
    # stopping rule's), a cold one at CV >= 1 usually more; a later call covers its size and the next.
    # Cold B = 256, CV 1, load 0.6: two calls (kmax 1364, 2133) instead of three (1091, 1706, 2667)
    planned = _grow_steps(N, growth, 2)
    while True:
        if truncation is None and (counts is None or counts.kmax < N):
            # one count pmf (and its prefix sums) for this size and the next, or for all the sizes a
            # resumed search plans (its first N + 1 columns are each size's, bit for bit)
            counts = count_arrivals(model, min(MAX_TRUNCATION, max(_grow(N, growth), planned)))
            pairs = PairArrays(model, counts.kmax)  # and the arrays that do not depend on N, as far
        smdp = build(model, N, tail, counts=counts, pairs=pairs)
        if previous_values is not None and method == "pi":
            shaped = _shape_seeded_start(start, previous.size, model.max_batch) if shape_seed else None
            if shaped is None:
                h = _extended_values(previous_smdp, previous_values, N + 1)
                shaped = _seeded_start(smdp, start, previous.size, h, previous_values.gain)
            start = shaped
        # a size's policy gets the improvement over all actions only where the size could end the search
        actions, gain, bounds, its, ok, values, start_gain, confirmed = _solve_at(
            smdp, method, start, tol, max_iter, linear_solver, confirm=truncation is not None)
        sizes.append(N)
        gains.append(gain)
        iterations += its
        if truncation is not None or not math.isfinite(gain):  # an overflowed gain settles nothing
            break
        while True:
            ends = previous is not None and _policy_settled(
                actions, previous, start_gain, gain, growth_rtol, policy_by_gain) and _gain_settled(gains, growth_rtol)
            if confirmed or not (ends or N >= MAX_TRUNCATION):
                break
            confirmed = True
            better = improve(q_values(smdp, values.h, values.gain), actions)
            if not np.array_equal(better, actions):  # an improvement outside the window: PI again from it
                actions, gain, bounds, its, ok, values, *_ = _solve_at(smdp, method, better, tol, max_iter, linear_solver)
                gains[-1] = gain
                iterations += its
        if ends:
            settled = True
            break
        if N >= MAX_TRUNCATION:
            break
        # only h and g of the previous size are read (the seeded start): keep them without the LU that
        # the values' lazily solved pi refers to (that LU would otherwise stay alive beside the next one)
        detached = None if values is None else PolicyValues(
            values.gain, values.h, stationary=lambda smdp=smdp, a=actions: evaluate_policy(smdp, a, linear_solver).pi)
        previous, previous_values, previous_smdp = actions, detached, smdp
        values = None
        N = min(MAX_TRUNCATION, _grow(N, growth))
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
        iterations=iterations + searched,
        # A gain that overflowed (w x e(b) past the float range, e.g. w = 1e308) is no solution at all.
        converged=bool(ok and settled and math.isfinite(gain)),
        solve_time_s=time.perf_counter() - started,
        truncation=N,
        method=method,
        model=model,
        tail=tail,
        gain_bounds=(float(bounds[0]), float(bounds[1])),
        sizes_tried=tuple(sizes),
        evaluation=ev,
    )
