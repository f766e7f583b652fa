"""Keeping each model's SMDP policy right while it runs: rate estimate -> solve -> atomic swap.

One ``PolicyController`` per gated model that uses the ``smdp`` policy. It owns the arrival-rate
estimator, the operator's weight and latency target, and the policy's version. Solving never runs
on the event loop: it goes to the solver service (``solver_url``) or, without one, to a worker
thread. If the solver cannot be reached the gate keeps its last policy and the status says so.

Why a periodic tick and not a check on every arrival: the estimator's change detector is O(1) per
arrival already; deciding to re-solve at most every ``retune_interval_s`` bounds how often a
burst of noise can ask for solves, and a silence (rate drop) is noticed without any arrival.
Steps are found by the estimator's CUSUM (ratio ``change_ratio``); drifts smaller than that by a
look every ``3 x window_s`` at the windowed estimate.

The weight a policy is solved with. The operator's objective is long-run: mean response time over
all requests plus w x time-average power. Over regimes i of rate lambda_i and time share f_i it is
sum_i f_i (lambda_i / lambda_bar) (W_i + w (lambda_bar / lambda_i) P_i), lambda_bar the long-run mean
rate: a regime's requests weigh in proportion to its rate, its power in proportion to its time only.
So the policy for a regime of rate lambda minimises W + w' P with w' = w x lambda_bar / lambda, not
W + w P: in a quiet hour power matters more per request, in a busy one less. Solving every regime
with w itself is what a naive adaptive controller does, and it can end up worse than one fixed policy
(exact evaluation on two-regime loads: up to 1.9% higher J than the fixed policy at w = 0.001-0.003;
with the scaled weight, never higher). lambda_bar is an exponentially weighted mean of the arrival
rate over ``long_run_s`` (0: off, w is used as is); at a steady rate w' = w.

Learning the service profile. Every batch the gate saw complete feeds ``observe_batch`` (an O(1)
update, the only work on the request path). At most every ``LearningConfig.check_interval_s`` the
tick rebuilds the learned profile (``estimator.ProfileLearner``: per-size means blended with the
CSV prior where data are thin) and, when it drifted significantly from the profile in force (more
than ``profile_drift`` relative at a size with ``profile_min_samples`` batches, outside the mean's
confidence interval), adopts it and marks the policy dirty: the next tick re-solves with it, and
the new table replaces the old one between two decisions like any other re-solve.

Tail-latency SLO. With ``set_slo`` (config ``slo``, ``smdp ctl set-slo``) a solve is the SLO search
(``solver.slo.solve_slo``: the least-J table a(n) and max-wait guard whose predicted q-quantile of
response time is <= D), run in a worker process of the sidecar's own (``slo_search``: its simulation
loops would otherwise hold the GIL the request path needs) also when a solver service is configured
(the service has no SLO call), on the same triggers as any re-solve (a rate step or drift, a new
weight, a learned profile). Its guard travels with the policy (``Solution.max_wait_s``) to either
data plane. When no policy meets D the search returns greedy; the note, the log and the status say
so. An SLO and a mean latency target exclude each other: setting one clears the other.
The model does not see everything a request goes through, and a search that puts the predicted
q-quantile right at D then misses it. Two corrections keep the answers within D:

* what the sidecar cannot see (the client's own threads, its network hop to the sidecar) is the
  SLO's configured ``margin_s``: the search is for D - margin;
* what the sidecar sees but the model does not (its hop to Triton, merge and split, gRPC, batch
  times spread wider than the profile's) it measures, as feedback: the correction
  (``slo_offset_s``) is the q-quantile, over the answers of the rate window, of each one's latency
  minus the q-quantile predicted for the policy it was served under (``ExcessWindow``: pooled over
  the policies in the window, so a re-solve keeps the evidence), once there are
  ``SLO_TAIL_SAMPLES / (1 - q)`` answers (before that, from ``SLO_OFFSET_MIN_SAMPLES`` answers on,
  their mean excess over the predicted mean, which may only raise it). The next search is for
  D - margin - correction. Fed back this way the measured q-quantile settles at D - margin
  (the search's prediction is at D - margin - correction, and the answers run ``correction``
  above it); a measured attainment below q shows as a quantile above D - margin and raises the
  correction. It rises as soon as the new figure is 0.5% of D above it (at the mean: also beyond
  the noise of two means) and falls only when it is 2% of D and the noise of two quantiles below,
  so noise does not make it hunt; a change asks for a search at once. When the corrected bound
  leaves no feasible policy but D - margin does (the answers' excess is more than a tighter policy
  can take back: a stalled host, and greedy would only add load), the policy is searched for
  D - margin only, and the note says so.

A host stall (Triton paused or descheduled, a CPU hog) is not the policy's tail: it holds up every
request in flight at once, and no policy takes it back. A batch that ran past the time the profile
in force expects by more than a threshold (the largest of ``STALL_FRACTION`` of D - margin,
``STALL_RATIO`` of its expected time, and ``STALL_SDS`` standard deviations of it at the service
CV the search assumes) is taken as one: the part beyond the threshold goes into a ``StallLog``,
the batch is not learned as a service time, and the answers the stall touched (in flight during
it, or arriving in its wake, as long again after it) are left out of the correction
(``plugin.stalls``). The status shows the stalls of the window and what the correction would be
with those answers left in. Only with an SLO.

The spread of the batch times is also learned directly: when the profile is learned, the search's
service law is gamma with the CV measured at the sizes with ``profile_min_samples`` batches (their
median), instead of the profile's own (``slo_service_cv``).

Telemetry, off the hot path: every ``telemetry_interval_s`` a task reads Triton's statistics API
(``compute_infer`` per batch size, kept beside the gate's own figures) and Triton's Prometheus
metrics (``nv_energy_consumption`` / ``nv_gpu_power_usage``). When Triton reports a GPU the power is
measured; otherwise it is modelled from the profile (e(b) per batch executed + P0 idle) and every
report says so. The measured W and P are published to the metrics at the same pace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
from scipy.stats import t as t_dist

from solver import quantities
from solver.arrival_model import MMPP2, POISSON, ArrivalModel, CompoundPoisson, parse_arrivals
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import GateRule, InstanceTable, PolicyTable, greedy
from solver.slo import SloTarget
from solver.slo_bound import BestDelaySlo, DerivedBound

from ..arrival_estimator import GroupEstimator, ModulationEstimator
from ..latency_window import ExcessWindow, LatencyGap, LatencySummary, LatencyWindow
from ..placement import Placement
from ..stalls import StallLog
from .profile import ProfileDrift, ProfileLearner
from . import slo_search
from .rate import RateEstimator
from .telemetry import PowerReading, PowerSource, fetch_metrics, metrics_url_for

if TYPE_CHECKING:
    from solver.service import AsyncSolverClient

    from ..config import ModelPolicyConfig, SidecarConfig
    from ..metrics import SidecarMetrics

log = logging.getLogger("smdp.adaptive")

WEIGHT_SEARCH_MAX = 1.0
"""Upper end of the latency-target weight search, seconds per watt (far past any useful trade-off)."""

SLO_OFFSET_MIN_SAMPLES = 200
"""Answers under the policy in force before its measured-minus-predicted mean latency counts (module doc)."""
SLO_TAIL_SAMPLES = 5.0
"""Answers beyond the q-quantile (so SLO_TAIL_SAMPLES / (1 - q) answers) before the measured q-quantile
is compared with the predicted one (module doc)."""

STALL_FRACTION = 0.05
"""A batch running past its expected time by more than this share of D - margin is a host stall
beyond that point (module doc) ..."""
STALL_RATIO = 1.0
"""... and by more than this share of its expected time (a slowdown within it is the learner's) ..."""
STALL_SDS = 4.0
"""... and by more than this many standard deviations of its time at the search's service CV."""

WEIGHT_SCALE_MAX = 10.0
"""The long-run weight scale lambda_bar / lambda is kept within [1/10, 10]: further out (a near-silent
regime) the long-run mean says little about what the operator wants from it."""


class LongRunRate:
    """Exponentially weighted mean arrival rate over a horizon ``tau_s``: N(t) / T(t) with
    N(t) = sum_i exp(-(t - t_i) / tau) over arrivals and T(t) = tau (1 - exp(-(t - t0) / tau)),
    t0 the first arrival, so that it is the plain mean rate since t0 while t - t0 << tau. O(1)."""

    def __init__(self, tau_s: float) -> None:
        if not (math.isfinite(tau_s) and tau_s > 0):
            raise ValueError(f"long-run horizon must be a finite number > 0 seconds, got {tau_s!r}")
        self.tau_s = float(tau_s)
        self._first: float | None = None
        self._last = 0.0
        self._n = 0.0

    def observe(self, t: float) -> None:
        if self._first is None:
            self._first, self._last, self._n = t, t, 1.0
            return
        if t > self._last:
            self._n *= math.exp(-(t - self._last) / self.tau_s)
            self._last = t
        self._n += 1.0

    def rate(self, now: float, min_span_s: float = 0.0) -> float | None:
        """The mean rate at ``now``; None before ``min_span_s`` of history."""
        if self._first is None or now - self._first < max(min_span_s, 1e-9):
            return None
        n = self._n * math.exp(-max(now - self._last, 0.0) / self.tau_s)
        return n / self.span(now)

    def span(self, now: float) -> float:
        """T(t), seconds: the effective span the mean is over (0 before the first arrival)."""
        if self._first is None:
            return 0.0
        return self.tau_s * -math.expm1(-max(now - self._first, 0.0) / self.tau_s)


@dataclass
class Solution:
    """A policy and what the solver predicted for it."""

    policy: PolicyTable
    rate_rps: float
    weight: float
    mean_latency_s: float
    mean_power_w: float
    gain: float
    mean_batch: float
    source: str
    profile_source: str = ""
    """Which service profile the policy was solved with (the CSV prior, or what was learned)."""
    solved_weight: float | None = None
    """The w the SMDP was solved with: ``weight`` x long-run rate / rate (see the module doc); None: ``weight``."""
    max_wait_s: float | None = None
    """The policy's own max-wait guard (an SLO policy's), installed with it; None: none."""
    slo: "SloPrediction | None" = None
    """What the SLO search predicted, for a solve made for an SLO."""
    table: InstanceTable | None = None
    """With k > 1 instances: the k-instance table a(n, m) the gate runs (``policy`` is its row m = 0)."""
    arrivals: ArrivalModel = POISSON
    """The arrival model the policy was solved for (groups learned online, ``plugin.arrival_estimator``)."""
    converged: bool = True
    """The solver's verdict (see ``problem``)."""

    @property
    def problem(self) -> str | None:
        """Why this solution must not be installed (the solver did not converge, or its J is not a
        number, as when w x e(b) overflows), or None when it is usable. The overload fallback's
        infinite W and J are meant, and usable."""
        if not self.converged:
            return "the policy solve did not converge"
        if math.isnan(self.gain):
            return "the policy solve gave no number for J"
        return None

    @property
    def rule(self) -> PolicyTable | GateRule:
        """What the gate installs: the table, or the k-instance rule (m = batches in flight)."""
        return self.policy if self.table is None else GateRule.of(self.table)


@dataclass(frozen=True)
class SloPrediction:
    """The SLO search's verdict on the policy it chose (``solver.slo.SloResult``)."""

    quantile_s: float
    ci95_s: float
    feasible: bool


@dataclass(frozen=True)
class LearningConfig:
    """How a controller learns its service profile and reads Triton's telemetry (see the module doc)."""

    enabled: bool = True
    """Learn tau(b) from completed batches and re-solve when it drifts (False: the CSV profile stays)."""
    drift: float = 0.10
    """Relative change of a well-sampled tau(b) that asks for a new policy (0.10 = 10%)."""
    min_samples: int = 30
    """Batches of one size before that size's mean counts (below it everywhere: the prior stays)."""
    prior_weight: float = 20.0
    """The prior/base curve counts as this many batches in each size's blend."""
    check_interval_s: float = 1.0
    """Least time between two rebuilds of the learned profile, seconds."""
    telemetry_interval_s: float = 5.0
    """How often Triton's statistics and metrics are read and W, P published, seconds."""
    metrics_url: str | None = None
    """Triton's Prometheus endpoint (http://host:8002/metrics); None: power is always modelled."""
    triton_url: str | None = None
    """Triton's gRPC host:port for its statistics API; None: not read."""


@dataclass(frozen=True)
class ControllerConfig:
    """A controller's settings, fixed for its life: built once per model from its policy config and
    the sidecar's (``of``). What the operator changes while it runs (weight, latency target, SLO) goes
    through the controller's methods; ``weight`` is only the one it starts with."""

    max_batch: int
    """B: the largest batch the policy may serve."""
    idle_power_w: float = quantities.DEFAULT_IDLE_POWER_W
    """P0: power drawn while idle, watts."""
    weight: float = quantities.DEFAULT_WEIGHT
    """w of J = W + w P at start, seconds per watt."""
    initial_rate: float | None = None
    """A first rate to solve for, requests/s (None: the first solve waits for a measured rate)."""
    window_s: float = 10.0
    """The rate estimator's (and latency window's) span, seconds."""
    change_ratio: float = 1.5
    """The rate step the estimator's CUSUM detects (x1.5 up or down)."""
    min_arrivals: int = 30
    """Arrivals before a rate estimate counts."""
    arrival_lag_s: float = 0.0
    """How late the data plane reports arrivals, seconds (``RateEstimator.lag_s``): twice the native gate's
    report interval on the native plane, 0 on the Python plane (it sees each arrival as it comes)."""
    drift_tolerance: float = 0.15
    """A windowed rate this far (relative) from the solved one asks for a re-solve."""
    long_run_s: float = 600.0
    """Span of the long-run mean rate that scales the weight, seconds (0: w as is)."""
    instances: int = 1
    """k: model instances the gate fills at start (the registry updates it when Triton's config changes)."""
    devices: int | None = None
    """D: the devices the k instances draw idle power on (``plugin.placement``; None: one per instance)."""
    group_window_gaps: float = 0.0
    """Arrival-group window in mean gaps for the group estimator (0: Poisson arrivals)."""
    arrivals: ArrivalModel | None = None
    """A fitted arrival model to start from (``smdp fit-arrivals`` on past traffic): an MMPP seeds the
    modulation shape, groups the group law (``plugin.arrival_estimator``); None: learn from nothing."""
    learning: LearningConfig = LearningConfig(enabled=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        quantities.idle_power(self.idle_power_w, error=ValueError)
        quantities.weight(self.weight, error=ValueError)
        if not self.arrival_lag_s >= 0:
            raise ValueError(f"arrival_lag_s must be >= 0, got {self.arrival_lag_s}")
        if not self.window_s > 0 or self.long_run_s < 0 or not self.change_ratio > 1 or self.instances < 1:
            raise ValueError(f"invalid controller settings: window_s={self.window_s}, long_run_s={self.long_run_s}, "
                             f"change_ratio={self.change_ratio}, instances={self.instances}")
        if self.devices is not None and not 1 <= self.devices <= self.instances:
            raise ValueError(f"devices must be in 1..instances = {self.instances}, got {self.devices}")
        if self.arrivals is not None and not self.group_window_gaps > 0:
            raise ValueError("a given arrival model needs the arrival estimators (arrival_group_window > 0)")

    @classmethod
    def of(cls, policy: "ModelPolicyConfig", sidecar: "SidecarConfig", *, max_batch: int,
           instances: int, devices: int | None = None) -> "ControllerConfig":
        """A model's controller settings from its policy config and the sidecar's."""
        return cls(
            max_batch=max_batch,
            idle_power_w=policy.idle_power_w,
            weight=policy.weight,
            initial_rate=policy.rate_rps,
            window_s=sidecar.rate_window_s,
            arrival_lag_s=2 * sidecar.native_report_interval_s if sidecar.data_plane == "native" else 0.0,
            long_run_s=sidecar.long_run_window_s,
            instances=instances,
            devices=devices,
            group_window_gaps=sidecar.arrival_group_window,
            arrivals=parse_arrivals(policy.arrivals) if policy.arrivals else None,
            learning=LearningConfig(
                enabled=policy.learn_profile,
                drift=policy.profile_drift,
                min_samples=policy.profile_min_samples,
                prior_weight=policy.profile_prior_weight,
                telemetry_interval_s=sidecar.telemetry_interval_s,
                metrics_url=metrics_url_for(sidecar.triton_metrics_url, sidecar.triton_url),
                triton_url=sidecar.triton_url if sidecar.triton_statistics else None,
            ),
        )


@dataclass(frozen=True)
class Solved:
    """A solver's answer for one model: the policy, what it predicts, and where it came from."""

    policy: PolicyTable
    mean_latency_s: float
    mean_power_w: float
    gain: float
    mean_batch: float
    source: str
    """For the status note: "in-process solver", "solver service" or "solver service (cached)"."""
    converged: bool = True
    """The solver's own verdict; a solution that did not converge is never installed."""


class Solver(Protocol):
    """What solves a controller's model: in this process (``LocalSolver``) or a shared
    ``smdp solver-serve`` (``RemoteSolver``)."""

    remote: bool
    """True when it may be unreachable (the controller then retries at every tick)."""

    async def solve(self, model: BatchingModel, warm_start: PolicyTable | None) -> Solved: ...


class LocalSolver:
    """The SMDP solved in a worker thread of this process, so the event loop never blocks."""

    remote = False

    async def solve(self, model: BatchingModel, warm_start: PolicyTable | None) -> Solved:
        from solver.smdp import solve

        r = await asyncio.get_running_loop().run_in_executor(None, lambda: solve(model, warm_start=warm_start))
        return Solved(r.policy, r.mean_latency_s, r.mean_power_w, r.gain, r.mean_batch, "in-process solver",
                      r.converged)


class RemoteSolver:
    """A shared ``smdp solver-serve`` through its asyncio client; raises its ``SolverError``."""

    remote = True

    def __init__(self, client: "AsyncSolverClient") -> None:
        self.client = client

    async def solve(self, model: BatchingModel, warm_start: PolicyTable | None) -> Solved:
        r = await self.client.solve(model, warm_start=warm_start)
        return Solved(r.policy, r.mean_latency_s, r.mean_power_w, r.gain, r.mean_batch,
                      "solver service (cached)" if r.cached else "solver service", r.converged)


class GateStats(Protocol):
    """What the controller reads of its gate's running counters (plugin.registry.BatchStats)."""

    started_at: float
    batches: np.ndarray
    """batches[b]: batches of b rows completed."""
    busy_s: np.ndarray
    latency_sum_s: float
    latency_n: int


SOLVER_RETRY_FIRST_S = 0.25
"""After a failed solve (the solver away), the first retry waits this long, seconds ..."""
SOLVER_RETRY_MAX_S = 5.0
"""... doubling per failure up to this: a solver back is used within 5 s, and an absent one is asked
at most every 5 s, logged once when it goes and once when it comes back."""

NEAR_CAPACITY = 0.95
"""Rates at or above this fraction of capacity, short of a significant overload, are solved here."""


class PolicyController:
    """The adaptive policy of one model; all methods run on the sidecar's event loop."""

    def __init__(
        self,
        model: str,
        profile: ServiceProfile,
        config: ControllerConfig,
        *,
        install: Callable[[PolicyTable | GateRule], None],
        clock: Callable[[], float],
        solver: Solver | None = None,
        stats: GateStats | None = None,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.config = config
        max_batch, idle_power_w, window_s = config.max_batch, config.idle_power_w, config.window_s
        initial_rate, learning = config.initial_rate, config.learning
        self.model = model
        self.groups: GroupEstimator | None = (
            GroupEstimator(config.group_window_gaps) if config.group_window_gaps > 0 else None)
        """Learns how requests clump; single-instance, non-SLO solves use its model (None: Poisson)."""
        self.modulation: ModulationEstimator | None = (
            ModulationEstimator(config.group_window_gaps) if config.group_window_gaps > 0 else None)
        """Learns how the rate is modulated (an MMPP fitted now and then); the same solves use its
        shape at the estimated rate, phase-blind (``plugin.arrival_estimator``)."""
        self._fitting: asyncio.Future | None = None
        self._solved_shape = 0
        seed = config.arrivals
        if isinstance(seed, MMPP2) and self.modulation is not None:
            self.modulation.seed(seed)
        elif isinstance(seed, CompoundPoisson) and self.groups is not None:
            self.groups.prior = seed
        self.instances = config.instances
        """k: model instances the gate fills; k > 1 is solved as a(n, m) (``solver.instances``)."""
        self.devices = config.devices
        """D: the devices the k instances draw idle power on (None: one per instance)."""
        self.profile = profile.truncated(max_batch) if profile.max_batch != max_batch else profile
        self.prior = self.profile
        self._solving = self.profile
        self.max_batch = max_batch
        self.idle_power_w = idle_power_w
        self.weight = config.weight
        self.latency_target_s: float | None = None
        self.slo: SloTarget | None = None
        """The tail-latency SLO the policy is searched for (module doc); None: plain J = W + w P. With
        ``slo_rule`` it is the last bound derived (None before the first search)."""
        self.slo_rule: BestDelaySlo | None = None
        """An SLO whose D is derived from the model at every search (``solver.slo_bound``); None: D is stated."""
        self.slo_bound: DerivedBound | None = None
        """The bound ``slo_rule`` last derived (for status)."""
        self.slo_offset_s = 0.0
        """The measured correction the SLO search takes off D beside the margin (module doc)."""
        self._offset_checked_at = -math.inf
        self.latencies = LatencyWindow(window_s)
        self.excess = ExcessWindow(window_s)
        """Each answer's latency over its SLO policy's prediction, for the correction (module doc)."""
        self.stalls = StallLog(window_s)
        """Host stalls seen as batches running past their expected time, kept out of the correction."""
        self.slo_gap: LatencyGap | None = None
        """The last measured gap behind the correction (its stalls, its figure with them left in)."""
        self._stall_floor_s = math.inf
        self._stall_cv = 0.0
        self._install = install
        self._clock = clock
        self._solver: Solver = solver if solver is not None else LocalSolver()
        self.rate = RateEstimator(clock(), window_s=window_s, change_ratio=config.change_ratio,
                                  min_arrivals=config.min_arrivals, lag_s=config.arrival_lag_s)
        self.drift_tolerance = config.drift_tolerance
        self.refresh_s = 3.0 * window_s
        self.long_run: LongRunRate | None = LongRunRate(config.long_run_s) if config.long_run_s > 0 else None
        """The long-run mean rate that scales the weight (see the module doc); None: w as is."""
        self.current: Solution | None = None
        self._rate_lo = 0.0
        """Lower confidence bound of the rate the next solve is for (an overload must be significant)."""
        self.version = 0
        self.installed_at = clock()
        self.solver_reachable = not self._solver.remote
        self.note = ""
        self._solver_failures = 0
        """Solves in a row that failed (the solver away): the retries back off with it."""
        self._retry_at = -math.inf
        """No solve is tried before this clock time after a failure (SOLVER_RETRY_* backoff)."""
        self.solves = 0
        self._task: asyncio.Task | None = None
        self._dirty = initial_rate is not None
        self._initial_rate = initial_rate
        # -- learning and telemetry (see the module doc)
        self.learning = learning
        lc = self.learning
        self.learner: ProfileLearner | None = (
            ProfileLearner(self.prior, drift=lc.drift, min_samples=lc.min_samples, prior_weight=lc.prior_weight)
            if lc.enabled else None)
        self.power = PowerSource(self.prior, idle_power_w, max_age_s=max(30.0, 3 * lc.telemetry_interval_s))
        self.power.placement = Placement(self.instances, self.devices or self.instances, "controller")
        self.profile_version = 0
        """0 while the CSV prior is in force; +1 per learned profile adopted."""
        self.last_drift: ProfileDrift | None = None
        self.failed_batches = 0
        self.telemetry_note = ""
        self._stats = stats
        self._metrics = metrics
        self._failed_seen = 0
        self._checked_at = -math.inf
        self._checked_batches = 0
        self._telemetry_at = -math.inf
        self._telemetry: asyncio.Task | None = None
        self._window: tuple[float, float, int, Any, float] | None = None  # (t, latency sum, n, batches, busy)
        self.measured_window: tuple[float, PowerReading | None] | None = None

    @property
    def capacity(self) -> float:
        return self.instances * self.max_batch / float(self.profile.mean_s[self.max_batch - 1])

    def set_placement(self, instances: int, devices: int | None) -> None:
        """Triton's config changed the model's k instances or D devices: the next re-solve is for them."""
        if instances < 1 or (devices is not None and not 1 <= devices <= instances):
            raise ValueError(f"need instances >= 1 and devices in 1..instances, got {instances}, {devices}")
        self.instances, self.devices = instances, devices
        self.power.placement = Placement(instances, devices or instances, "controller")

    # -- inputs ------------------------------------------------------------------------------
    def observe_arrival(self, t: float) -> None:
        self.rate.observe(t)
        if self.groups is not None:
            self.groups.observe(t)
        if self.modulation is not None:
            self.modulation.observe(t)
        if self.long_run is not None:
            self.long_run.observe(t)

    def weight_scale(self, rate: float, now: float) -> float:
        """lambda_bar / lambda for a policy solved for ``rate`` (1 without a long-run mean yet)."""
        if self.long_run is None or not rate > 0:
            return 1.0
        mean = self.long_run.rate(now, min_span_s=self.rate.window_s)
        if mean is None or not mean > 0:
            return 1.0
        return min(max(mean / rate, 1.0 / WEIGHT_SCALE_MAX), WEIGHT_SCALE_MAX)

    def observe_batch(self, rows: int, seconds: float, failed_requests: int | None = None) -> None:
        """A batch of ``rows`` completed ``seconds`` after its dispatch: O(1), on the request path.

        ``failed_requests``: the gate's running count of failed requests; a batch after which it
        grew failed, and its time (an error or a timeout, not a service) is not learned. In released
        mode ``seconds`` is the time until the last of the batch's requests answered (Triton's batcher
        may have split them): still the time the gate's slot was held.
        """
        if failed_requests is not None and failed_requests != self._failed_seen:
            self._failed_seen = failed_requests
            self.failed_batches += 1
            return
        if math.isfinite(self._stall_floor_s) and 1 <= rows <= self.profile.max_batch:
            expected = float(self.profile.mean_s[rows - 1])
            now = self._clock()
            threshold = max(self._stall_floor_s, STALL_RATIO * expected, STALL_SDS * self._stall_cv * expected)
            if self.stalls.overrun(now - seconds + expected, now, threshold) > 0:
                return  # a stall, not a service time (module doc)
        if self.learner is not None:
            self.learner.observe(rows, seconds)

    def _stall_threshold(self) -> None:
        """The overrun beyond which a batch counts as a host stall (module doc); none without an SLO."""
        if self.slo is None:
            self._stall_floor_s = math.inf
            return
        self._stall_floor_s = STALL_FRACTION * (self.slo.latency_s - self.slo.margin_s)
        cv = self.slo_service_cv()
        self._stall_cv = cv if cv is not None else float(np.max(self.profile.cv))

    def learn(self, now: float) -> ProfileDrift | None:
        """Rebuild the learned profile if due; adopt it and mark the policy dirty on a significant drift.

        Plain code (no I/O, no event loop): called by ``tick`` and directly by tests.
        """
        ln = self.learner
        if ln is None or ln.batches == self._checked_batches or now - self._checked_at < self.learning.check_interval_s:
            return None
        self._checked_at = now
        self._checked_batches = ln.batches
        candidate = ln.profile()
        drift = ln.drift(self.profile, candidate)
        if drift is None:
            return None
        self.profile = candidate
        self.power.profile = candidate
        self.profile_version += 1
        self.last_drift = drift
        self._dirty = True
        log.info("%s: service profile v%d learned (%s): tau(%d) %.3f ms -> %.3f ms (%+.0f%%, %d batches); re-solving",
                 self.model, self.profile_version, candidate.source, drift.batch_size, drift.in_force_s * 1e3,
                 drift.learned_s * 1e3, 100 * drift.relative, drift.n)
        if self._metrics is not None:
            self._metrics.profile_learned(self.model, self.profile_version)
        return drift

    def power_reading(self, now: float, stats: GateStats | None = None) -> PowerReading | None:
        """Mean power since the gate started: measured when Triton reports a GPU, else modelled.

        stats: the gate's ``BatchStats`` (default: the one given at construction).
        """
        st = stats if stats is not None else self._stats
        if st is None or now <= st.started_at:
            return None
        return self.power.reading(now, elapsed_s=now - st.started_at, batch_counts=st.batches,
                                  busy_s=float(st.busy_s.sum()))

    def publish_measured(self, now: float) -> tuple[float, PowerReading | None] | None:
        """W and P over the window since the last call; sent to the metrics (``set_measured``)."""
        st = self._stats
        if st is None:
            return None
        prev, self._window = self._window, (now, st.latency_sum_s, st.latency_n, st.batches.copy(),
                                              float(st.busy_s.sum()))
        if prev is None:
            prev = (st.started_at, 0.0, 0, st.batches * 0, 0.0)
        t0, sum0, n0, batches0, busy0 = prev
        if now <= t0:
            return None
        dn = st.latency_n - n0
        w = (st.latency_sum_s - sum0) / dn if dn > 0 else math.nan
        try:
            p = self.power.reading(now, elapsed_s=now - t0, batch_counts=st.batches - batches0,
                                   busy_s=float(st.busy_s.sum()) - busy0)
        except ValueError:
            p = None
        self.measured_window = (w, p)
        if self._metrics is not None and p is not None:
            self._metrics.set_measured(self.model, w, p.power_w, p.modelled)
        slo = self.measured_slo(now)
        if self._metrics is not None and slo is not None:
            self._metrics.set_slo_measured(self.model, slo.quantile_s, slo.attainment)
        if self._metrics is not None and self.learner is not None:
            self._metrics.set_service_times(self.model, self.learner.sizes(self.profile))
        return self.measured_window

    def learning_summary(self, now: float) -> str:
        """One line for the status note: the profile in force, its evidence, where power comes from."""
        parts = []
        ln = self.learner
        if ln is not None:
            sizes = [s for s in ln.sizes(self.profile) if s.n]
            top = sorted(sizes, key=lambda s: -s.n)[:3]
            figs = ", ".join(
                f"tau({s.batch_size})={s.mean_s * 1e3:.2f}+-{s.ci_s * 1e3:.2f} ms n={s.n} (prior {s.prior_s * 1e3:.2f}"
                + (f", Triton compute {s.triton_compute_s * 1e3:.2f}" if s.triton_compute_s is not None else "") + ")"
                for s in sorted(top, key=lambda s: s.batch_size))
            where = f"learned v{self.profile_version}" if self.profile_version else "CSV prior"
            parts.append(f"service profile: {where} from {ln.batches} batches" + (f"; {figs}" if figs else ""))
        try:
            r = self.power_reading(now)
        except ValueError:
            r = None
        if r is not None:
            parts.append(f"power measured from Triton ({r.source})" if not r.modelled else
                         "power modelled from the profile (e(b) per batch + P0 idle): Triton reports no GPU power")
        if self.groups is not None:
            parts.append(self.clumping_summary())
        if self.telemetry_note:
            parts.append(self.telemetry_note)
        return "; ".join(parts)

    def clumping_summary(self) -> str:
        """What the group estimator has learned and what the policy in force was solved for."""
        g = self.groups
        if g is None:
            return "arrivals: assumed Poisson"
        est = g.mean_group()
        solved = self.current.arrivals.spec if self.current is not None else "nothing yet"
        if est is None:
            return f"arrivals: {g.groups} groups so far (learning), policy solved for {solved}"
        disp = g.index_of_dispersion()
        fitted = f", last fit {self.modulation.chosen}" if self.modulation is not None else ""
        return (f"arrivals: mean group {est[0]:.3f}+-{est[1]:.3f} over {g.groups} groups, index of dispersion "
                f"{disp:.3f}{fitted}; policy solved for {solved}")

    # -- telemetry (asyncio plumbing around the pure parts) ---------------------------------
    def _telemetry_due(self, now: float) -> None:
        lc = self.learning
        if now - self._telemetry_at < lc.telemetry_interval_s:
            return
        if self._telemetry is not None and not self._telemetry.done():
            return
        self._telemetry_at = now
        self.publish_measured(now)
        if lc.metrics_url is None and (lc.triton_url is None or self.learner is None):
            return
        self._telemetry = asyncio.get_running_loop().create_task(self._poll_telemetry())

    def _fit_due(self, now: float) -> None:
        """Refit the rate's modulation off the event loop when due (``ModulationEstimator``)."""
        mod = self.modulation
        if mod is None or self.instances > 1 or not mod.due(now):
            return
        if self._fitting is not None and not self._fitting.done():
            return
        self._fitting = asyncio.get_running_loop().run_in_executor(None, mod.refit, mod.snapshot(now))

    async def _poll_telemetry(self) -> None:
        lc = self.learning
        notes = []
        if lc.metrics_url is not None:
            try:
                text = await asyncio.get_running_loop().run_in_executor(None, fetch_metrics, lc.metrics_url, 2.0)
                self.power.observe_metrics(self._clock(), text)
            except Exception as exc:  # noqa: BLE001 - an absent endpoint means modelled power
                notes.append(f"Triton metrics unreadable ({type(exc).__name__})")
        if lc.triton_url is not None and self.learner is not None:
            try:
                self.learner.observe_triton(await triton_batch_stats(lc.triton_url, self.model))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"Triton statistics unreadable ({type(exc).__name__})")
        self.telemetry_note = "; ".join(notes)

    async def try_weight(self, weight: float) -> None:
        """Solve for ``weight`` at the rate of the policy in force before taking it: a weight whose solve
        does not converge (or overflows, as w = 1e308 does) is refused with ValueError, and the weight
        and policy in force stay. Before the first solve there is nothing to compare: it is taken."""
        weight = quantities.weight(weight, error=ValueError)
        if self.current is not None:
            self._solving = self.profile
            try:
                trial = await self._solve(self.current.rate_rps, weight)
            except Exception:  # noqa: BLE001 - the solver away says nothing of the weight: take it,
                trial = None  # and the loop solves for it once the solver is back
            if trial is not None and trial.problem is not None:
                raise ValueError(f"weight {weight:g} refused: {trial.problem}; weight {self.weight:g} and policy "
                                 f"v{self.version} stay in force")
        self.set_weight(weight)

    def set_weight(self, weight: float) -> None:
        weight = quantities.weight(weight)
        self.weight = weight
        self.latency_target_s = None
        self._dirty = True

    def set_latency_target(self, target_s: float | None) -> None:
        if target_s is not None and (not math.isfinite(target_s) or target_s <= 0):
            raise ValueError(f"latency target must be finite and > 0 seconds, got {target_s!r}")
        self.latency_target_s = target_s
        if target_s is not None:
            self.slo = None
        self._dirty = True

    def set_slo(self, target: SloTarget | BestDelaySlo | None) -> None:
        """Serve the least-J policy meeting ``target`` from the next solve on (None: drop the SLO); a
        ``BestDelaySlo`` derives D from the model at every search (``solver.slo_bound``)."""
        if target is not None and not isinstance(target, (SloTarget, BestDelaySlo)):
            raise ValueError(f"SLO must be an SloTarget or a BestDelaySlo, got {type(target).__name__}")
        self.slo_rule = target if isinstance(target, BestDelaySlo) else None
        self.slo_bound = None
        self.slo = target if isinstance(target, SloTarget) else None
        self.slo_offset_s = 0.0
        self.excess.clear()
        self.stalls.clear()
        self.slo_gap = None
        self._stall_threshold()
        if target is not None:
            self.latency_target_s = None
            slo_search.prestart()
        elif self._metrics is not None:
            self._metrics.clear_slo(self.model)
        self._dirty = True

    def observe_latency(self, now: float, latency_s: float) -> None:
        """One answered request's arrival-to-answer time (for the measured quantile and attainment,
        and against the SLO policy's prediction, for the correction)."""
        self.latencies.add(now, latency_s)
        sol = self.current
        if sol is not None and sol.slo is not None and self.slo is not None:
            self.excess.add(now, latency_s, sol.slo.quantile_s, sol.mean_latency_s)

    def measured_slo(self, now: float) -> LatencySummary | None:
        """The SLO's quantile and attainment over the rate estimator's window; None without an SLO or answers."""
        if self.slo is None:
            return None
        return self.latencies.summary(now, self.slo.quantile, self.slo.latency_s)

    # -- the loop ----------------------------------------------------------------------------
    def due(self, now: float) -> tuple[float, bool] | None:
        """The rate to solve for now and whether that solve rebases the change detector on it, or
        None when the policy in force still fits.

        Only a solve for the estimator's own reading of the rate rebases it. A solve asked for
        something else (a new weight or latency target, a learned profile) while a rate step is
        under way must not wipe the CUSUM's evidence, or its alarm when the new regime has not shown
        enough arrivals yet: that would leave the step unnoticed until the detector found it again
        from scratch.
        """
        if self._task is not None and not self._task.done():
            return None
        if now < self._retry_at:  # the solver was away: back off instead of asking every tick
            return None
        rate = self.rate
        if rate.ready(now):
            # Steps (up, down, or silence) are the CUSUM's job: when it fires, the estimate restarts
            # at the change point, so the new policy is solved for the new rate, not a blend.
            est = rate.estimate(now)
            self._rate_lo = est.lo
            moved = rate.changed(now) or not self.solver_reachable
            if self._dirty or moved:
                return est.rate, moved or rate.reference is None
            # Slow drifts smaller than the detector's ratio: a periodic look, long enough after the
            # last solve that it never races the detector after a step.
            ref = self.current.rate_rps if self.current is not None else None
            if (
                ref is not None
                and now - self.installed_at >= self.refresh_s
                and abs(est.rate - ref) > self.drift_tolerance * ref
                and not est.contains(ref)
            ):
                return est.rate, True
            if ref is not None and now - self.installed_at >= self.refresh_s and self._clumping_moved():
                return est.rate, True
            return None
        if rate.reference is not None and rate.changed(now) and rate.alarm == "down":  # (a silence counts)
            # A drop, not yet settled. The settling wait guards against solving for an overstated
            # rise; after a drop it would keep a policy that waits for the old rate's batches while
            # requests trickle in (each held up to the max-wait guard) for as long as the new regime
            # takes to show ``settle_arrivals`` arrivals: seconds to minutes at a low rate. Solve at
            # once for the upper bound of the new regime's rate instead: a drop no deeper than the
            # evidence shows, and still far less waiting than the old rate's policy. Later evidence
            # moves it further (the detector is rebased on that bound).
            est = rate.estimate(now)
            # (in a silence there is nobody to serve: the first arrival after it asks for the solve)
            if est.n >= 1 and est.hi < rate.reference / rate.change_ratio:
                self._rate_lo = est.lo
                return est.hi, True
        if self._dirty and (self.current is not None or self._initial_rate is not None):
            rate_rps = self.current.rate_rps if self.current is not None else self._initial_rate
            self._rate_lo = rate_rps  # a configured or already-solved rate: taken as exact
            # the first reference, when there is none; otherwise the detector keeps what it has seen
            return rate_rps, rate.reference is None
        return None

    def slo_service_cv(self) -> float | None:
        """The batch-time CV the SLO search assumes: the median over the sizes with enough batches of
        their measured CV (from the learner's t interval of the mean); None without such sizes."""
        if self.learner is None:
            return None
        cvs = []
        for e in self.learner.sizes(self.profile):
            if e.n >= max(self.learning.min_samples, 2) and math.isfinite(e.ci_s) and e.mean_s > 0:
                sd = e.ci_s * math.sqrt(e.n) / float(t_dist.ppf(0.975, e.n - 1))
                cvs.append(sd / e.mean_s)
        return float(np.median(cvs)) if cvs else None

    def check_slo_offset(self, now: float) -> bool:
        """Update the SLO's measured correction (module doc); True when it asks for a solve."""
        sol = self.current
        if self.slo is None or sol is None or sol.slo is None or not math.isfinite(sol.mean_latency_s):
            return False
        if now - self._offset_checked_at < 1.0:  # an O(window) look: once a second is plenty
            return False
        self._offset_checked_at = now
        self._stall_threshold()
        gap = self.excess.gap(now, self.slo.quantile, min_samples=SLO_OFFSET_MIN_SAMPLES,
                              tail_samples=SLO_TAIL_SAMPLES, stalls=self.stalls)
        self.slo_gap = gap
        if gap is None:
            return False
        old, new, d = self.slo_offset_s, max(0.0, gap.excess_s), self.slo.latency_s
        if not gap.at_quantile:  # the mean's excess is an early lower bound: it may only raise it
            new = max(new, old)
        # up on any clear rise (at the mean, beyond its noise); down only past the quantile's own noise
        # (sqrt 2: the figure in force was measured too, with about the same noise)
        noise = math.sqrt(2.0) * gap.ci95_s
        rise = 0.005 * d if gap.at_quantile else max(0.005 * d, noise)
        if new - old > rise or old - new > max(0.02 * d, noise):
            self.slo_offset_s = new
            if self.slo_rule is not None and self.slo_bound is not None:
                # a derived D carries the correction (``_solve_derived_slo``): D moves, the searched
                # budget (the delay's predicted quantile) does not, so there is nothing to solve again
                self.slo = self.slo_bound.target(new)
                return False
            self._dirty = True
            return True
        return False

    def tick(self, now: float) -> asyncio.Task | None:
        """Learn, read telemetry when due, and start a re-solve if one is due; returns its task."""
        self.learn(now)
        self._telemetry_due(now)
        self._fit_due(now)
        if self._task is None or self._task.done():
            self.check_slo_offset(now)
        due = self.due(now)
        if due is None:
            return None
        rate, rebase = due
        if self._shape_applies():
            level = self.modulated_level(now)
            if not self._dirty and self._shape_holds(level, now):
                if rebase:  # the swing is the modulation solved for: the detector follows it, no solve
                    self.rate.reset(now, rate)
                return None
            if level is not None:
                rate = level
        self._dirty = False
        self._task = asyncio.get_running_loop().create_task(self._resolve(rate, now, rebase=rebase))
        return self._task

    async def _resolve(self, rate: float, asked_at: float, *, rebase: bool = True) -> None:
        self._solving = self.profile  # one profile for every solve of this re-solve
        try:
            solution = await self._solution_for(rate)
        except Exception as exc:  # the solver failed: keep the policy in force
            self.solver_reachable = False
            self._dirty = True
            self.note = f"solver unavailable, keeping policy v{self.version}: {exc}"
            self._solver_failures += 1
            delay = min(SOLVER_RETRY_MAX_S, SOLVER_RETRY_FIRST_S * 2 ** (self._solver_failures - 1))
            self._retry_at = self._clock() + delay
            if self._solver_failures == 1:  # a change of state is logged, not every attempt
                log.warning("%s: %s (retrying with backoff up to %g s)", self.model, self.note, SOLVER_RETRY_MAX_S)
            else:
                log.debug("%s: solve attempt %d failed, next in %.2f s: %s", self.model, self._solver_failures,
                          delay, exc)
            return
        if self._solver_failures:
            log.warning("%s: solver reachable again after %d failed attempt(s)", self.model, self._solver_failures)
        self._solver_failures = 0
        self._retry_at = -math.inf
        self.solver_reachable = True
        if solution.problem is not None:  # keep the last good policy; a nonsense table is never installed
            self.note = f"{solution.problem} for w = {solution.weight:g}; keeping policy v{self.version}"
            log.warning("%s: %s", self.model, self.note)
            return
        self._adopt(solution, rebase=rebase)

    def _adopt(self, solution: Solution, *, rebase: bool) -> None:
        """Install a solved policy (``_resolve``; also the plain table a long phase-blind search
        starts from, while nothing else is in force: ``_solve``)."""
        self.solves += 1
        self.current = solution
        self.version += 1
        self.installed_at = self._clock()
        self._install(solution.rule)  # atomic: one assignment between two decisions
        if self._metrics is not None and solution.slo is not None and self.slo is not None:
            self._metrics.set_slo(self.model, self.slo.quantile, self.slo.latency_s, solution.slo.quantile_s,
                                  solution.slo.feasible)
        if rebase:  # see ``due``: only a solve for the measured rate moves the detector's reference
            self.rate.reset(self._clock(), solution.rate_rps)
        if not self.note.startswith(("overload", "latency target", "estimated rate", "SLO")):
            self.note = ""
        solved = solution.solved_weight if solution.solved_weight is not None else solution.weight
        log.info(
            "%s: policy v%d for %.1f req/s (%s), w=%.3g solved as %.3g (%s): threshold %s, predicted W %.3f ms, P %.1f W",
            self.model, self.version, solution.rate_rps, solution.arrivals.spec, solution.weight, solved,
            solution.source + ", " + solution.profile_source,
            solution.policy.threshold(), solution.mean_latency_s * 1e3, solution.mean_power_w,
        )

    async def _solution_for(self, rate: float) -> Solution:
        self.note = ""
        capacity = self.instances * self.max_batch / float(self._solving.mean_s[self.max_batch - 1])
        if rate >= capacity and self._rate_lo >= capacity:
            # No stationary policy exists; serve full batches, the bounded queue sheds the excess.
            self.note = (f"overload: estimated rate {rate:.1f}/s >= capacity {capacity:.1f}/s; "
                         "serving full batches, excess is refused with RESOURCE_EXHAUSTED")
            return Solution(greedy(self.max_batch), rate, self.weight, math.inf, math.nan, math.inf, self.max_batch,
                            "overload fallback", self._profile_source())
        if rate >= NEAR_CAPACITY * capacity:
            # At or past capacity but not significantly so (the interval reaches below it): a noisy
            # estimate near the limit, not an overload. Solve just below capacity, where the SMDP
            # still has a policy (and it serves nearly full batches there anyway).
            self.note = (f"estimated rate {rate:.1f}/s is within its confidence interval of capacity "
                         f"{capacity:.1f}/s: solved for {NEAR_CAPACITY * capacity:.1f}/s")
            rate = NEAR_CAPACITY * capacity
        if self.slo_rule is not None and self.instances > 1:
            self.note = (f"SLO bound best_delay derives D for one model instance, not {self.instances}: "
                         "solving for J (state the SLO's latency to search it with k instances)")
            return await self._solve(rate, self.weight)
        if self.slo is not None and self.instances > 1:
            return await self._solve_slo_instances(rate, self.slo)
        if self.slo is not None or self.slo_rule is not None:
            return await self._solve_slo(rate, self.slo)
        if self.latency_target_s is None:
            return await self._solve(rate, self.weight)
        return await self._search_weight(rate, self.latency_target_s)

    async def _solve_slo(self, rate: float, target: SloTarget | None) -> Solution:
        """The SLO search at this rate (module doc); greedy, flagged, when no policy meets D. With
        ``slo_rule`` D is derived first, under the same model (``_solve_derived_slo``)."""
        solved_weight = self.weight * self.weight_scale(rate, self._clock())
        profile = self._solving
        cv = self.slo_service_cv()
        if cv is not None and cv > 0:  # the measured spread of batch times widens the predicted tail
            profile = dataclasses.replace(profile, cv=np.full(profile.max_batch, cv), samples=None)
        # the search simulates the learned clumping too, and a modulation shape in force: its slow
        # phases' waits for a batch to fill are what the tail is made of (docs/notes/issue-17.md)
        shape = self.modulation.model_for(rate) if self._shape_applies() and self.modulation is not None else None
        arrivals = shape if shape is not None else self.arrival_model()
        model = BatchingModel(rate=rate if shape is None else shape.mean_rate, max_batch=self.max_batch,
                              profile=profile, idle_power_w=self.idle_power_w, weight=solved_weight, arrivals=arrivals)
        self._solved_shape = self.modulation.version if self.modulation is not None else 0
        if self.slo_rule is not None:
            return await self._solve_derived_slo(rate, model, self.slo_rule, arrivals)
        if target is None:  # ``_solution_for`` routes here with a stated SLO or a rule
            raise ModelError("an SLO search needs a stated SLO or a derived bound")
        offset = self.slo_offset_s
        # margin and measured correction both come off D (module doc); a correction that eats the
        # whole budget leaves a sliver, which no policy meets: greedy, flagged
        searched = SloTarget(target.quantile, target.latency_s,
                             min(target.margin_s + offset, target.latency_s * (1.0 - 1e-6)))
        res = await slo_search.search(model, searched)  # in a worker process: off the sidecar's GIL
        given_up = ""
        if not res.feasible and offset > 0:
            # The correction leaves no policy: the answers' excess is more than a tighter policy can
            # take back (a stalled host, say), and greedy would only add load. Serve what meets
            # D - margin by the model instead; the correction keeps being measured.
            plain = await slo_search.search(model, target)
            if plain.feasible:
                res = plain
                given_up = (f"SLO: no policy meets D - margin - {offset * 1e3:.2f} ms measured correction at "
                            f"{rate:.1f}/s; searched for D - margin only")
                log.warning("%s: %s", self.model, given_up)
        c = res.chosen
        if given_up:
            self.note = given_up
        elif not res.feasible:
            self.note = (f"SLO q{target.quantile:g} <= {target.latency_s * 1e3:g} ms is infeasible at {rate:.1f}/s: "
                         f"serving greedy, predicted q{target.quantile:g} {c.estimate.quantile_s * 1e3:.3f} ms")
            log.warning("%s: %s", self.model, self.note)
        if offset > 0 and not given_up:  # (the note starts with "SLO" either way, so the install keeps it)
            extra = (f"SLO searched for D - {target.margin_s * 1e3:.2f} ms margin - {offset * 1e3:.2f} ms: "
                     "answers ran that much above the model's prediction")
            self.note = f"{self.note}; {extra}" if self.note else extra
        return Solution(c.policy, rate, self.weight, c.mean_latency_s, c.mean_power_w,
                        c.mean_latency_s + self.weight * c.mean_power_w, c.mean_batch,
                        "in-process SLO search", self._profile_source(), solved_weight, c.max_wait_s,
                        SloPrediction(c.estimate.quantile_s, c.estimate.ci95_s, res.feasible), arrivals=arrivals)

    async def _solve_derived_slo(self, rate: float, model: BatchingModel, rule: BestDelaySlo,
                                 arrivals: ArrivalModel) -> Solution:
        """D derived from ``model`` (the least-J Triton delay's predicted quantile, ``solver.slo_bound``),
        the SLO searched for it, and the delay itself served where the search's pick misses it or costs more
        J. The measured correction is added to D rather than taken off the search: a delay's answers would
        run above its prediction by as much (the solver module's doc)."""
        both = await slo_search.search_best_delay(model, rule, self.slo_offset_s)
        self.slo_bound = both.bound
        self.slo = both.result.target
        self._stall_threshold()
        c = both.result.chosen
        self.note = f"SLO D derived: {both.bound.describe()}"
        if both.delay_served:
            why = ("no searched policy meets it" if not both.search.feasible else
                   f"the search's pick has J {both.search.chosen.cost * 1e3:.2f} ms, above the delay's")
            self.note += f"; serving the delay itself ({why})"
            if not both.result.feasible:
                self.note += (f", predicted q{rule.quantile:g} {c.estimate.quantile_s * 1e3:.2f} ms above D less the "
                              f"margin ({both.result.target.budget_s * 1e3:.2f} ms): INFEASIBLE by the hop")
        log.info("%s: %s", self.model, self.note)
        return Solution(c.policy, rate, self.weight, c.mean_latency_s, c.mean_power_w,
                        c.mean_latency_s + self.weight * c.mean_power_w, c.mean_batch,
                        "in-process SLO search, D derived (best delay)", self._profile_source(),
                        model.weight, c.max_wait_s,
                        SloPrediction(c.estimate.quantile_s, c.estimate.ci95_s, both.result.feasible),
                        arrivals=arrivals)

    async def _solve_slo_instances(self, rate: float, target: SloTarget) -> Solution:
        """k > 1 instances: the k-instance SLO search (``solver.instances_slo``: control limits per m,
        optionally guarded) for D less the margin and the measured correction; greedy, flagged, when
        nothing in the family meets it."""
        from solver.instances_slo import solve_slo_instances

        solved_weight = self.weight * self.weight_scale(rate, self._clock())
        model = BatchingModel(rate=rate, max_batch=self.max_batch, profile=self._solving,
                              idle_power_w=self.idle_power_w, weight=solved_weight, instances=self.instances,
                              devices=self.devices)
        searched = SloTarget(target.quantile, target.latency_s,
                             min(target.margin_s + self.slo_offset_s, target.latency_s * (1.0 - 1e-6)))
        res = await asyncio.get_running_loop().run_in_executor(None, lambda: solve_slo_instances(model, searched))
        c = res.chosen
        if not res.feasible:
            self.note = (f"SLO q{target.quantile:g} <= {target.latency_s * 1e3:g} ms is infeasible at {rate:.1f}/s "
                         f"with {self.instances} instances: serving greedy, predicted q{target.quantile:g} "
                         f"{c.estimate.quantile_s * 1e3:.3f} ms")
            log.warning("%s: %s", self.model, self.note)
        table = c.table
        return Solution(table.row(0), rate, self.weight, c.mean_latency_s, c.mean_power_w,
                        c.mean_latency_s + self.weight * c.mean_power_w, c.mean_batch,
                        f"in-process k-instance SLO search (k = {self.instances})", self._profile_source(),
                        solved_weight, c.max_wait_s, SloPrediction(c.estimate.quantile_s, c.estimate.ci95_s, res.feasible),
                        table=table)

    async def _search_weight(self, rate: float, target_s: float) -> Solution:
        """The largest w whose predicted W meets the target: least power subject to the target.

        Predicted W grows with w (more waiting buys less power), so bisect on log w.
        """
        best = await self._solve(rate, 0.0, long_run=False)
        if best.mean_latency_s > target_s:
            self.note = (f"latency target {target_s * 1e3:.3f} ms is below the least achievable "
                         f"{best.mean_latency_s * 1e3:.3f} ms at {rate:.1f}/s; serving for least latency")
            return best
        top = await self._solve(rate, WEIGHT_SEARCH_MAX, long_run=False)
        if top.mean_latency_s <= target_s:
            self.weight = WEIGHT_SEARCH_MAX
            return top
        lo, hi = -9.0, math.log10(WEIGHT_SEARCH_MAX)
        for _ in range(14):
            mid = (lo + hi) / 2
            sol = await self._solve(rate, 10**mid, long_run=False)
            if sol.mean_latency_s <= target_s:
                lo, best = mid, sol
            else:
                hi = mid
        self.weight = best.weight
        return best

    def arrival_model(self) -> ArrivalModel:
        """What the next solve assumes about clumping: the learned groups, or Poisson."""
        if self.groups is None or self.instances > 1:
            return POISSON
        return self.groups.model()

    def _shape_applies(self) -> bool:
        """A modulation shape applies to the next solve: J solves and SLO searches (not a latency target's
        weight search), one instance, with the long-run mean to scale it to. The SLO search takes the
        shape's MMPP as its arrivals (``solver.slo.solve_slo``: Poisson-solved tables, each candidate and
        its guard judged on a path of the MMPP)."""
        return (self.modulation is not None and self.modulation.shape is not None and self.instances == 1
                and self.latency_target_s is None and self.long_run is not None)

    def modulated_level(self, now: float) -> float | None:
        """The rate to scale the modulation shape to: the long-run mean rate (the shape's phases are
        the swings of the windowed rate; solving for each swing too would count them twice). None
        before the long-run mean spans a rate window."""
        if self.long_run is None:
            return None
        mean = self.long_run.rate(now, min_span_s=self.rate.window_s)
        return mean if mean is not None and mean > 0 else None

    def _shape_holds(self, level: float | None, now: float) -> bool:
        """The policy in force was solved for the current shape at a level that the long-run mean has
        not left: by more than the drift tolerance *and* more than the mean's own 95% noise under that
        shape (a count over T has variance ID(T) x mean: a bursty shape's mean over a minute moves by
        tens of percent, and solving for each such move would chase the bursts again). Without a
        long-run mean yet (level None) there is no evidence that it moved."""
        sol = self.current
        if not (sol is not None and isinstance(sol.arrivals, MMPP2) and self.modulation is not None
                and self.modulation.version == self._solved_shape and self.long_run is not None):
            return False
        if level is None:
            return True
        span = self.long_run.span(now)
        noise = 1.96 * math.sqrt(sol.arrivals.index_of_dispersion(span) * level / span) if span > 0 else math.inf
        return abs(level - sol.rate_rps) <= max(self.drift_tolerance * sol.rate_rps, noise)

    def _clumping_moved(self) -> bool:
        """The learned mean group size moved by more than the drift tolerance from the one in force."""
        if self.groups is None or self.current is None or self.instances > 1:
            return False
        if self.modulation is not None and self.modulation.version != self._solved_shape:
            return True  # a new fit of the rate's modulation (or the end of one)
        if isinstance(self.current.arrivals, MMPP2):
            return False  # the shape in force carries its own groups
        old = self.current.arrivals.group_mean
        new = self.arrival_model().group_mean
        return abs(new - old) > self.drift_tolerance * old

    def _profile_source(self) -> str:
        return f"learned profile v{self.profile_version}" if self.profile_version else "CSV profile"

    async def _solve(self, rate: float, weight: float, *, long_run: bool = True) -> Solution:
        """``long_run``: solve with w x long-run rate / rate (the module doc); the latency-target
        search passes False, since it searches w for a target on this regime's W itself."""
        profile = self._solving
        solved_weight = weight * self.weight_scale(rate, self._clock()) if long_run else weight
        if self.instances > 1:
            from solver.instances import solve_instances

            k_model = BatchingModel(rate=rate, max_batch=self.max_batch, profile=profile,
                                    idle_power_w=self.idle_power_w, weight=solved_weight, instances=self.instances,
                                    devices=self.devices)
            k = await asyncio.get_running_loop().run_in_executor(None, lambda: solve_instances(k_model))
            return Solution(k.policy.row(0), rate, weight, k.mean_latency_s, k.mean_power_w, k.gain, k.mean_batch,
                            f"in-process k-instance search (k = {self.instances})", self._profile_source(),
                            solved_weight, table=k.policy)
        arrivals = self.arrival_model()
        model = BatchingModel(rate=rate, max_batch=self.max_batch, profile=profile,
                              idle_power_w=self.idle_power_w, weight=solved_weight, arrivals=arrivals)
        warm = self.current.policy if self.current is not None else None
        shape_version = self.modulation.version if self.modulation is not None else 0
        shape = self.modulation.model_for(rate) if self.modulation is not None else None
        r = await self._solver.solve(model, warm)
        self._solved_shape = shape_version
        if shape is not None and r.converged:
            from solver.mmpp import solve_mmpp_blind

            mm = model.with_(rate=shape.mean_rate, arrivals=shape)
            interim = Solution(r.policy, rate, weight, r.mean_latency_s, r.mean_power_w, r.gain, r.mean_batch,
                               r.source + " (serving while the phase-blind search runs)", self._profile_source(),
                               solved_weight, arrivals=arrivals, converged=r.converged)
            if self.current is None and interim.problem is None:
                # the search takes seconds to a minute (three phases, B = 128): the gate is greedy until
                # the first policy, so the plain table serves meanwhile
                self._adopt(interim, rebase=False)
            try:
                b = await asyncio.get_running_loop().run_in_executor(None, solve_mmpp_blind, mm, r.policy)
            except (ModelError, ArithmeticError) as exc:
                log.warning("%s: phase-blind solve under %s failed (%s); keeping the %s solve", self.model,
                            shape.spec, exc, arrivals.spec)
            else:
                return Solution(b.policy, rate, weight, b.mean_latency_s, b.mean_power_w, b.gain,
                                b.evaluation.mean_batch, r.source + ", then the phase-blind search under the fitted MMPP",
                                self._profile_source(), solved_weight, arrivals=shape, converged=True)
        return Solution(r.policy, rate, weight, r.mean_latency_s, r.mean_power_w, r.gain, r.mean_batch, r.source,
                        self._profile_source(), solved_weight, arrivals=arrivals, converged=r.converged)

    async def wait_idle(self) -> None:
        tasks = [t for t in (self._task, self._telemetry, self._fitting) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def triton_batch_stats(triton_url: str, model: str, timeout_s: float = 2.0) -> list[tuple[int, int, int]]:
    """Triton's ``ModelStatistics`` for ``model``: (batch_size, compute_infer count, ns) per size, all versions."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    async with grpc.aio.insecure_channel(triton_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        resp = await stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model), timeout=timeout_s)
    acc: dict[int, list[int]] = {}
    for ms in resp.model_stats:
        if ms.name != model:
            continue
        for bs in ms.batch_stats:
            a = acc.setdefault(int(bs.batch_size), [0, 0])
            a[0] += int(bs.compute_infer.count)
            a[1] += int(bs.compute_infer.ns)
    return [(b, c, ns) for b, (c, ns) in sorted(acc.items())]
