"""Who competes in a bench, and what the solver predicts each will do.

A contender is Triton's own dynamic batcher at some ``max_queue_delay_microseconds``
(``triton:DELAY_US``), the sidecar gate with a policy (``gate:greedy``, ``gate:smdp``,
``gate:smdp-adaptive``, ``gate:static:8``, ``gate:threshold:4``, ``gate:timeout:0.01``), or config
mode (``config:smdp``, ``config:smdp-adaptive`` following the load): the SMDP policy compiled into Triton's own ``dynamic_batching``
(``preferred_batch_size`` + ``max_queue_delay_microseconds``, see ``plugin.config_mode.compiler``) and applied
by reloading the model, with clients talking to Triton directly. Predictions use the same scaled
profile the emulated server runs: exact evaluation for queue-length tables (greedy, static,
threshold, smdp) and the discrete-event simulator on the very arrival sequence of the run for
rules with a delay (Triton's batcher with a delay, the compiled config-mode rule), which have no
exact SMDP evaluation. Triton's batcher, at one instance or k, with or without config mode's preferred
sizes, is simulated as it runs the bench's model (no prefetching: the race at a completion,
``solver.policy.TritonBatcher`` / ``TritonInstances``), averaged over ``TRITON_DRAWS`` draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from solver.model import BatchingModel
from solver.policy import TRITON_CATCH_SHARE, TimeoutRule, parse_rule_spec

__all__ = ["Contender", "Prediction", "compile_config", "config_prediction", "ma_delay", "parse_contender", "predict",
           "triton_prediction"]

CONFIG_POLICIES = ("smdp",)
CONFIG_SIM_REQUESTS = 20_000
"""Simulated requests per delay tried when compiling config mode (about 0.5 s at bench sizes)."""


@dataclass(frozen=True)
class Contender:
    """One way of batching: Triton's batcher (``kind="triton"``), the gate with ``policy``
    (``kind="gate"``) or the SMDP policy compiled into Triton's batcher (``kind="config"``)."""

    kind: str
    policy: str = ""
    """Gate policy spec (greedy | smdp | static:B0 | threshold:K | timeout:S); config mode: smdp.
    Empty: greedy for the gate, smdp for config mode."""
    max_queue_delay_us: int = 0
    """Triton's max_queue_delay_microseconds (for the gate it stays 0: the gate decides)."""
    adaptive: bool = False
    """Gate smdp: re-solve for the measured arrival rate while running (else: fixed policy). Config
    mode: ``smdp config-mode --follow`` runs beside Triton and re-compiles and reloads the model
    when the rate it reads from Triton's statistics moves (``plugin.config_mode.follow``)."""
    long_run: bool = True
    """Adaptive gate: solve each regime with w x long-run rate / rate (plugin/loop/controller.py); False: with
    w as is (``gate:smdp-adaptive-unscaled``, to measure what the scaling is worth)."""
    slo: bool = False
    """Gate serving the bench's SLO: the least-J policy and max-wait guard predicted to meet it
    (``solver.slo``), adaptive (``gate:smdp-slo``: re-solved as the rate moves, with the correction
    it measures) or fixed (``gate:smdp-slo-fixed``: searched once for the bench's rate)."""
    max_wait_us: int | None = None
    """Gate: the sidecar's max-wait guard (``max_wait_s``: serve what is queued once the oldest request
    has waited this long), microseconds (``gate:smdp-guard:US``, ``gate:smdp-adaptive-guard:US``);
    None: the sidecar's default."""
    hold_us: int | None = None
    """Gate: the hold for the rest of a group (``group_hold_s``), microseconds, as a ``-hold:US`` suffix on any
    gate contender (``gate:smdp-slo-derived-seeded-hold:0`` turns it off); None: the sidecar's default."""
    seeded: bool = False
    """Adaptive gate started from the arrival model fitted to the replayed trace (``smdp serve --arrivals``,
    as ``smdp fit-arrivals`` gives it): ``gate:smdp-adaptive-seeded[-guard:US]``; with the SLO
    (``gate:smdp-slo-seeded``) the SLO search simulates that model."""
    derived: bool = False
    """SLO gate whose D is derived from the model (``smdp serve --slo-bound best_delay``: the least-J Triton
    delay's predicted quantile, ``solver.slo_bound``) instead of the bench's --slo-latency, which is then
    only the yardstick of the attainment column: ``gate:smdp-slo-derived[-seeded]``."""
    model_analyzer: bool = False
    """Triton's batcher at the delay a Model-Analyzer-style search picks for the bench's SLO
    (``triton:ma``): ``ma_delay`` sweeps the delays at the run's rate, least power with the q-quantile <= D."""

    def __post_init__(self) -> None:
        if self.kind not in ("triton", "gate", "config"):
            raise ValueError(f"contender kind must be 'triton', 'gate' or 'config', got {self.kind!r}")
        if not self.policy:
            object.__setattr__(self, "policy", "smdp" if self.kind == "config" else "greedy")
        if self.kind == "gate":
            parse_rule_spec(self.policy)
        if self.kind == "config" and self.policy not in CONFIG_POLICIES:
            raise ValueError(f"config mode compiles the SMDP policy: use config:smdp, got {self.policy!r}")
        if self.adaptive and not (self.kind in ("gate", "config") and self.policy == "smdp"):
            raise ValueError("only the smdp policy (gate or config mode) can be adaptive")
        if not self.long_run and not (self.kind == "gate" and self.adaptive):
            raise ValueError("only the adaptive gate solves per regime: long_run=False needs gate smdp adaptive")
        if self.slo and not (self.kind == "gate" and self.policy == "smdp"):
            raise ValueError("only the smdp gate serves an SLO (gate:smdp-slo, gate:smdp-slo-fixed)")
        if self.seeded and not (self.kind == "gate" and self.adaptive):
            raise ValueError("only the adaptive smdp gate starts from a fitted arrival model "
                             "(gate:smdp-adaptive-seeded, gate:smdp-slo-seeded)")
        if self.derived and not (self.slo and self.adaptive):
            raise ValueError("only the adaptive SLO gate derives its bound (gate:smdp-slo-derived[-seeded])")
        if self.model_analyzer and self.kind != "triton":
            raise ValueError("the Model-Analyzer-style delay is Triton's batcher's (triton:ma)")
        if self.max_wait_us is not None and (self.kind != "gate" or not isinstance(self.max_wait_us, int)
                                             or self.max_wait_us <= 0):
            raise ValueError(f"a max-wait guard is the gate's, an integer > 0 microseconds, got {self.max_wait_us!r}")
        if self.hold_us is not None and (self.kind != "gate" or not isinstance(self.hold_us, int) or self.hold_us < 0):
            raise ValueError(f"a group hold is the gate's, an integer >= 0 microseconds, got {self.hold_us!r}")
        if not isinstance(self.max_queue_delay_us, int) or self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be an integer >= 0, got {self.max_queue_delay_us!r}")

    @property
    def max_wait_s(self) -> float | None:
        """The sidecar's ``max_wait_s`` for this gate: ``max_wait_us`` in seconds (None: its default)."""
        return None if self.max_wait_us is None else self.max_wait_us / 1e6

    @property
    def group_hold_s(self) -> float | None:
        """The sidecar's ``group_hold_s`` for this gate: ``hold_us`` in seconds (None: its default)."""
        return None if self.hold_us is None else self.hold_us / 1e6

    @property
    def name(self) -> str:
        hold = "" if self.hold_us is None else f" hold={self.hold_us / 1000:g}ms"
        return self._name() + hold

    def _name(self) -> str:
        if self.kind == "triton":
            return "triton MA delay" if self.model_analyzer else f"triton delay={self.max_queue_delay_us / 1000:g}ms"
        if self.kind == "config":
            return f"config {self.policy}" + (" adaptive" if self.adaptive else "")
        if self.slo:
            return ("gate smdp SLO" + (" derived" if self.derived else "") + ("" if self.adaptive else " fixed")
                    + (" seeded" if self.seeded else ""))
        guard = "" if self.max_wait_us is None else f" guard={self.max_wait_us / 1000:g}ms"
        if self.policy == "smdp" and self.adaptive:
            return ("gate smdp adaptive" + ("" if self.long_run else " (w unscaled)") + (" seeded" if self.seeded else "")
                    + guard)
        return f"gate {self.policy}{guard}"


