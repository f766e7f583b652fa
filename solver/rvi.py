"""Relative value iteration on the uniformised truncated SMDP (Tijms, A First Course in Stochastic
Models, sec. 7.1).

With tau_u = 0.99 min tau(n, a), the discrete-time MDP with costs c/tau and transitions
(tau_u/tau) p(j|n,a) + (1 - tau_u/tau) [j = n] has the same optimal policies and its average cost per
step equals the SMDP's g per unit time. Tijms takes tau_u strictly below min tau: every state then
keeps a self-loop of probability >= 0.01 under every action, so every policy's chain is aperiodic
and value iteration converges (with tau_u = min tau exactly, a periodic chain makes V_k+1 - V_k
oscillate and the bounds never meet). Value iteration on it brackets g between the min and max of
V_k+1 - V_k; we stop when that span is below tol times the lower bound. Its relative values are
h / tau_u, which is how a warm-start policy seeds V_0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solver.tail import TruncatedSMDP

UNIFORMISATION_FACTOR = 0.99
"""tau_u / min tau: strictly below 1, so that the uniformised chain is aperiodic (Tijms, sec. 7.1)."""


@dataclass(frozen=True, eq=False)
class RVIOutcome:
    actions: np.ndarray
    gain: float
    lower: float
    upper: float
    iterations: int
    converged: bool
    values: np.ndarray
    """Final relative values of the uniformised MDP (V(0) = 0)."""


def relative_value_iteration(
    smdp: TruncatedSMDP, h0: np.ndarray | None = None, tol: float = 1e-9, max_iter: int = 100_000
) -> RVIOutcome:
    """Run RVI from V_0 = h0 / tau_u (h0: SMDP relative values of a warm-start policy) or from 0."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    valid = smdp.valid
    tau_u = UNIFORMISATION_FACTOR * float(np.min(smdp.time[valid]))
    ratio = np.where(valid, tau_u / smdp.time, 0.0)
    c_tilde = np.where(valid, smdp.cost / smdp.time, np.inf)
    v = np.zeros(smdp.n_states) if h0 is None else (np.asarray(h0, dtype=float) - float(h0[0])) / tau_u
    lower, upper = -np.inf, np.inf
    converged = False
    it = 0
    q = None
    for it in range(1, max_iter + 1):
        q = c_tilde + ratio * (smdp.expected_next(v) - v[:, None]) + v[:, None]
        v_new = q.min(axis=1)
        diff = v_new - v
        lower, upper = float(diff.min()), float(diff.max())
        v = v_new - v_new[0]
        if upper - lower <= tol * abs(lower):
            converged = True
            break
    q = c_tilde + ratio * (smdp.expected_next(v) - v[:, None]) + v[:, None]
    actions = np.argmin(q, axis=1).astype(np.int64)
    return RVIOutcome(actions, 0.5 * (lower + upper), lower, upper, it, converged, v)
