"""An SLO bound derived from the model: the tail of Triton's best delay, under the same arrivals.

An operator who states a p99 bound D states a number; one who wants "no worse a tail than Triton's
dynamic batcher would give here" would have to measure Triton first. ``BestDelaySlo`` asks for that
bound from the model instead: among Triton delays d, the one with the least J = W + w P, and its
predicted q-quantile of response time, both judged on the path the SLO search judges its own
candidates on (``solver.slo.search_path``: the model's arrival law -- Poisson, the learned groups, or a
fitted MMPP -- at its rate, one seed, common random numbers). That quantile is the search's budget
(``solve_best_delay_slo``).

Each delay is judged as Triton runs it: ``solver.policy.TritonBatcher``, whose batcher (without
prefetching, as a model with priority levels or a queue policy runs it) often sleeps through its
instance freeing until the next arrival, which gives a longer tail than ``TimeoutRule`` (the rule
decided whenever the instance is free). ``catch_share`` is the share of those races it wins.

What is served is the least-J of two: the search's pick if it is feasible (the *upper* 95% bound of its
quantile within the budget), and the best delay as the gate runs it -- the full-batch table with a
max-wait guard of d (greedy for d = 0), which decides as ``TimeoutRule`` does, judged on the same path --
if it meets the budget (its point quantile, being the bound's reference). Where the gate's margin holds
more than the direct extra (its hop through the sidecar is longer than a client's to Triton), the
budget sits below the delay's quantile and the delay may miss it: then the search's feasible pick is
served whatever its J, and where there is none either, the delay, flagged infeasible (not greedy: the
delay is what the bound was derived from, and the gap is the hop, which no policy takes back).
The gate's delay has the same J and tail as Triton's would where Triton catches every free instance, and
less where it does not, so in the model the policy served is never worse than the best delay on J and
never worse on the tail.

In the answers' terms the bound is D = the delay's predicted quantile + what the delay's answers would
carry beyond the model if a client were served by Triton directly (``direct_extra_s``: its own hop to
Triton and its lateness in sending; unset, the gate's whole ``margin_s``) + the sidecar's measured
correction when one is given (how far answers run above the model's prediction on this host, which a
delay's would too). The gate's own answers carry its margin (which holds the hop through the sidecar,
which a direct client does not pay) and the correction beyond its prediction, so the search's budget is
D - margin - correction = the delay's predicted quantile + ``direct_extra_s`` - ``margin_s``: with the
margin measured for the gate and the direct extra for Triton, the gate's tail is asked to stay within
what Triton's own answers would carry.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from solver.model import BatchingModel, ModelError
from solver.policy import TRITON_CATCH_SHARE, BatchRule, MaxWaitGuard, PolicyTable, TritonBatcher, greedy, threshold
from solver.slo import QuantileEstimate, SloCandidate, SloResult, SloTarget, search_path, simulated_quantile, solve_slo


DEFAULT_DELAYS_S = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05)
"""Triton max_queue_delay values compared by default, seconds."""


@dataclass(frozen=True)
class BestDelaySlo:
    """Ask for the q-quantile of response time to be no worse than the least-J Triton delay's of
    ``delays_s`` (seconds), predicted under the model's arrivals; ``margin_s`` as ``SloTarget``'s."""

    quantile: float
    delays_s: tuple[float, ...]
    margin_s: float = 0.0
    catch_share: float = TRITON_CATCH_SHARE
    """``TritonBatcher.catch_share``: the share of completions with requests queued at which Triton's
    batcher catches its instance free (1: Triton decides as ``TimeoutRule``)."""
    direct_extra_s: float | None = None
    """What the delay's answers would carry beyond its model quantile, served by Triton directly (the
    client's own hop to Triton and its send lag), seconds; None: ``margin_s`` (the client's path to the
    sidecar counted as its path to Triton)."""

    def __post_init__(self) -> None:
        TritonBatcher(1, 0.0, catch_share=self.catch_share)  # its checks
        q, m, x = self.quantile, self.margin_s, self.direct_extra_s
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 < q < 1.0:
            raise ModelError(f"SLO quantile must be a number strictly between 0 and 1, got {q!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0.0:
            raise ModelError(f"SLO margin must be a finite number of seconds >= 0, got {m!r}")
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                              or x < 0.0):
            raise ModelError(f"the direct extra (what a delay served by Triton directly carries beyond its model) "
                             f"must be a finite number of seconds >= 0, got {x!r}")
        delays = tuple(self.delays_s)
        if not delays:
            raise ModelError("the best-delay bound needs at least one Triton delay to compare with")
        for d in delays:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0.0:
                raise ModelError(f"Triton delays must be finite numbers of seconds >= 0, got {d!r}")
        object.__setattr__(self, "quantile", float(q))
        object.__setattr__(self, "margin_s", float(m))
        object.__setattr__(self, "direct_extra_s", None if x is None else float(x))
        object.__setattr__(self, "delays_s", tuple(sorted({float(d) for d in delays})))

    @property
    def direct_s(self) -> float:
        """``direct_extra_s``, or ``margin_s`` where it is unset."""
        return self.margin_s if self.direct_extra_s is None else self.direct_extra_s


def delay_rule(max_batch: int, delay_s: float) -> tuple[PolicyTable, float | None]:
    """Triton's delay d as a gate rule: (table, max-wait guard): wait until B are queued, serve them,
    or serve what is queued once the oldest has waited d; d = 0 is greedy (no guard)."""
    if delay_s == 0.0:
        return greedy(max_batch), None
    return threshold(max_batch, max_batch), float(delay_s)


@dataclass(frozen=True)
class DelayPoint:
    """One Triton delay judged on the search's path."""

    delay_s: float
    estimate: QuantileEstimate
    mean_latency_s: float
    mean_power_w: float
    mean_batch: float
    cost: float
    """J = W + w P at the model's weight."""