def parse_contender(spec: str) -> Contender:
    """``triton:DELAY_US``, ``triton:ma`` (the Model-Analyzer-style delay for the SLO), ``gate:POLICY``
    (``gate:smdp-adaptive`` re-solves; ``gate:smdp-adaptive-unscaled`` re-solves with w as is;
    ``gate:smdp-adaptive-seeded`` re-solves starting from the arrival model fitted to the trace;
    ``gate:smdp-slo`` serves the SLO, ``gate:smdp-slo-fixed`` the SLO policy searched once,
    ``gate:smdp-slo-seeded`` the SLO searched under the fitted arrival model (its MMPP's paths);
    ``gate:smdp-slo-derived[-seeded]`` the same with D derived from the model (``--slo-bound best_delay``);
    ``gate:smdp-adaptive-guard:US`` / ``gate:smdp-guard:US`` with a max-wait guard of US microseconds), ``config:smdp`` or ``config:smdp-adaptive`` (config mode following
    the load)."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "triton":
        if rest == "ma":
            return Contender("triton", model_analyzer=True)
        try:
            delay = int(rest)
        except ValueError:
            raise ValueError(f"contender {spec!r}: triton:DELAY needs the delay in integer microseconds") from None
        return Contender("triton", max_queue_delay_us=delay)
    if kind == "gate":
        if not rest:
            raise ValueError(f"contender {spec!r}: give a policy, e.g. gate:greedy or gate:smdp")
        head, sep, hold = rest.rpartition("-hold:")
        if sep:
            try:
                us = int(hold)
            except ValueError:
                raise ValueError(f"contender {spec!r}: the hold needs integer microseconds") from None
            return replace(parse_contender(f"gate:{head}"), hold_us=us)
        if rest == "smdp-adaptive":
            return Contender("gate", policy="smdp", adaptive=True)
        if rest == "smdp-adaptive-seeded":
            return Contender("gate", policy="smdp", adaptive=True, seeded=True)
        if rest == "smdp-adaptive-unscaled":
            return Contender("gate", policy="smdp", adaptive=True, long_run=False)
        if rest == "smdp-slo":
            return Contender("gate", policy="smdp", adaptive=True, slo=True)
        if rest == "smdp-slo-seeded":
            return Contender("gate", policy="smdp", adaptive=True, slo=True, seeded=True)
        if rest == "smdp-slo-fixed":
            return Contender("gate", policy="smdp", slo=True)
        if rest in ("smdp-slo-derived", "smdp-slo-derived-seeded"):
            return Contender("gate", policy="smdp", adaptive=True, slo=True, derived=True,
                             seeded=rest.endswith("-seeded"))
        head, _, guard = rest.rpartition("-guard:")
        if head in ("smdp", "smdp-adaptive", "smdp-adaptive-seeded"):
            try:
                us = int(guard)
            except ValueError:
                raise ValueError(f"contender {spec!r}: the guard needs integer microseconds") from None
            return Contender("gate", policy="smdp", adaptive=head != "smdp", max_wait_us=us,
                             seeded=head == "smdp-adaptive-seeded")
        try:
            return Contender("gate", policy=rest)
        except ValueError as exc:
            raise ValueError(f"contender {spec!r}: {exc}") from None
    if kind == "config":
        if rest == "smdp-adaptive":
            return Contender("config", policy="smdp", adaptive=True)
        try:
            return Contender("config", policy=rest or "smdp")
        except ValueError as exc:
            raise ValueError(f"contender {spec!r}: {exc}") from None
    raise ValueError(f"contender {spec!r} must start with 'triton:', 'gate:' or 'config:'")


@dataclass(frozen=True)
class Prediction:
    """The solver's figures for a contender (NaN where it has none)."""

    mean_latency_s: float = math.nan
    mean_power_w: float = math.nan
    cost: float = math.nan
    mean_batch: float = math.nan
    source: str = "none"
    """"exact" (stationary evaluation / solve) or "sim" (simulated on the run's arrivals)."""


