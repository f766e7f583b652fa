"""Policy iteration on the truncated SMDP, directly (no uniformisation).

Evaluation solves h(n) = c(n) - g tau(n) + sum_j p(j|n) h(j) with h(0) = 0 in one dense LU: the
unknowns are (g, h(1..N)), i.e. the column of h(0) in I - P is replaced by tau. The same factor
also gives the stationary distribution, because the transposed system A^T y = e_0 is solved by
y = pi / (pi . tau) (rows of I - P sum to zero, so y^T (I - P) = 0 follows from its columns 1..N).

The system is not sparse enough for a sparse LU to pay: row n holds the whole K pmf window from
n - a, and that window is about N / 2 wide for deterministic service and all of 0..N for CV 1 (the
negative-binomial tail is still above 1e-20 at N), so 46-69% of the entries are nonzero and SuperLU
fills most of the rest (RESULTS.md section 4 measures both). ``linear_solver="sparse"`` (scipy
``splu`` on the same entries) is kept for comparison and for policies with short windows; the
default is the dense LU on one Fortran-ordered array built in place, factored without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.sparse import linalg as sparse_linalg

from solver.tail import TruncatedSMDP


@dataclass(frozen=True, eq=False)
class PolicyValues:
    """Gain, relative values (h(0) = 0) and stationary distribution of one policy on 0..N."""

    gain: float
    h: np.ndarray
    pi: np.ndarray
    """Stationary distribution of the embedded chain (per decision epoch)."""


class SingularPolicyError(ArithmeticError):
    """The evaluation system is singular: the policy does not define a single recurrent class."""


LINEAR_SOLVERS = ("dense", "sparse")
DEFAULT_LINEAR_SOLVER = "dense"
"""Less memory than sparse everywhere and faster at CV 1 with N >= 1300; sparse may be faster for
deterministic service (measured only on a contended machine, RESULTS.md section 4)."""


def _check_solver(linear_solver: str | None) -> str:
    name = DEFAULT_LINEAR_SOLVER if linear_solver is None else linear_solver
    if name not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    return name


def evaluate_policy(smdp: TruncatedSMDP, actions: np.ndarray, linear_solver: str | None = None) -> PolicyValues:
    """Gain, relative values and stationary distribution of ``actions`` (one LU, two solves).

    linear_solver: "dense" (LAPACK LU, the default) or "sparse" (SuperLU via scipy.sparse.linalg.splu);
    both solve the same system and agree to rounding.
    """
    sparse = _check_solver(linear_solver) == "sparse"
    A, c, tau = smdp.evaluation_system(actions, sparse=sparse)
    e0 = np.zeros(smdp.n_states)
    e0[0] = 1.0
    if sparse:
        try:
            lu = sparse_linalg.splu(A)
        except RuntimeError as exc:  # "Factor is exactly singular"
            raise SingularPolicyError(str(exc)) from exc
        # SuperLU's threshold pivoting after a fill-reducing ordering leaves residuals near 1e-8 here;
        # one step of refinement (a sparse product and two more solves) brings them to rounding
        x = lu.solve(c)
        x += lu.solve(c - A @ x)
        y = lu.solve(e0, trans="T")
        y += lu.solve(e0 - A.T @ y, trans="T")
        del A
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise SingularPolicyError("policy evaluation matrix is singular")
    else:
        try:
            lu = linalg.lu_factor(A, overwrite_a=True, check_finite=False)
        except (linalg.LinAlgError, ValueError) as exc:  # pragma: no cover - unichain by construction
            raise SingularPolicyError(str(exc)) from exc
        del A
        if not np.all(np.isfinite(lu[0])) or np.min(np.abs(np.diag(lu[0]))) == 0.0:
            raise SingularPolicyError("policy evaluation matrix is singular")
        x = linalg.lu_solve(lu, c, check_finite=False)
        y = linalg.lu_solve(lu, e0, trans=1, check_finite=False)
    g = float(x[0])
    h = x.copy()
    h[0] = 0.0
    y = np.clip(y, 0.0, None)
    return PolicyValues(g, h, y / y.sum())


def q_values(smdp: TruncatedSMDP, h: np.ndarray, g: float) -> np.ndarray:
    """Q(n, a) = c(n, a) - g tau(n, a) + E[h(next)]; +inf where the action is not allowed."""
    q = smdp.cost - g * smdp.time + smdp.expected_next(h)
    return np.where(smdp.valid, q, np.inf)


def improve(q: np.ndarray, current: np.ndarray, rtol: float = 1e-11) -> np.ndarray:
    """Greedy improvement that keeps the current action unless another is better by more than noise.

    Keeping ties is what makes policy iteration terminate instead of cycling between equal actions.
    """
    n = np.arange(q.shape[0])
    best = np.argmin(q, axis=1)
    qb = q[n, best]
    qc = q[n, current]
    scale = np.abs(qb) + np.abs(qc) + 1e-300
    keep = qc <= qb + rtol * scale
    return np.where(keep, current, best)


@dataclass(frozen=True, eq=False)
class PIOutcome:
    actions: np.ndarray
    values: PolicyValues
    iterations: int
    converged: bool


def default_start(smdp: TruncatedSMDP) -> np.ndarray:
    """Greedy: serve min(n, B), the natural policy when nothing better is known."""
    n = np.arange(smdp.n_states)
    return np.minimum(n, smdp.model.max_batch)


CYCLE_MEMORY = 8
"""Policies remembered to stop a rounding-driven cycle between tied actions."""


def policy_iteration(
    smdp: TruncatedSMDP, start: np.ndarray | None = None, max_iter: int = 1000, linear_solver: str | None = None
) -> PIOutcome:
    actions = default_start(smdp) if start is None else np.asarray(start, dtype=np.int64).copy()
    values = evaluate_policy(smdp, actions, linear_solver)
    seen = [actions]
    for it in range(1, max_iter + 1):
        new = improve(q_values(smdp, values.h, values.gain), actions)
        if np.array_equal(new, actions):
            return PIOutcome(actions, values, it, True)
        if any(np.array_equal(new, old) for old in seen[-CYCLE_MEMORY:]):
            # exact PI cannot revisit a policy: two actions tie to within the solve's rounding and
            # the rounding alternates; the policies in the cycle share the gain, keep the current one
            return PIOutcome(actions, values, it, True)
        actions = new
        seen.append(actions)
        values = evaluate_policy(smdp, actions, linear_solver)
    return PIOutcome(actions, values, max_iter, False)
