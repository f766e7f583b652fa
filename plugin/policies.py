"""Turn a model's policy configuration into the rule its gate enforces."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from solver.arrival_model import POISSON, ArrivalModel
from solver.policy import BatchRule, GateRule, GroupHold, MaxWaitGuard, parse_rule_spec, rule_from_spec
from solver.slo_bound import BestDelaySlo, solve_best_delay_slo
from tritonclient.grpc import model_config_pb2

from .arrival_estimator import SIGNIFICANT_G
from .config import ModelPolicyConfig, SloConfig
from .placement import placement

log = logging.getLogger("smdp.policies")


@dataclass(frozen=True)
class RuleInfo:
    """The rule in force and what the solver predicted for it (empty for baselines)."""

    rule: BatchRule
    spec: str
    max_batch: int
    prediction: dict[str, Any] | None = None


def gate_rule(cfg: ModelPolicyConfig, rule: BatchRule, arrivals: ArrivalModel = POISSON) -> BatchRule:
    """The rule a model's gate runs: ``rule`` with the model's max-wait guard if it has one, and its group
    hold where the rule was solved for ``arrivals`` that come in groups: a mean group above
    ``SIGNIFICANT_G``, the size the group estimator needs to tell groups from Poisson coincidences (a
    fitted 1.02 is a Poisson stream's chance neighbours, and a hold there costs without gaining)."""
    if cfg.max_wait_s is not None:
        rule = MaxWaitGuard(rule, cfg.max_wait_s)
    if cfg.group_hold_s > 0 and arrivals.group_mean > SIGNIFICANT_G:
        rule = GroupHold(rule, cfg.group_hold_s)
    return rule


def model_instances(cfg: model_config_pb2.ModelConfig) -> int:
    """k, the model's instances fed by Triton's one queue (``plugin.placement``: instance_group counts,
    each times the GPUs it lists for KIND_GPU)."""
    return placement(cfg).instances


def build_rule(model: str, cfg: ModelPolicyConfig, model_max_batch: int, instances: int = 1,
               devices: int | None = None) -> RuleInfo:
    """Build the rule for one model; B is capped by the model's own max_batch_size.

    With k = ``instances`` > 1 the smdp policy is the k-instance table a(n, m) (``solver.instances``),
    m = the gate's batches in flight; baselines run per instance slot as Triton's batcher does. ``devices``:
    D, the devices the k instances draw idle power on (``plugin.placement``; None: one per instance)."""
    b = min(cfg.max_batch or model_max_batch, model_max_batch)
    kind, _ = parse_rule_spec(cfg.policy)
    if kind != "smdp":
        return RuleInfo(rule_from_spec(cfg.policy, b), cfg.policy, b)
    if cfg.profile is None or cfg.rate_rps is None:
        raise ValueError(f"model {model!r}: the smdp policy needs `profile` and `rate_rps`")
    from solver.model import BatchingModel, ServiceProfile
    from solver.smdp import solve

    profile = ServiceProfile.from_csv(cfg.profile)
    bm = BatchingModel(
        rate=cfg.rate_rps, max_batch=b, profile=profile, idle_power_w=cfg.idle_power_w, weight=cfg.weight,
        instances=instances, devices=devices if instances > 1 else None,
    )
    if bm.instances > 1 and cfg.slo is not None:
        return _slo_rule_instances(bm, cfg)
    if bm.instances > 1:
        from solver.instances import solve_instances

        k_res = solve_instances(bm)
        pred_k = {
            "gain": k_res.gain,
            "mean_latency_s": k_res.mean_latency_s,
            "mean_power_w": k_res.mean_power_w,
            "mean_batch": k_res.mean_batch,
            "threshold": None,
            "thresholds": list(k_res.policy.thresholds() or ()),
            "instances": bm.instances,
            "devices": bm.idle_devices,
            "rate_rps": cfg.rate_rps,
            "weight": cfg.weight,
        }
        return RuleInfo(GateRule.of(k_res.policy), "smdp", b, pred_k)
    if cfg.slo is not None:
        return _slo_rule(bm, cfg)
    result = solve(bm)
    pred = {
        "gain": result.gain,
        "mean_latency_s": result.mean_latency_s,
        "mean_power_w": result.mean_power_w,
        "mean_batch": result.mean_batch,
        "threshold": result.policy.threshold(),
        "rate_rps": cfg.rate_rps,
        "weight": cfg.weight,
    }
    return RuleInfo(result.policy, "smdp", b, pred)


def best_delay_slo(slo: SloConfig) -> BestDelaySlo:
    """``slo.bound: best_delay`` as the solver's rule (``solver.slo_bound``)."""
    return BestDelaySlo(slo.quantile, slo.best_delay_grid_s, slo.margin_s, catch_share=slo.best_delay_catch_share,
                        direct_extra_s=slo.best_delay_direct_extra_s)


def _slo_rule(bm, cfg: ModelPolicyConfig) -> RuleInfo:
    """A fixed policy for the model's SLO: the SLO search's table and guard at ``rate_rps``, once."""
    from solver.policy import MaxWaitGuard
    from solver.slo import SloTarget, solve_slo

    derived: dict[str, float | str] = {}
    if cfg.slo.bound == "best_delay":
        both = solve_best_delay_slo(bm, best_delay_slo(cfg.slo))
        res, derived = both.result, {"slo_latency_s": both.result.target.latency_s, "bound": both.bound.describe()}
        log.info("SLO bound derived at %g/s: %s%s", bm.rate, both.bound.describe(),
                 "; the delay itself is served" if both.delay_served else "")
    else:
        res = solve_slo(bm, SloTarget(cfg.slo.quantile, cfg.slo.latency_s, cfg.slo.margin_s))
    c = res.chosen
    if not res.feasible:
        log.warning("SLO q%g <= %g ms is infeasible at %g/s: serving %s, predicted q%g %.3f ms",
                    cfg.slo.quantile, res.target.latency_s * 1e3, bm.rate,
                    "the best delay as the gate runs it" if derived else "greedy", cfg.slo.quantile,
                    c.estimate.quantile_s * 1e3)
    pred = {**derived,
        "gain": c.cost,
        "mean_latency_s": c.mean_latency_s,
        "mean_power_w": c.mean_power_w,
        "mean_batch": c.mean_batch,
        "threshold": c.policy.threshold(),
        "rate_rps": cfg.rate_rps,
        "weight": cfg.weight,
        "max_wait_s": c.max_wait_s,
        "predicted_quantile_s": c.estimate.quantile_s,
        "slo_feasible": res.feasible,
    }
    rule = c.policy if c.max_wait_s is None else MaxWaitGuard(c.policy, c.max_wait_s)
    return RuleInfo(rule, "smdp", bm.max_batch, pred)


def _slo_rule_instances(bm, cfg: ModelPolicyConfig) -> RuleInfo:
    """k > 1 instances, a fixed SLO policy: the k-instance SLO search's limits a(n, m) and guard, once."""
    from solver.instances_slo import solve_slo_instances
    from solver.slo import SloTarget

    if cfg.slo.latency_s is None:
        raise ValueError(f"slo.bound: {cfg.slo.bound} derives D for one model instance; with {bm.instances} "
                         "instances state slo.latency_s")
    res = solve_slo_instances(bm, SloTarget(cfg.slo.quantile, cfg.slo.latency_s, cfg.slo.margin_s))
    c = res.chosen
    if not res.feasible:
        log.warning("SLO q%g <= %g ms is infeasible at %g/s with %d instances: serving greedy, predicted q%g %.3f ms",
                    cfg.slo.quantile, cfg.slo.latency_s * 1e3, bm.rate, bm.instances, cfg.slo.quantile,
                    c.estimate.quantile_s * 1e3)
    pred = {
        "gain": c.cost,
        "mean_latency_s": c.mean_latency_s,
        "mean_power_w": c.mean_power_w,
        "mean_batch": c.mean_batch,
        "threshold": None,
        "thresholds": list(c.thresholds),
        "instances": bm.instances,
        "devices": bm.idle_devices,
        "rate_rps": cfg.rate_rps,
        "weight": cfg.weight,
        "max_wait_s": c.max_wait_s,
        "predicted_quantile_s": c.estimate.quantile_s,
        "slo_feasible": res.feasible,
    }
    return RuleInfo(GateRule.of(c.rule), "smdp", bm.max_batch, pred)