def _rule_prediction(model: BatchingModel, spec: str, times: np.ndarray, seed: int, warmup_s: float) -> Prediction:
    from solver.evaluate import UnstablePolicyError, evaluate
    from solver.policy import rule_from_spec
    from solver.simulate import simulate

    kind, _ = parse_rule_spec(spec)
    if kind == "smdp":
        from solver.smdp import solve

        res = solve(model)
        return Prediction(res.mean_latency_s, res.mean_power_w, res.gain, res.mean_batch, "exact")
    rule = rule_from_spec(spec, model.max_batch)
    if isinstance(rule, TimeoutRule):
        if times.size < 2:
            return Prediction()
        sim = simulate(model.profile, rule, times, idle_power_w=model.idle_power_w, weight=model.weight, seed=seed,
                       warmup=warmup_s)
        return Prediction(sim.mean_latency_s, sim.mean_power_w, sim.cost, sim.mean_batch, "sim")
    try:
        ev = evaluate(model, rule)
    except UnstablePolicyError:
        return Prediction(math.inf, math.nan, math.inf, math.nan, "exact")
    return Prediction(ev.mean_latency_s, ev.mean_power_w, ev.cost, ev.mean_batch, "exact")


def _instances_prediction(contender: Contender, model: BatchingModel, times: np.ndarray, seed: int,
                          warmup_s: float) -> Prediction:
    """k > 1 instances: the k-instance solver's figures for the smdp gate (its own simulation), Triton's
    batcher at k instances as it runs them (``triton_prediction``), else the gate's rule on every free instance
    simulated on ``times``."""
    from solver.policy import PerInstance, rule_from_spec
    from solver.simulate import simulate

    if contender.kind == "config" or contender.slo:
        raise ValueError(f"{contender.name}: config mode and SLO contenders are one-instance")
    if contender.kind == "triton":  # Triton's batcher at k instances, with its race (TritonInstances)
        return triton_prediction(model, contender.max_queue_delay_us / 1e6, times, seed, warmup_s)
    spec = contender.policy
    kind, _ = parse_rule_spec(spec)
    if kind == "smdp":
        from solver.instances import solve_instances

        res = solve_instances(model, seed=seed)
        return Prediction(res.mean_latency_s, res.mean_power_w, res.gain, res.mean_batch, "sim")
    if times.size < 2:
        return Prediction()
    sim = simulate(model.profile, PerInstance(rule_from_spec(spec, model.max_batch), model.instances), times,
                   idle_power_w=model.idle_power_w, weight=model.weight, seed=seed, warmup=warmup_s,
                   devices=model.idle_devices)
    return Prediction(sim.mean_latency_s, sim.mean_power_w, sim.cost, sim.mean_batch, "sim")


