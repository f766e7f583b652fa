"""Exact evaluation of a stationary policy table: W, P, J, throughput and batch sizes.

Method: the stationary distribution pi of the embedded chain (one state per decision epoch) on the
truncation 0..N with the same analytic tail as the solver (``solver.tail``: landings above N are
charged the drain back to N while serving full batches, which is what the table's beyond-N rule
does), then renewal-reward ratios: W = E_pi[integral of N(t)/lambda] / E_pi[epoch length] (Little),
P = E_pi[energy] / E_pi[epoch length]. Unless a truncation is given, N grows by half until the cost
moves by less than 1e-10 relative, so the figures do not depend on N; ``tail_mass`` says how much of
the chain still reaches beyond it.

Beyond the table: serve min(n, B), or min(n, b0) for a table with ``beyond = b0`` (a static policy);
the tail's drain above N then runs batches of that size.

Stability: a table is evaluated as written, with its beyond-N rule (serve min(n, B)). A table that
only stays stable because of that rule, i.e. whose last entry serves a batch b with
b / tau(b) <= lambda (static b0 below the load, for instance), raises ``UnstablePolicyError``:
repeating its own top action, the queue would grow without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from solver.model import BatchingModel, ModelError
from solver.pi import PolicyValues, evaluate_policy
from solver.policy import PolicyTable
from solver.tail import TAILS, TruncatedSMDP, build, initial_truncation, service_moments

GROWTH_RTOL = 1e-10
MAX_TRUNCATION = 3000
"""A dense LU at this size takes about 0.3 s and 72 MB per policy evaluation; the analytic tail rarely
needs it (variable service at B = 256 does)."""


class UnstablePolicyError(ValueError):
    """The policy serves too little to keep up with the arrival rate (no finite mean latency)."""


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Long-run figures of one policy under one model (all exact up to the tail treatment)."""

    mean_latency_s: float
    """W: mean response time (queueing + service), seconds."""
    mean_power_w: float
    """P: mean accelerator power, idle included, watts."""
    cost: float
    """J = W + w P, seconds."""
    throughput_rps: float
    """Requests served per second; equals lambda for a stable policy (flow conservation)."""
    mean_batch: float
    """Requests per batch served."""
    batch_pmf: np.ndarray
    """Fraction of batches of size b, index b - 1, b = 1..B."""
    tail_mass: float
    """Probability per decision epoch that the next state lies beyond the truncation."""
    idle_fraction: float = 0.0
    """Fraction of time the server waits."""
    truncation: int = 0
    tail: str = "fluid"
    weight: float = 0.0
    converged: bool = True
    """False if N hit MAX_TRUNCATION before the cost settled."""

    def to_dict(self) -> dict:
        return {
            "mean_latency_s": self.mean_latency_s,
            "mean_power_w": self.mean_power_w,
            "cost": self.cost,
            "throughput_rps": self.throughput_rps,
            "mean_batch": self.mean_batch,
            "batch_pmf": [float(x) for x in self.batch_pmf],
            "tail_mass": self.tail_mass,
            "idle_fraction": self.idle_fraction,
            "truncation": self.truncation,
            "tail": self.tail,
            "weight": self.weight,
            "converged": self.converged,
        }


def check_stable(model: BatchingModel, policy: PolicyTable) -> None:
    """Raise UnstablePolicyError if the table's own top action, or its beyond-table batch size,
    cannot keep up with lambda."""
    m1, _ = service_moments(model.profile)
    b = policy.beyond_batch
    if b != model.max_batch and b / float(m1[b - 1]) <= model.rate:
        raise UnstablePolicyError(
            f"policy serves batches of {b} above its table; they drain at most {b}/tau({b}) = "
            f"{b / float(m1[b - 1]):.6g}/s <= arrival rate {model.rate:.6g}/s, so the queue grows without bound"
        )
    top = policy.truncation
    a = policy.action(top)
    if top < model.max_batch or a == 0 or a == model.max_batch:
        return
    drain = a / float(m1[a - 1])
    if drain <= model.rate:
        raise UnstablePolicyError(
            f"policy serves batches of {a} at the top of its table (n = {top}); they drain at most "
            f"{a}/tau({a}) = {drain:.6g}/s <= arrival rate {model.rate:.6g}/s, so the queue grows without "
            f"bound under this rule (only the beyond-table fallback to full batches would stop it)"
        )


