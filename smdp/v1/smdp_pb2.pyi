from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Profile(_message.Message):
    __slots__ = ("batch_size", "mean_service_s", "batch_energy_j", "service_cv")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CV_FIELD_NUMBER: _ClassVar[int]
    batch_size: _containers.RepeatedScalarFieldContainer[int]
    mean_service_s: _containers.RepeatedScalarFieldContainer[float]
    batch_energy_j: _containers.RepeatedScalarFieldContainer[float]
    service_cv: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, batch_size: _Optional[_Iterable[int]] = ..., mean_service_s: _Optional[_Iterable[float]] = ..., batch_energy_j: _Optional[_Iterable[float]] = ..., service_cv: _Optional[_Iterable[float]] = ...) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ("rate_rps", "weight", "idle_power_w", "max_batch", "profile", "method", "warm_start_policy", "truncation", "arrivals")
    RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IDLE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WARM_START_POLICY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    rate_rps: float
    weight: float
    idle_power_w: float
    max_batch: int
    profile: Profile
    method: str
    warm_start_policy: _containers.RepeatedScalarFieldContainer[int]
    truncation: int
    arrivals: Arrivals
    def __init__(self, rate_rps: _Optional[float] = ..., weight: _Optional[float] = ..., idle_power_w: _Optional[float] = ..., max_batch: _Optional[int] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., method: _Optional[str] = ..., warm_start_policy: _Optional[_Iterable[int]] = ..., truncation: _Optional[int] = ..., arrivals: _Optional[_Union[Arrivals, _Mapping]] = ...) -> None: ...

class Arrivals(_message.Message):
    __slots__ = ("mean_group_size", "group_pmf")
    MEAN_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_PMF_FIELD_NUMBER: _ClassVar[int]
    mean_group_size: float
    group_pmf: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean_group_size: _Optional[float] = ..., group_pmf: _Optional[_Iterable[float]] = ...) -> None: ...

