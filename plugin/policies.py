"""Turn a model's policy configuration into the rule its gate enforces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from solver.policy import BatchRule, parse_rule_spec, rule_from_spec

from .config import ModelPolicyConfig


@dataclass(frozen=True)
class RuleInfo:
    """The rule in force and what the solver predicted for it (empty for baselines)."""

    rule: BatchRule
    spec: str
    max_batch: int
    prediction: dict[str, Any] | None = None


def build_rule(model: str, cfg: ModelPolicyConfig, model_max_batch: int) -> RuleInfo:
    """Build the rule for one model; B is capped by the model's own max_batch_size."""
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
        rate=cfg.rate_rps, max_batch=b, profile=profile, idle_power_w=cfg.idle_power_w, weight=cfg.weight
    )
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