@dataclass(frozen=True, eq=False)
class DerivedBound:
    """The bound derived for one model: the least-J delay and its predicted q-quantile."""

    rule: BestDelaySlo
    best: DelayPoint
    """The least-J delay as Triton runs it (``TritonBatcher``)."""
    delays: tuple[DelayPoint, ...]
    arrivals: str
    """The arrival model's spec the delays were judged under."""
    gate_delay: DelayPoint
    """The same delay as the gate runs it (``delay_rule``: decides as ``TimeoutRule``), on the same path."""

    @property
    def quantile_s(self) -> float:
        """The search's budget: the best delay's predicted q-quantile."""
        return self.best.estimate.quantile_s

    def target(self, correction_s: float = 0.0) -> SloTarget:
        """The SLO in the answers' terms: D = the delay's quantile + the direct extra + ``correction_s``,
        searched for D less the gate's margin and ``correction_s`` (module doc)."""
        if not math.isfinite(correction_s) or correction_s < 0:
            raise ModelError(f"correction must be a finite number of seconds >= 0, got {correction_s!r}")
        r = self.rule
        if not self.quantile_s + r.direct_s > r.margin_s:
            raise ModelError(f"the best delay's predicted q{r.quantile:g} {self.quantile_s * 1e3:.2f} ms + the direct "
                             f"extra {r.direct_s * 1e3:.2f} ms leave nothing within the gate's margin "
                             f"{r.margin_s * 1e3:.2f} ms")
        return SloTarget(r.quantile, self.quantile_s + r.direct_s + correction_s, r.margin_s + correction_s)

    def describe(self) -> str:
        """One line for status and logs."""
        return (f"best_delay: Triton delay {self.best.delay_s * 1e3:g} ms (least J of "
                f"{', '.join(f'{p.delay_s * 1e3:g}' for p in self.delays)} ms), predicted "
                f"q{self.rule.quantile:g} {self.quantile_s * 1e3:.2f} ms, J {self.best.cost * 1e3:.2f} ms, "
                f"under {self.arrivals}")

    def to_dict(self) -> dict:
        return {
            "bound": "best_delay",
            "best_delay_s": self.best.delay_s,
            "best_delay_quantile_s": self.quantile_s,
            "best_delay_quantile_ci95_s": _num(self.best.estimate.ci95_s),
            "best_delay_gain": self.best.cost,
            "bound_arrivals": self.arrivals,
            "best_delay_catch_share": self.rule.catch_share,
            "best_delay_direct_extra_s": self.rule.direct_s,
            "gate_delay_quantile_s": self.gate_delay.estimate.quantile_s,
            "gate_delay_gain": self.gate_delay.cost,
            "delays": [{"delay_s": p.delay_s, "quantile_s": p.estimate.quantile_s,
                        "mean_latency_s": p.mean_latency_s, "mean_power_w": p.mean_power_w, "gain": p.cost}
                       for p in self.delays],
        }


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def derive_bound(model: BatchingModel, rule: BestDelaySlo, *, seed: int = 0,
                 requests: int | None = None) -> DerivedBound:
    """Judge every delay of ``rule`` as Triton runs it (``TritonBatcher``) on the SLO search's path for
    ``model`` (same seed, same length) and keep the one with the least J (the shortest delay on a tie);
    the same delay as the gate runs it is judged on that path too."""
    if not isinstance(rule, BestDelaySlo):
        raise ModelError(f"rule must be a BestDelaySlo, got {type(rule).__name__}")
    arr, warmup = search_path(model, rule.quantile, requests=requests, seed=seed)
    target = SloTarget(rule.quantile, 1.0)  # only the quantile matters here

    def judge(d: float, how: BatchRule | TritonBatcher) -> DelayPoint:
        est, sim = simulated_quantile(model, how, target, arr, seed=seed, warmup=warmup)
        return DelayPoint(d, est, sim.mean_latency_s, sim.mean_power_w, sim.mean_batch,
                          sim.mean_latency_s + model.weight * sim.mean_power_w)

    points = [judge(d, TritonBatcher(model.max_batch, d, catch_share=rule.catch_share)) for d in rule.delays_s]
    finite = [p for p in points if math.isfinite(p.cost) and math.isfinite(p.estimate.quantile_s)]
    if not finite:
        raise ModelError(f"no Triton delay of {rule.delays_s} has a finite J at {model.rate:g} req/s")
    best = min(finite, key=lambda p: (p.cost, p.delay_s))
    gate = judge(best.delay_s, _rule(*delay_rule(model.max_batch, best.delay_s)))
    return DerivedBound(rule, best, tuple(points), model.arrivals.spec, gate)