class SolveReply(_message.Message):
    __slots__ = ("policy", "gain", "mean_latency_s", "mean_power_w", "throughput_rps", "mean_batch", "threshold", "iterations", "converged", "solve_time_s", "truncation", "cached", "warm_started", "solved_rate_rps", "solved_weight", "method", "capacity_rps", "load", "max_batch", "arrivals")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_POWER_W_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_RPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    SOLVE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    WARM_STARTED_FIELD_NUMBER: _ClassVar[int]
    SOLVED_RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    SOLVED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_RPS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    policy: _containers.RepeatedScalarFieldContainer[int]
    gain: float
    mean_latency_s: float
    mean_power_w: float
    throughput_rps: float
    mean_batch: float
    threshold: int
    iterations: int
    converged: bool
    solve_time_s: float
    truncation: int
    cached: bool
    warm_started: bool
    solved_rate_rps: float
    solved_weight: float
    method: str
    capacity_rps: float
    load: float
    max_batch: int
    arrivals: Arrivals
    def __init__(self, policy: _Optional[_Iterable[int]] = ..., gain: _Optional[float] = ..., mean_latency_s: _Optional[float] = ..., mean_power_w: _Optional[float] = ..., throughput_rps: _Optional[float] = ..., mean_batch: _Optional[float] = ..., threshold: _Optional[int] = ..., iterations: _Optional[int] = ..., converged: _Optional[bool] = ..., solve_time_s: _Optional[float] = ..., truncation: _Optional[int] = ..., cached: _Optional[bool] = ..., warm_started: _Optional[bool] = ..., solved_rate_rps: _Optional[float] = ..., solved_weight: _Optional[float] = ..., method: _Optional[str] = ..., capacity_rps: _Optional[float] = ..., load: _Optional[float] = ..., max_batch: _Optional[int] = ..., arrivals: _Optional[_Union[Arrivals, _Mapping]] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class SetWeightRequest(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: float
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class SetLatencyTargetRequest(_message.Message):
    __slots__ = ("model", "target_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    target_s: float
    def __init__(self, model: _Optional[str] = ..., target_s: _Optional[float] = ...) -> None: ...

class SetSloRequest(_message.Message):
    __slots__ = ("model", "quantile", "latency_s", "margin_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MARGIN_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    quantile: float
    latency_s: float
    margin_s: float
    def __init__(self, model: _Optional[str] = ..., quantile: _Optional[float] = ..., latency_s: _Optional[float] = ..., margin_s: _Optional[float] = ...) -> None: ...

class SloStatus(_message.Message):
    __slots__ = ("quantile", "latency_s", "feasible", "predicted_quantile_s", "predicted_ci95_s", "measured_quantile_s", "attainment", "samples", "max_wait_s", "margin_s", "correction_s", "stall_held_up", "stalled_s", "correction_with_stalls_s", "derived_bound")
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_QUANTILE_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CI95_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_QUANTILE_S_FIELD_NUMBER: _ClassVar[int]
    ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MARGIN_S_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_S_FIELD_NUMBER: _ClassVar[int]
    STALL_HELD_UP_FIELD_NUMBER: _ClassVar[int]
    STALLED_S_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_WITH_STALLS_S_FIELD_NUMBER: _ClassVar[int]
    DERIVED_BOUND_FIELD_NUMBER: _ClassVar[int]
    quantile: float
    latency_s: float
    feasible: bool
    predicted_quantile_s: float
    predicted_ci95_s: float
    measured_quantile_s: float
    attainment: float
    samples: int
    max_wait_s: float
    margin_s: float
    correction_s: float
    stall_held_up: int
    stalled_s: float
    correction_with_stalls_s: float
    derived_bound: str
    def __init__(self, quantile: _Optional[float] = ..., latency_s: _Optional[float] = ..., feasible: _Optional[bool] = ..., predicted_quantile_s: _Optional[float] = ..., predicted_ci95_s: _Optional[float] = ..., measured_quantile_s: _Optional[float] = ..., attainment: _Optional[float] = ..., samples: _Optional[int] = ..., max_wait_s: _Optional[float] = ..., margin_s: _Optional[float] = ..., correction_s: _Optional[float] = ..., stall_held_up: _Optional[int] = ..., stalled_s: _Optional[float] = ..., correction_with_stalls_s: _Optional[float] = ..., derived_bound: _Optional[str] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("model", "interval_s", "max_updates")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATES_FIELD_NUMBER: _ClassVar[int]
    model: str
    interval_s: float
    max_updates: int
    def __init__(self, model: _Optional[str] = ..., interval_s: _Optional[float] = ..., max_updates: _Optional[int] = ...) -> None: ...

class RateEstimate(_message.Message):
    __slots__ = ("rate_rps", "lo_rps", "hi_rps", "confidence", "arrivals", "span_s")
    RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    LO_RPS_FIELD_NUMBER: _ClassVar[int]
    HI_RPS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    SPAN_S_FIELD_NUMBER: _ClassVar[int]
    rate_rps: float
    lo_rps: float
    hi_rps: float
    confidence: float
    arrivals: int
    span_s: float
    def __init__(self, rate_rps: _Optional[float] = ..., lo_rps: _Optional[float] = ..., hi_rps: _Optional[float] = ..., confidence: _Optional[float] = ..., arrivals: _Optional[int] = ..., span_s: _Optional[float] = ...) -> None: ...

class Figures(_message.Message):
    __slots__ = ("mean_latency_s", "mean_power_w", "cost", "throughput_rps", "mean_batch")
    MEAN_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_POWER_W_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_RPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    mean_latency_s: float
    mean_power_w: float
    cost: float
    throughput_rps: float
    mean_batch: float
    def __init__(self, mean_latency_s: _Optional[float] = ..., mean_power_w: _Optional[float] = ..., cost: _Optional[float] = ..., throughput_rps: _Optional[float] = ..., mean_batch: _Optional[float] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "rate", "weight", "latency_target_s", "policy_version", "policy_age_s", "policy_source", "threshold", "max_batch", "predicted", "predicted_rate_rps", "measured", "batch_histogram", "queue_length", "in_flight", "completed", "rejected", "failed", "solver_reachable", "power_modelled", "note", "service_times", "profile_updates", "profile_batches", "profile_learning", "rejected_expired", "rejected_invalid", "slo", "instances", "batch_mean_s", "dispatch_lag", "devices")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_AGE_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    BATCH_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SOLVER_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    POWER_MODELLED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIMES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_LEARNING_FIELD_NUMBER: _ClassVar[int]
    REJECTED_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_INVALID_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_LAG_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    model: str
    rate: RateEstimate
    weight: float
    latency_target_s: float
    policy_version: int
    policy_age_s: float
    policy_source: str
    threshold: int
    max_batch: int
    predicted: Figures
    predicted_rate_rps: float
    measured: Figures
    batch_histogram: _containers.RepeatedScalarFieldContainer[int]
    queue_length: int
    in_flight: int
    completed: int
    rejected: int
    failed: int
    solver_reachable: bool
    power_modelled: bool
    note: str
    service_times: _containers.RepeatedCompositeFieldContainer[ServiceTime]
    profile_updates: int
    profile_batches: int
    profile_learning: bool
    rejected_expired: int
    rejected_invalid: int
    slo: SloStatus
    instances: int
    batch_mean_s: _containers.RepeatedScalarFieldContainer[float]
    dispatch_lag: DispatchLag
    devices: int
    def __init__(self, model: _Optional[str] = ..., rate: _Optional[_Union[RateEstimate, _Mapping]] = ..., weight: _Optional[float] = ..., latency_target_s: _Optional[float] = ..., policy_version: _Optional[int] = ..., policy_age_s: _Optional[float] = ..., policy_source: _Optional[str] = ..., threshold: _Optional[int] = ..., max_batch: _Optional[int] = ..., predicted: _Optional[_Union[Figures, _Mapping]] = ..., predicted_rate_rps: _Optional[float] = ..., measured: _Optional[_Union[Figures, _Mapping]] = ..., batch_histogram: _Optional[_Iterable[int]] = ..., queue_length: _Optional[int] = ..., in_flight: _Optional[int] = ..., completed: _Optional[int] = ..., rejected: _Optional[int] = ..., failed: _Optional[int] = ..., solver_reachable: _Optional[bool] = ..., power_modelled: _Optional[bool] = ..., note: _Optional[str] = ..., service_times: _Optional[_Iterable[_Union[ServiceTime, _Mapping]]] = ..., profile_updates: _Optional[int] = ..., profile_batches: _Optional[int] = ..., profile_learning: _Optional[bool] = ..., rejected_expired: _Optional[int] = ..., rejected_invalid: _Optional[int] = ..., slo: _Optional[_Union[SloStatus, _Mapping]] = ..., instances: _Optional[int] = ..., batch_mean_s: _Optional[_Iterable[float]] = ..., dispatch_lag: _Optional[_Union[DispatchLag, _Mapping]] = ..., devices: _Optional[int] = ...) -> None: ...

class DispatchLag(_message.Message):
    __slots__ = ("batches", "mean_s")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEAN_S_FIELD_NUMBER: _ClassVar[int]
    batches: int
    mean_s: float
    def __init__(self, batches: _Optional[int] = ..., mean_s: _Optional[float] = ...) -> None: ...

class ServiceTime(_message.Message):
    __slots__ = ("batch_size", "samples", "mean_s", "ci_s", "prior_s", "in_force_s", "triton_compute_s", "triton_batches")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MEAN_S_FIELD_NUMBER: _ClassVar[int]
    CI_S_FIELD_NUMBER: _ClassVar[int]
    PRIOR_S_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_S_FIELD_NUMBER: _ClassVar[int]
    TRITON_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    TRITON_BATCHES_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    samples: int
    mean_s: float
    ci_s: float
    prior_s: float
    in_force_s: float
    triton_compute_s: float
    triton_batches: int
    def __init__(self, batch_size: _Optional[int] = ..., samples: _Optional[int] = ..., mean_s: _Optional[float] = ..., ci_s: _Optional[float] = ..., prior_s: _Optional[float] = ..., in_force_s: _Optional[float] = ..., triton_compute_s: _Optional[float] = ..., triton_batches: _Optional[int] = ...) -> None: ...

class PolicyReply(_message.Message):
    __slots__ = ("model", "actions", "max_batch", "version", "age_s", "source", "threshold", "busy_tables", "group_hold_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BUSY_TABLES_FIELD_NUMBER: _ClassVar[int]
    GROUP_HOLD_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    actions: _containers.RepeatedScalarFieldContainer[int]
    max_batch: int
    version: int
    age_s: float
    source: str
    threshold: int
    busy_tables: _containers.RepeatedCompositeFieldContainer[BusyRow]
    group_hold_s: float
    def __init__(self, model: _Optional[str] = ..., actions: _Optional[_Iterable[int]] = ..., max_batch: _Optional[int] = ..., version: _Optional[int] = ..., age_s: _Optional[float] = ..., source: _Optional[str] = ..., threshold: _Optional[int] = ..., busy_tables: _Optional[_Iterable[_Union[BusyRow, _Mapping]]] = ..., group_hold_s: _Optional[float] = ...) -> None: ...

class BusyRow(_message.Message):
    __slots__ = ("actions",)
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, actions: _Optional[_Iterable[int]] = ...) -> None: ...