MA_DELAY_STEPS = 40
"""Delays a Model-Analyzer-style sweep tries, evenly from 0 to D."""


def ma_delay(model: BatchingModel, slo, seed: int = 0) -> float:
    """The max_queue_delay a Model-Analyzer-style search picks for ``slo`` (a ``solver.slo.SloTarget``):
    sweep 0..D at the model's rate on a simulated profiling run (Triton's batcher, the profile as the
    GPU), keep the delays whose q-quantile of latency is <= D, take the least-power one; 0 if none."""
    from solver.arrivals import poisson
    from solver.simulate import simulate_latencies

    n = int(max(20_000, 400 / (1.0 - slo.quantile)))
    times = poisson(model.rate, n=n, rng=np.random.default_rng([seed, 5]))
    best, best_p = 0.0, math.inf
    for delay in np.linspace(0.0, slo.latency_s, MA_DELAY_STEPS + 1):
        sim, lat = simulate_latencies(model.profile, TimeoutRule(model.max_batch, float(delay)), times,
                                      idle_power_w=model.idle_power_w, weight=0.0, seed=seed,
                                      warmup=float(times[n // 50]))
        if float(np.quantile(lat, slo.quantile)) <= slo.latency_s and sim.mean_power_w < best_p:
            best, best_p = float(delay), sim.mean_power_w
    return best


def slo_prediction(model: BatchingModel, slo, seed: int, judged: BatchingModel | None = None) -> Prediction:
    """The SLO gate's figures: the pick of the SLO search (``solver.slo.solve_slo``) for ``slo`` under
    ``model``, judged apart from the search (``solver.slo.fresh_figures``: exact for an unguarded table,
    else on fresh paths; the search's own figures for its pick lean low) under ``judged`` (default
    ``model``: the traffic as the gate sees it)."""
    from solver.slo import fresh_figures, solve_slo

    f = fresh_figures(model if judged is None else judged, solve_slo(model, slo, seed=seed).chosen, slo.quantile,
                      seed=seed)
    return Prediction(f.mean_latency_s, f.mean_power_w, f.cost, f.mean_batch, f.source)


def compile_config(model: BatchingModel, seed: int = 0, n_requests: int = CONFIG_SIM_REQUESTS):
    """Config mode's settings for ``model``: solve the SMDP, compile the table into Triton's
    ``dynamic_batching`` (``plugin.config_mode.compiler.compile_policy``, preferred style)."""
    from plugin.config_mode.compiler import compile_policy
    from solver.smdp import solve

    return compile_policy(solve(model), model.profile, model.rate, idle_power_w=model.idle_power_w,
                          weight=model.weight, style="preferred", n_requests=n_requests, seed=seed)


def predict(contender: Contender, model: BatchingModel, times: np.ndarray, seed: int = 0,
            warmup_s: float = 0.0, compiled=None, slo=None) -> Prediction:
    """What the solver expects of ``contender`` under ``model`` (Poisson at model.rate); rules
    without an exact evaluation are simulated on ``times`` from ``warmup_s`` on. For config mode,
    ``compiled`` (from ``compile_config``) is the rule Triton runs; it is compiled here if absent.
    The SLO gate's figures are the SLO search's (``slo``, a ``solver.slo.SloTarget``)."""
    if model.instances > 1:
        return _instances_prediction(contender, model, times, seed, warmup_s)
    if contender.slo:
        if slo is None:
            raise ValueError(f"{contender.name} needs the bench's SLO")
        return slo_prediction(model, slo, seed)
    if contender.kind == "config":
        compiled = compiled if compiled is not None else compile_config(model, seed)
        return config_prediction(model, compiled.settings, times, seed, warmup_s)
    if contender.kind == "triton":
        return triton_prediction(model, contender.max_queue_delay_us / 1e6, times, seed, warmup_s)
    return _rule_prediction(model, contender.policy, times, seed, warmup_s)


TRITON_DRAWS = 8
"""Simulations averaged for a Triton prediction: each draws the batcher's races (and the service times)
anew on the same arrival times. On a short window one draw is a noisy prediction (Poisson at 100 req/s,
3 s, delay 10 ms, V100 x10: W 36.1-40.5 ms over ten draws); the mean is the model's expectation."""


def triton_prediction(model: BatchingModel, delay_s: float, times: np.ndarray, seed: int = 0,
                      warmup_s: float = 0.0, draws: int = TRITON_DRAWS,
                      catch_share: float = TRITON_CATCH_SHARE) -> Prediction:
    """Triton's own batcher at ``max_queue_delay`` = ``delay_s`` as it runs the bench's model (priority
    levels and a queue policy: no prefetching) on ``model.instances`` instances: ``solver.policy.TritonBatcher``
    at one, ``TritonInstances`` of its ``TimeoutRule`` at k > 1 (the race at a completion that frees the only
    free instance), simulated on ``times`` with seeds ``seed`` .. ``seed + draws - 1`` and averaged
    (``TRITON_DRAWS``)."""
    from solver.policy import TimeoutRule, TritonBatcher, TritonInstances

    if model.instances == 1:
        rule = TritonBatcher(model.max_batch, delay_s, catch_share=catch_share)
    else:
        rule = TritonInstances(TimeoutRule(model.max_batch, delay_s), model.instances, catch_share)
    return _drawn_prediction(model, rule, times, seed, warmup_s, draws)


def config_prediction(model: BatchingModel, settings, times: np.ndarray, seed: int = 0, warmup_s: float = 0.0,
                      draws: int = TRITON_DRAWS, catch_share: float = TRITON_CATCH_SHARE) -> Prediction:
    """Config mode: Triton's batcher running the compiled ``settings``
    (``plugin.config_mode.compiler.DynamicBatchingSettings``: preferred sizes and a delay) as it runs them on
    the bench's model, with the race (``TritonInstances`` of ``settings.rule()``, one instance), averaged over
    ``draws`` like ``triton_prediction``. ``catch_share`` 1 with one draw is the compiled rule simulated as
    config mode compiles it."""
    from solver.policy import TritonInstances

    return _drawn_prediction(model, TritonInstances(settings.rule(), model.instances, catch_share), times, seed,
                             warmup_s, draws)


def _drawn_prediction(model: BatchingModel, rule, times: np.ndarray, seed: int, warmup_s: float,
                      draws: int) -> Prediction:
    """``rule`` (a model of Triton's batcher with its race) simulated on ``times`` with seeds ``seed`` ..
    ``seed + draws - 1``, the figures averaged."""
    from solver.simulate import simulate

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if times.size < 2:
        return Prediction()
    devices = model.idle_devices if model.instances > 1 else None
    sims = [simulate(model.profile, rule, times, idle_power_w=model.idle_power_w, weight=model.weight,
                     seed=seed + i, warmup=warmup_s, devices=devices) for i in range(draws)]
    mean = lambda f: float(np.mean([f(s) for s in sims]))  # noqa: E731
    return Prediction(mean(lambda s: s.mean_latency_s), mean(lambda s: s.mean_power_w), mean(lambda s: s.cost),
                      mean(lambda s: s.mean_batch), "sim")
