"""Policy iteration on the truncated SMDP, directly (no uniformisation).

Evaluation solves h(n) = c(n) - g tau(n) + sum_j p(j|n) h(j) with h(0) = 0 in one dense LU: the
unknowns are (g, h(1..N)), i.e. the column of h(0) in I - P is replaced by tau. The same factor
also gives the stationary distribution, because the transposed system A^T y = e_0 is solved by
y = pi / (pi . tau) (rows of I - P sum to zero, so y^T (I - P) = 0 follows from its columns 1..N).
Dense LU beats a sparse one at the sizes the tail cost allows (N of a few hundred to a few thousand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

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


def evaluate_policy(smdp: TruncatedSMDP, actions: np.ndarray) -> PolicyValues:
    P, c, tau = smdp.policy_arrays(actions)
    A = -P
    A[np.diag_indices_from(A)] += 1.0
    A[:, 0] = tau
    try:
        lu = linalg.lu_factor(A, check_finite=False)
    except (linalg.LinAlgError, ValueError) as exc:  # pragma: no cover - unichain by construction
        raise SingularPolicyError(str(exc)) from exc
    if not np.all(np.isfinite(lu[0])) or np.min(np.abs(np.diag(lu[0]))) == 0.0:
        raise SingularPolicyError("policy evaluation matrix is singular")
    x = linalg.lu_solve(lu, c, check_finite=False)
    g = float(x[0])
    h = x.copy()
    h[0] = 0.0
    e0 = np.zeros(smdp.n_states)
    e0[0] = 1.0
    y = linalg.lu_solve(lu, e0, trans=1, check_finite=False)
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


def policy_iteration(smdp: TruncatedSMDP, start: np.ndarray | None = None, max_iter: int = 1000) -> PIOutcome:
    actions = default_start(smdp) if start is None else np.asarray(start, dtype=np.int64).copy()
    values = evaluate_policy(smdp, actions)
    for it in range(1, max_iter + 1):
        new = improve(q_values(smdp, values.h, values.gain), actions)
        if np.array_equal(new, actions):
            return PIOutcome(actions, values, it, True)
        actions = new
        values = evaluate_policy(smdp, actions)
    return PIOutcome(actions, values, max_iter, False)
