"""The sidecar's one typed configuration: read from a YAML file, then environment, then flags.

Precedence is file < environment (``SMDP_SIDECAR_<FIELD>``) < command-line flags, so that a
container image can ship a file and an operator can still override one field. Unknown keys are
rejected everywhere: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from solver import quantities
from solver.policy import TRITON_CATCH_SHARE, parse_rule_spec
from solver.quantities import DEFAULT_IDLE_POWER_W, DEFAULT_WEIGHT
from solver.slo_bound import DEFAULT_DELAYS_S

ENV_PREFIX = "SMDP_SIDECAR_"


class SloConfig(BaseModel):
    """A tail-latency SLO: the ``quantile`` of response time must be <= ``latency_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantile: float = Field(0.99, gt=0, lt=1, allow_inf_nan=False,
                            description="q: the share of requests that must finish within latency_s, in (0, 1)")
    latency_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="D: the latency bound, seconds (bound: stated; none with bound: "
                                    "best_delay, which derives it)")
    margin_s: float = Field(0.0, ge=0, allow_inf_nan=False,
                            description="the part of D reserved for latency the sidecar does not see (the "
                            "client's threads, its network hop to the sidecar), seconds: the policy is searched "
                            "for D - margin_s, less the gap the sidecar measures between its answers and the "
                            "prediction")
    bound: Literal["stated", "best_delay"] = Field(
        "stated",
        description="where D comes from. stated: latency_s. best_delay: derived from the model at every SLO "
        "search (so again when the rate, the learned groups or the fitted MMPP move): the predicted quantile "
        "of the Triton delay of best_delay_grid_s with the least J, on the search's own path of the arrival "
        "model in force; D is that plus margin_s plus the measured correction (a delay's answers would carry "
        "both), and where no searched policy meets it at a J below the delay's, the delay itself is served "
        "(but not where the delay would miss D by the hop through the sidecar and a searched policy meets it; "
        "solver/slo_bound.py). One model instance only",
    )
    best_delay_grid_s: tuple[float, ...] = Field(
        DEFAULT_DELAYS_S,
        description="bound: best_delay: the Triton max_queue_delay values compared, seconds",
    )
    best_delay_catch_share: float = Field(
        TRITON_CATCH_SHARE, ge=0, le=1, allow_inf_nan=False,
        description="bound: best_delay: the share of its instance's completions (with requests queued) at which "
        "Triton's own batcher catches the instance free, in [0, 1]; the rest it sleeps until the next arrival "
        "(a model without prefetching, solver.policy.TritonBatcher; 1 = it decides whenever the instance is "
        "free). A race between two threads that depends on the host: measured 0.65-0.77 on the reference "
        "host, and 0.6 is the share whose simulated W and p99 fit those runs best (p99 within -2.1% to "
        "+2.7%), hence the default; a lower share predicts a longer Triton tail, so a looser D",
    )
    best_delay_direct_extra_s: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="bound: best_delay: what the delay's answers would carry beyond the model's quantile if its "
        "clients were served by Triton directly (their own hop to Triton and their lateness in sending), "
        "seconds. D = the delay's predicted quantile + this + the measured correction, and the gate is "
        "searched for D - margin_s - the correction: a margin_s that holds the hop through the sidecar then "
        "keeps the gate's answers within what Triton's own would carry. Unset: margin_s (the client's path "
        "to the sidecar counted as its path to Triton)",
    )

    @field_validator("best_delay_grid_s")
    @classmethod
    def _valid_delays(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("slo.best_delay_grid_s needs at least one delay")
        for d in v:
            if not (d >= 0 and d < float("inf")):
                raise ValueError(f"slo.best_delay_grid_s: delays must be finite seconds >= 0, got {d!r}")
        return v

    @model_validator(mode="after")
    def _one_bound(self) -> "SloConfig":
        if self.bound == "stated":
            if self.latency_s is None:
                raise ValueError("slo.latency_s (D, seconds) is required, or slo.bound: best_delay to derive D "
                                 "from the model")
            if self.margin_s >= self.latency_s:
                raise ValueError(f"slo.margin_s ({self.margin_s:g} s) must be below slo.latency_s "
                                 f"({self.latency_s:g} s)")
            derived_only = sorted(f for f in ("best_delay_catch_share", "best_delay_direct_extra_s")
                                  if f in self.model_fields_set)
            if derived_only:
                raise ValueError(f"slo.{', slo.'.join(derived_only)} go with slo.bound: best_delay (the bound derived "
                                 "from Triton's best delay), not with a stated latency_s")
        elif self.latency_s is not None:
            raise ValueError(f"slo.latency_s ({self.latency_s:g} s) and slo.bound: best_delay both set D: give "
                             "one (best_delay derives D from the model)")
        return self


class ModelPolicyConfig(BaseModel):
    """How one model is gated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field("greedy", description="greedy | smdp | static:B0 | threshold:K | timeout:SECONDS")
    profile: Literal["auto"] | Path | None = Field(
        None, description="Service-time/energy profile CSV (batch_size,mean_service_s,batch_energy_j); needed for "
        "smdp. auto = measure it at start, before the model's gate opens: a sweep bounded by profile_auto_s "
        "(smdp profile's, cached in profile_cache_dir by model, version and config); if it fails, greedy"
    )
    profile_auto_s: float = Field(
        10.0, gt=0, allow_inf_nan=False,
        description="profile: auto: longest the start-up sweep over batch sizes may take, seconds",
    )
    profile_power_from: Path | None = Field(
        None, description="profile: auto where Triton reports no GPU: model the energy with this prior profile CSV's "
        "busy power over the measured times (else busy power 0: latency only)",
    )
    profile_power_model: str | None = Field(
        None, description="profile: auto where Triton reports no GPU: busy power 'A[,B]' = A + B x b watts over the "
        "measured times (instead of profile_power_from)",
    )
    rate_rps: float | None = Field(
        None, gt=0, description="Arrival rate the smdp policy is solved for, requests/second"
    )
    weight: float = Field(DEFAULT_WEIGHT, description="w: seconds of mean latency per watt")
    idle_power_w: float = Field(DEFAULT_IDLE_POWER_W, description="P0: accelerator idle power, watts")
    max_batch: int | None = Field(
        None, ge=1, description="B: largest batch the gate forms (default: the model's max_batch_size)"
    )
    max_wait_s: float | None = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest a request waits in the gate for its batch to fill, seconds; then what is queued "
        "is served. A guard for when traffic stops (the SMDP assumes arrivals continue); None = no guard",
    )
    group_hold_s: float = Field(
        0.0005,
        ge=0,
        allow_inf_nan=False,
        description="smdp, adaptive: where the policy in force is solved for arrivals in groups (a mean group "
        "above 1.1, learned or from `arrivals`), a batch it would start with all that waits, not a full one, waits "
        "until the newest request arrived this long ago, and at most 4 times this after the group's first member, "
        "seconds. The policy counts a group as arriving at one instant, but a client's fan-out reaches the gate one "
        "request after another: without the hold its first members go alone and the rest wait for the next batch "
        "(solver.policy.GroupHold). 0 = never hold",
    )
    arrivals: str | None = Field(
        None,
        description="smdp, adaptive: a fitted arrival model to start from, as `smdp fit-arrivals` prints it for "
        "past traffic (batch:G or mmpp:RATES:SWITCHES[:GROUPS]): the policy is solved for it from the first solve, "
        "an MMPP's shape at the long-run mean rate, until the online fits are clearly closer to the recent arrivals "
        "(plugin/arrival_estimator.py; needs arrival_group_window > 0). With `slo` the SLO search judges its "
        "tables and guards on the MMPP's paths (solver/slo.py). None = learn from nothing",
    )
    adaptive: bool = Field(
        True,
        description="smdp only: re-solve for the measured arrival rate when it changes (False: keep the "
        "policy solved for rate_rps)",
    )
    learn_profile: bool = Field(
        True,
        description="smdp, adaptive only: learn tau(b) from the gate's dispatch-to-completion time of each batch "
        "(gRPC included: the time the gate's slot is held) and re-solve when it drifts; False: the CSV profile stays",
    )
    profile_drift: float = Field(
        0.10,
        gt=0,
        allow_inf_nan=False,
        description="Relative change of a learned tau(b) that asks for a new policy, a fraction (0.10 = 10%); "
        "counted only at sizes with profile_min_samples batches and outside the mean's 95% confidence interval",
    )
    profile_min_samples: int = Field(
        30,
        ge=2,
        description="Completed batches of one size before its measured mean counts; until some size has that "
        "many, the CSV profile is used unchanged",
    )
    profile_prior_weight: float = Field(
        20.0,
        ge=0,
        allow_inf_nan=False,
        description="In the learned profile the CSV prior (reshaped to the data) counts as this many batches at "
        "each size: tau(b) = (n_b mean_b + k base_b) / (n_b + k), batches",
    )

    slo: SloConfig | None = Field(
        None,
        description="smdp only: a tail-latency SLO {quantile, latency_s, margin_s, bound, best_delay_grid_s, "
        "best_delay_catch_share, best_delay_direct_extra_s}; the "
        "policy is then the least-J one (J = W + w P at `weight`) predicted to meet it, greedy when none does. "
        "bound: best_delay (instead of latency_s) derives D at every search: the predicted quantile of the least-J "
        "Triton delay of best_delay_grid_s (seconds) under the arrival model in "
        "force, served itself where no searched policy meets it at a lower J (solver/slo_bound.py; one instance). "
        "It is searched "
        "for latency_s - margin_s (margin_s, default 0: latency the sidecar cannot see, the client's and its "
        "hop's). Adaptive: re-solved as the rate moves, less the measured correction (how far the answers' "
        "quantile ran above the prediction; `smdp ctl status` shows both; an infeasible SLO is flagged in "
        "status and metrics). Fixed (adaptive: false): searched once for rate_rps. With k > 1 instances the "
        "family is the k-instance control limits a(n, m), optionally guarded (solver/instances_slo.py)",
    )

    @field_validator("weight")
    @classmethod
    def _valid_weight(cls, v: float) -> float:
        return quantities.weight(v)

    @field_validator("idle_power_w")
    @classmethod
    def _valid_idle_power(cls, v: float) -> float:
        return quantities.idle_power(v)

    @field_validator("policy")
    @classmethod
    def _valid_policy(cls, v: str) -> str:
        parse_rule_spec(v)
        return v

    @field_validator("arrivals")
    @classmethod
    def _valid_arrivals(cls, v: str | None) -> str | None:
        if v is not None:
            from solver.arrival_model import parse_arrivals
            from solver.errors import ModelError

            try:
                parse_arrivals(v)
            except ModelError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _smdp_needs_inputs(self) -> "ModelPolicyConfig":
        if self.policy == "smdp":
            if self.profile is None:
                raise ValueError("policy smdp needs `profile` (the service-time/energy profile CSV)")
            if not self.adaptive and self.rate_rps is None:
                raise ValueError("a non-adaptive smdp policy needs `rate_rps` (the rate to solve for)")
        if self.slo is not None and self.policy != "smdp":
            raise ValueError("`slo` needs the smdp policy (policy: smdp)")
        return self


class SidecarConfig(BaseModel):
    """Configuration of ``smdp serve``; every duration in seconds unless the name says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:8011", description="host:port for the inference API (port 0 = any free)")
    triton_url: str = Field("127.0.0.1:8001", description="host:port of Triton's gRPC endpoint")
    listen_http: str | None = Field(
        None,
        description="host:port for Triton's HTTP/REST API (KServe v2) through the gate: inference joins the same "
        "per-model queue as gRPC, everything else is relayed to triton_http_url (port 0 = any free); None = off",
    )
    triton_http_url: str = Field(
        "auto", description="host:port of Triton's HTTP endpoint, for the HTTP listener; 'auto' = Triton's host, port 8000"
    )
    mode: Literal["merged", "released"] = Field(
        "merged",
        description="merged: one concatenated request per batch; released: forward the batch's requests "
        "individually at once with a high priority and let Triton's dynamic batcher group them",
    )
    data_plane: Literal["auto", "python", "native"] = Field(
        "auto",
        description="What carries inference: native = the C++ gate smdp-gate (`make native`) on `listen`, with "
        "policies, estimation, control and metrics kept here (merged mode only; less added latency per request, "
        "RESULTS.md); python = this process's asyncio gate; auto = native wherever smdp-gate is found, else "
        "python, saying why at start",
    )
    native_binary: str | None = Field(
        None, description="Path of smdp-gate for the native data plane (default: $SMDP_NATIVE_GATE, "
        "native/build/smdp-gate, then PATH)"
    )
    native_report_interval_s: float = Field(
        0.25, gt=0, allow_inf_nan=False,
        description="How often the native gate reports arrivals, batches and counters to this process, seconds: "
        "the control plane, `smdp ctl status` and the metrics trail the data path by up to this much. Each report wakes this process for its bookkeeping, and on a "
        "machine with few cores a request that coincides with it pays for that in its tail (RESULTS.md section 3)",
    )
    max_queue: int = Field(1024, ge=1, description="Requests that may wait per model before RESOURCE_EXHAUSTED")
    dispatch_priority: int = Field(
        1, ge=0, description="Triton priority level stamped on gated requests that carry none (0 = leave unset)"
    )
    upstream_timeout_s: float = Field(60.0, gt=0, description="Deadline of one call to Triton, seconds")
    unknown_model_ttl_s: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="How long the sidecar remembers that Triton does not know a model (name, version), seconds: "
        "requests for it meanwhile are relayed to Triton straight away (one round trip, Triton's own error) "
        "instead of first asking Triton for the model's config again; a model loaded since is gated at the "
        "latest this long after, and at once after Triton answers one of its relayed requests. 0 = off",
    )
    solver_url: str | None = Field(
        None, description="host:port of a shared `smdp solver-serve`; None = solve in a worker thread of the sidecar"
    )
    solver_timeout_s: float = Field(10.0, gt=0, description="Deadline of one solve request, seconds")
    control_listen: str | None = Field(
        "127.0.0.1:8012", description="host:port of the control API (smdp.v1.Control); None = no control API"
    )
    control_token: str | None = Field(
        None, description="Bearer token the control API requires (None = none; keep it on localhost then)"
    )
    metrics_listen: str | None = Field(
        "127.0.0.1:8013", description="host:port of the Prometheus /metrics endpoint (None = off)"
    )
    retune_interval_s: float = Field(
        0.25, gt=0, description="How often adaptive models check whether their policy must be re-solved, seconds"
    )
    rate_window_s: float = Field(10.0, gt=0, description="Sliding window of the arrival-rate estimator, seconds")
    arrival_group_window: float = Field(
        0.01, ge=0, allow_inf_nan=False,
        description="Adaptive models learn how requests clump: an arrival within this many mean interarrival "
        "times of the previous one joins its group, and once the mean group size is significantly above 1.1 the "
        "policy is solved for compound-Poisson arrivals with the learned group sizes (plugin/arrival_estimator.py; "
        "not for SLO or k-instance solves). 0 = assume Poisson",
    )
    long_run_window_s: float = Field(
        600.0, ge=0,
        description="Horizon of the long-run mean arrival rate, seconds: adaptive models solve each regime with "
        "w x long-run rate / current rate, which is what minimises the long-run mean response time + w x mean "
        "power when the rate moves (plugin/loop/controller.py); at a steady rate that is w. 0 = solve with w as is",
    )
    triton_metrics_url: str | None = Field(
        "auto",
        description="Triton's Prometheus metrics endpoint, read for GPU power (nv_energy_consumption, "
        "nv_gpu_power_usage): a URL such as http://127.0.0.1:8002/metrics; 'auto' = Triton's host, the port after "
        "its gRPC port (Triton's default layout: 8001 -> 8002); "
        "'off' or None = not read. Without GPU figures there, power is modelled from the profile and marked so",
    )
    triton_statistics: bool = Field(
        True, description="Read Triton's statistics API (compute_infer per batch size) beside the gate's own times"
    )
    telemetry_interval_s: float = Field(
        5.0, gt=0, allow_inf_nan=False,
        description="How often Triton's metrics and statistics are read, and measured W and P published, seconds",
    )
    triton_batcher: Literal["keep", "off"] = Field(
        "keep",
        description="Triton's own dynamic batcher for gated models in merged mode: keep = leave the model's config "
        "as is (a warning at start: Triton 2.51 was seen holding a merged request for its 500 ms idle wait); off = "
        "with this consent, the sidecar reloads each such model without dynamic_batching through Triton's "
        "repository API (a config override; needs --model-control-mode=explicit), since the gate forms the "
        "batches; the gate keeps the priority levels it read first",
    )
    allow_repository_control: bool = Field(
        False, description="Pass Triton's repository load/unload RPCs through (off: PERMISSION_DENIED)"
    )
    profile_cache_dir: Path = Field(
        Path("~/.cache/smdp/profiles"),
        description="Where profile: auto keeps measured profiles, one CSV per model, version, config hash and B "
        "(~ is the user's home)",
    )
    default: ModelPolicyConfig = Field(
        default_factory=ModelPolicyConfig, description="Policy for models without an entry in `models`"
    )
    models: dict[str, ModelPolicyConfig] = Field(default_factory=dict, description="Per-model policy")

    @model_validator(mode="after")
    def _native_is_merged(self) -> "SidecarConfig":
        if self.data_plane == "native" and self.mode != "merged":
            raise ValueError("data_plane native runs the merged mode only; use data_plane python for mode released")
        if self.arrival_group_window == 0 and any(p.arrivals for p in (self.default, *self.models.values())):
            raise ValueError("a given arrival model (`arrivals`) needs the arrival estimators: arrival_group_window > 0")
        return self

    def policy_for(self, model: str) -> ModelPolicyConfig:
        return self.models.get(model, self.default)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    top = set(SidecarConfig.model_fields) - {"models", "default"}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX):].lower()
        if field.startswith("default_"):
            out.setdefault("default", {})[field[len("default_"):]] = value
        elif field in top:
            out[field] = value
        else:
            raise ValueError(f"unknown sidecar setting in environment: {key}")
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SidecarConfig:
    """File, then environment, then explicit overrides (flags); validated once at the end."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update(loaded)
    env = _env_overrides(os.environ if environ is None else environ)
    for source in (env, dict(overrides or {})):
        for key, value in source.items():
            if value is None:
                continue
            if key == "default" and isinstance(value, dict):
                merged = dict(data.get("default") or {})
                merged.update({k: v for k, v in value.items() if v is not None})
                data["default"] = merged
            else:
                data[key] = value
    return SidecarConfig.model_validate(data)


def add_field_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    model: type[BaseModel],
    field: str,
    *,
    dest: str,
    extra_help: str = "",
) -> None:
    """A command-line flag that sets one configuration field: its type (or choices), help and the
    default it shows come from the field, so they are written once. The flag's own default is None
    (not given), so that it overrides the file and environment only when given."""
    info = model.model_fields[field]
    kind: Any = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the flag gives an X
        given = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = given[0] if len(given) == 1 else str  # X | Literal[...]: text, which the config parses
    choices = None
    if typing.get_origin(kind) is Literal:
        choices, kind = list(typing.get_args(kind)), str
    text = " ".join((info.description or field).split()) + extra_help
    if not info.is_required():
        text += f" (default: {'none' if info.default is None else info.default})"
    if kind is bool:  # a switch: given, the field is true; not given, the file and environment decide
        parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None,
                            help=text.replace("%", "%%"))
        return
    if kind not in (str, int, float, Path):
        raise TypeError(f"{model.__name__}.{field}: no command-line flag for a {kind!r} field")
    parser.add_argument(
        flag, dest=dest, type=str if kind is Path else kind, choices=choices, default=None, metavar=None if choices
        else field.upper(), help=text.replace("%", "%%"),
    )