def _rule(table: PolicyTable, guard: float | None) -> BatchRule:
    return table if guard is None else MaxWaitGuard(table, guard)


@dataclass(frozen=True, eq=False)
class BestDelayResult:
    """The SLO search for the derived bound, and what is served: its pick, or the delay itself."""

    bound: DerivedBound
    search: SloResult
    """The SLO search for the bound (``chosen`` may be greedy, infeasible)."""
    result: SloResult
    """What to serve: ``search`` itself, or the same with the delay as ``chosen`` (``delay_served``)."""
    delay_served: bool
    """The search's pick missed the bound, or cost more J than the delay as the gate runs it where that meets
    the bound: the delay is served (``result.feasible`` says whether it meets the bound)."""

    def to_dict(self) -> dict:
        out = self.result.to_dict()
        out.update(self.bound.to_dict())
        out["delay_served"] = self.delay_served
        out["search_feasible"] = bool(self.search.feasible)
        out["search_gain"] = _num(self.search.chosen.cost)
        out["solve_time_s"] = float(self.result.solve_time_s)
        return out


def solve_best_delay_slo(model: BatchingModel, rule: BestDelaySlo, *, seed: int = 0, correction_s: float = 0.0,
                         requests: int | None = None) -> BestDelayResult:
    """Derive the bound (``derive_bound``), search the SLO family for it (``solver.slo.solve_slo``, same
    path), and serve the least-J of the search's feasible pick and the delay as the gate runs it (module doc)."""
    started = time.perf_counter()
    bound = derive_bound(model, rule, seed=seed, requests=requests)
    target = bound.target(correction_s)
    search = solve_slo(model, target, seed=seed, requests=requests)
    g = bound.gate_delay
    # the delay meets the bound when its point quantile is within the budget: it is the bound's own reference
    # (equal to its Triton twin's where the hops agree and Triton catches every free instance), and misses it
    # only by what the gate's margin holds beyond the direct extra (the hop through the sidecar)
    delay_meets = g.estimate.quantile_s <= target.budget_s
    if search.feasible and (search.chosen.cost <= g.cost or not delay_meets):
        return BestDelayResult(bound, search, search, False)
    table, guard = delay_rule(model.max_batch, g.delay_s)
    # its attainment was not judged against a bound (its Triton twin sets the bound): not a number
    est = QuantileEstimate(g.estimate.quantile_s, g.estimate.ci95_s, math.nan, g.estimate.method)
    delay = SloCandidate(math.nan, guard, table, est, g.mean_latency_s, g.mean_power_w, g.cost, delay_meets,
                         g.mean_batch)
    served = SloResult(model, target, delay, delay.feasible, (*search.candidates, delay), search.method,
                       search.requests, time.perf_counter() - started)
    return BestDelayResult(bound, search, served, True)


__all__ = ["DEFAULT_DELAYS_S", "BestDelayResult", "BestDelaySlo", "DelayPoint", "DerivedBound", "delay_rule", "derive_bound",
           "solve_best_delay_slo"]