def table_actions(model: BatchingModel, policy: PolicyTable, size: int) -> np.ndarray:
    """a(n) for n = 0..size-1, the table followed by its beyond-N rule."""
    if policy.max_batch != model.max_batch:
        raise ModelError(f"policy is for max_batch {policy.max_batch}, the model has B = {model.max_batch}")
    return policy.extended(size)


def _covering(policy: PolicyTable, n: int) -> int:
    """The smallest truncation >= n that holds the whole table (one more if it ends on a wait)."""
    top = policy.truncation
    return max(n, top + 1 if policy.action(top) == 0 else top)


def summarize(smdp: TruncatedSMDP, actions: np.ndarray, values: PolicyValues, converged: bool = True) -> Evaluation:
    """Renewal-reward figures from the stationary distribution of a policy already solved on smdp."""
    model = smdp.model
    B = model.max_batch
    n = np.arange(smdp.n_states)
    pi = values.pi
    lat = smdp.latency[n, actions]
    energy = smdp.energy[n, actions]
    time = smdp.time[n, actions]
    tail_p = smdp.tail_p[n, actions]
    excursion_batches = smdp.coeffs.batches * smdp.tail_m[n, actions]
    drain = smdp.coeffs.size or B
    mean_time = float(pi @ time)
    W = float(pi @ lat) / mean_time
    P = float(pi @ energy) / mean_time
    batches = np.bincount(actions, weights=pi, minlength=B + 1)[1:]
    batches[drain - 1] += float(pi @ excursion_batches)
    served = float(pi @ actions) + drain * float(pi @ excursion_batches)
    total_batches = float(batches.sum())
    return Evaluation(
        mean_latency_s=W,
        mean_power_w=P,
        cost=W + model.weight * P,
        throughput_rps=served / mean_time,
        mean_batch=served / total_batches if total_batches > 0 else 0.0,
        batch_pmf=batches / total_batches if total_batches > 0 else batches,
        tail_mass=float(pi @ tail_p),
        idle_fraction=float(pi[actions == 0] @ time[actions == 0]) / mean_time,
        truncation=smdp.truncation,
        tail=smdp.tail,
        weight=model.weight,
        converged=converged,
    )


def evaluate(
    model: BatchingModel,
    policy: PolicyTable,
    truncation: int | None = None,
    tail: str = "fluid",
    linear_solver: str | None = None,
) -> Evaluation:
    """Exact long-run W, P, J, throughput and batch sizes of ``policy`` (see the module docstring).

    ``truncation`` fixes N (it must cover the table); by default N grows until the cost settles.
    Raises UnstablePolicyError for tables that cannot keep up with the load.
    linear_solver: "banded" (default), "dense" or "sparse" LU (``solver.pi.evaluate_policy``); same figures.
    """
    if tail not in TAILS:
        raise ModelError(f"tail must be one of {TAILS}, got {tail!r}")
    if model.instances != 1:
        raise ModelError(f"evaluate is for one instance; the model has k = {model.instances} "
                         f"(use solver.instances.evaluate_instances or the simulator)")
    check_stable(model, policy)
    if truncation is not None:
        if truncation < policy.truncation:
            raise ValueError(
                f"truncation {truncation} is below the policy table's last state {policy.truncation}"
            )
        smdp = build(model, _covering(policy, max(int(truncation), model.max_batch)), tail, policy.beyond_batch)
        a = table_actions(model, policy, smdp.n_states)
        return summarize(smdp, a, evaluate_policy(smdp, a, linear_solver))
    N = _covering(policy, initial_truncation(model))
    previous: Evaluation | None = None
    while True:
        smdp = build(model, N, tail, policy.beyond_batch)
        a = table_actions(model, policy, smdp.n_states)
        current = summarize(smdp, a, evaluate_policy(smdp, a, linear_solver))
        if previous is not None and abs(current.cost - previous.cost) <= GROWTH_RTOL * abs(current.cost):
            return current
        if N >= MAX_TRUNCATION:
            return replace(current, converged=False)
        previous = current
        N = min(MAX_TRUNCATION, int(N * 1.5) + 1)
