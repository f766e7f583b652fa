"""Config mode: Triton's batching rule, compiling a policy into it, and reloading a real Triton."""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import pytest

from plugin.config_mode.compiler import (
    ConfigModeApplier,
    ConfigModeError,
    DynamicBatchingSettings,
    ReloadThrottle,
    TritonBatcherRule,
    compile_policy,
    merge_settings,
    preferred_sizes_for,
    settings_from_config,
    size_ranges,
)
from solver import arrivals
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import PolicyTable, TimeoutRule, greedy, static, threshold
from solver.simulate import simulate
from solver.smdp import solve

V100 = ServiceProfile.from_table(
    [1, 2, 4, 8, 16, 32, 64, 128],
    [0.0021, 0.0023, 0.0025, 0.0030, 0.0041, 0.0062, 0.0109, 0.0204],
    [0.252, 0.29, 0.35, 0.47, 0.72, 1.23, 2.27, 5.81],
)
"""Close to profiles/v100_resnet50.csv, kept here so the numbers do not move with that file."""


# ------------------------------------------------------------------------------------------------
# Triton's rule


class TestTritonBatcherRule:
    """Cases worked out by hand from GetDynamicBatch in Triton's dynamic_batch_scheduler.cc."""

    rule = TritonBatcherRule(8, (4, 6), 0.010)

    def test_waits_below_the_smallest_preferred_size_until_the_delay(self):
        d = self.rule.decide(3, 0.004)
        assert d.serve == 0
        assert d.recheck_after_s == pytest.approx(0.006)
        assert self.rule.decide(0, 1.0).serve == 0

    def test_serves_the_largest_preferred_size_not_above_n(self):
        assert [self.rule.decide(n, 0.0).serve for n in range(4, 12)] == [4, 4, 6, 6, 6, 6, 6, 6]

    def test_delay_expiry_serves_everything_up_to_max_batch(self):
        assert [self.rule.decide(n, 0.010).serve for n in (1, 3, 5, 7, 12)] == [1, 3, 5, 7, 8]

    def test_zero_delay_never_holds_a_request(self):
        r = TritonBatcherRule(8, (4, 6), 0.0)
        assert [r.decide(n, 0.0).serve for n in (1, 3, 4, 5, 7, 20)] == [1, 3, 4, 4, 6, 6]

    def test_only_max_batch_preferred_is_tritons_timeout_rule(self):
        triton = TritonBatcherRule(16, (16,), 0.003)
        timeout = TimeoutRule(16, 0.003)
        for n in range(0, 40):
            for age in (0.0, 0.001, 0.0029999, 0.003, 0.05):
                assert triton.decide(n, age).serve == timeout.decide(n, age).serve

    def test_simulated_like_timeout_rule_on_common_random_numbers(self):
        prof = V100.truncated(16)
        t = arrivals.poisson(900.0, n=20_000, rng=3)
        a = simulate(prof, TritonBatcherRule(16, (16,), 0.004), t, idle_power_w=40, weight=1e-4, seed=5)
        b = simulate(prof, TimeoutRule(16, 0.004), t, idle_power_w=40, weight=1e-4, seed=5)
        assert a.batch_hist == b.batch_hist
        assert a.cost == pytest.approx(b.cost, rel=1e-12)

    @pytest.mark.parametrize("kwargs, match", [
        ({"max_batch": 0, "preferred": (1,), "delay_s": 0.0}, "max_batch"),
        ({"max_batch": 8, "preferred": (), "delay_s": 0.0}, "preferred"),
        ({"max_batch": 8, "preferred": (9,), "delay_s": 0.0}, "preferred"),
        ({"max_batch": 8, "preferred": (2,), "delay_s": -1.0}, "delay"),
        ({"max_batch": 8, "preferred": (2,), "delay_s": float("inf")}, "delay"),
    ])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            TritonBatcherRule(**kwargs)


class TestSettings:
    def test_rule_of_settings(self):
        assert DynamicBatchingSettings((32,), 2500, 32).rule() == TimeoutRule(32, 0.0025)
        r = DynamicBatchingSettings((4, 8, 32), 100, 32).rule()
        assert isinstance(r, TritonBatcherRule) and r.preferred == (4, 8, 32) and r.delay_s == pytest.approx(1e-4)

    @pytest.mark.parametrize("args, match", [
        (((), 0, 8), "at least one size"),
        (((0, 4), 0, 8), "preferred batch size 0"),
        (((4, 9), 0, 8), "preferred batch size 9"),
        (((4, 2), 0, 8), "increasing"),
        (((2, 2), 0, 8), "increasing"),
        (((2,), -1, 8), "max_queue_delay_microseconds"),
        (((2,), 0.5, 8), "max_queue_delay_microseconds"),
        (((2,), 0, 0), "max_batch_size"),
    ])
    def test_validation_names_the_bad_value(self, args, match):
        with pytest.raises(ValueError, match=match):
            DynamicBatchingSettings(*args)

    def test_size_ranges(self):
        assert size_ranges([1, 2, 3, 5, 8, 9, 128]) == "[1-3, 5, 8-9, 128]"
        assert size_ranges([7]) == "[7]"


# ------------------------------------------------------------------------------------------------
# Mapping a policy to preferred sizes


def test_control_limit_policy_is_preferred_sizes_from_k_to_b_exactly():
    table = threshold(32, 6, truncation=80)
    prefs, mism = preferred_sizes_for(table)
    assert prefs == tuple(range(6, 33))
    assert mism == ()
    rule = TritonBatcherRule(32, prefs, 10.0)
    for n in range(0, 200):
        assert rule.decide(n, 0.5).serve == table.action(n)


def test_static_and_greedy_tables_are_representable():
    assert preferred_sizes_for(static(16, 16, truncation=40)) == ((16,), ())
    assert preferred_sizes_for(greedy(16, truncation=40)) == (tuple(range(1, 17)), ())
    # static b0 < B serves b0 beyond its table too, exactly what Triton does with P = {b0}
    assert preferred_sizes_for(static(32, 12, truncation=60)) == ((12,), ())
    # a table that switches to full batches past n = 32 is reproduced by adding B to P
    a = np.where(np.arange(61) >= 32, 32, np.where(np.arange(61) >= 12, 12, 0))
    assert preferred_sizes_for(PolicyTable(a, 32)) == ((12, 32), ())


def test_a_table_serving_less_than_n_is_reported_inexact():
    # serves 4 at n = 4 and 5 (keeping one back at 5), 5 at n = 6: Triton would serve 5 at n = 5
    a = np.array([0, 0, 0, 0, 4, 4, 5, 7, 8] + [8] * 10)
    prefs, mism = preferred_sizes_for(PolicyTable(a, 8))
    assert prefs == (4, 5, 7, 8)
    assert mism == (5,)


# ------------------------------------------------------------------------------------------------
# Compiling with simulation


def test_compiled_threshold_policy_converges_to_the_table_as_the_delay_grows():
    prof = V100.truncated(32)
    model = BatchingModel(600.0, 32, prof, idle_power_w=40.0, weight=1e-3)
    table = threshold(32, 8, truncation=120)
    c = compile_policy(table, prof, 600.0, idle_power_w=40.0, weight=1e-3, n_requests=20_000, seed=1)
    assert c.exact and c.mismatched_states == ()
    assert c.preferred_batch_size == tuple(range(8, 33)) and c.max_batch_size == 32
    # a zero delay makes Triton serve at once: greedy, whatever the preferred sizes
    t = arrivals.poisson(600.0, n=20_000, rng=1)  # the arrivals compile_policy draws for this seed
    greedy_sim = simulate(prof, greedy(32), t, idle_power_w=40.0, weight=1e-3, seed=1, warmup=float(t[1000]))
    assert c.delay_curve[0][0] == 0.0
    assert c.delay_curve[0][1] == pytest.approx(greedy_sim.cost, rel=1e-12)
    # the longest delay tried leaves the threshold rule untouched, bar the final drain
    assert c.delay_curve[-1][1] == pytest.approx(c.smdp_simulated.cost, rel=3e-3)
    # the chosen delay is within rtol of the best delay, and far from greedy here
    assert abs(c.relative_gap) < 0.01
    assert c.compiled_simulated.cost < 0.9 * c.delay_curve[0][1]
    # and the table's simulation agrees with its exact evaluation
    pred = c.smdp_predicted
    assert pred.cost == pytest.approx(c.smdp_simulated.cost, abs=3 * c.smdp_simulated.cost_ci95)
    assert pred.cost == pytest.approx(pred.mean_latency_s + model.weight * pred.mean_power_w)


def test_compiled_smdp_policy_beats_the_plain_timeout_rule():
    prof = V100
    model = BatchingModel(1000.0, 128, prof, idle_power_w=40.0, weight=1e-3)
    result = solve(model)
    kw = dict(idle_power_w=40.0, weight=1e-3, n_requests=30_000, seed=2)
    pref = compile_policy(result, prof, 1000.0, **kw)
    tout = compile_policy(result, prof, 1000.0, style="timeout", **kw)
    assert tout.preferred_batch_size == (128,)
    # both simulated on the same arrivals and service times, so the table's J is common
    assert pref.smdp_simulated.cost == tout.smdp_simulated.cost
    assert pref.smdp_predicted.cost == pytest.approx(result.gain, rel=1e-9)
    assert pref.relative_gap < 0.02
    assert pref.compiled_simulated.cost < tout.compiled_simulated.cost
    assert tout.compiled_simulated.cost == pytest.approx(min(j for _, j in tout.delay_curve), rel=5e-3)
    # the timeout rule cannot beat the SMDP table (it is optimal among all rules for Poisson arrivals)
    assert tout.compiled_simulated.cost > pref.smdp_simulated.cost - 2 * pref.smdp_simulated.cost_ci95


@pytest.mark.parametrize("kwargs, match", [
    ({"style": "fast"}, "style"),
    ({"n_requests": 10}, "n_requests"),
    ({"delays_us": []}, "delays_us"),
    ({"delays_us": [-5]}, "max_queue_delay_microseconds"),
    ({"rate": 1e6}, "capacity"),
])
def test_compile_rejects_bad_input(kwargs, match):
    args = dict(idle_power_w=40.0, weight=1e-4, n_requests=2000)
    rate = kwargs.pop("rate", 500.0)
    args.update(kwargs)
    with pytest.raises((ModelError, ValueError), match=match):
        compile_policy(threshold(8, 2), V100, rate, **args)


def test_compile_rejects_a_profile_smaller_than_b():
    with pytest.raises(ModelError, match="exceeds the profile"):
        compile_policy(threshold(64, 2), V100.truncated(32), 100.0, idle_power_w=40.0, weight=0.0)
    with pytest.raises(ModelError, match="PolicyTable"):
        compile_policy([0, 1], V100, 100.0, idle_power_w=40.0, weight=0.0)


# ------------------------------------------------------------------------------------------------
# Config JSON

TRITON_JSON = {
    "name": "emulated_gpu",
    "max_batch_size": 128,
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": ["16"]}],
    "dynamic_batching": {
        "preferred_batch_size": [128],
        "priority_levels": "2",
        "default_priority_level": "2",
        "default_queue_policy": {"default_timeout_microseconds": "30000000", "allow_timeout_override": True,
                                 "max_queue_size": 4096},
    },
    "parameters": {"time_scale": {"string_value": "1"}},
    "backend": "python",
}
"""As ``get_model_config(as_json=True)`` returns it (a zero delay is omitted, 64-bit ints are strings)."""


def test_settings_read_from_tritons_json():
    assert settings_from_config(TRITON_JSON) == DynamicBatchingSettings((128,), 0, 128)
    no_prefs = json.loads(json.dumps(TRITON_JSON))
    del no_prefs["dynamic_batching"]["preferred_batch_size"]
    no_prefs["dynamic_batching"]["max_queue_delay_microseconds"] = "2500"
    assert settings_from_config(no_prefs) == DynamicBatchingSettings((128,), 2500, 128)
    assert settings_from_config({"max_batch_size": 8}) is None


def test_merge_changes_only_the_two_batching_fields():
    new = DynamicBatchingSettings((8, 16, 128), 4200, 128)
    merged = merge_settings(TRITON_JSON, new)
    assert settings_from_config(merged) == new
    assert merged["dynamic_batching"]["max_queue_delay_microseconds"] == "4200"
    for key in ("priority_levels", "default_priority_level", "default_queue_policy"):
        assert merged["dynamic_batching"][key] == TRITON_JSON["dynamic_batching"][key]
    rest = {k: v for k, v in merged.items() if k != "dynamic_batching"}
    assert rest == {k: v for k, v in TRITON_JSON.items() if k != "dynamic_batching"}
    assert TRITON_JSON["dynamic_batching"]["preferred_batch_size"] == [128]  # input untouched


def test_merge_refuses_another_max_batch_and_non_batching_models():
    with pytest.raises(ConfigModeError, match="max_batch_size 128 but the policy was compiled for B = 64") as e:
        merge_settings(TRITON_JSON, DynamicBatchingSettings((64,), 0, 64))
    assert not e.value.retryable
    with pytest.raises(ConfigModeError, match="does not batch"):
        merge_settings({"name": "x", "max_batch_size": 0}, DynamicBatchingSettings((1,), 0, 1))


# ------------------------------------------------------------------------------------------------
# Rate limiting (pure)


def test_throttle_allows_one_reload_per_interval_and_keeps_the_newest():
    th: ReloadThrottle[str] = ReloadThrottle(30.0)
    assert th.allowed(0.0)
    th.reloaded(0.0)
    th.hold("a")
    th.hold("b")
    assert th.take(29.9) is None and th.pending == "b"
    assert th.allowed_at() == 30.0
    assert th.take(30.0) == "b" and th.pending is None
    assert th.take(31.0) is None
    with pytest.raises(ValueError, match="min_interval_s"):
        ReloadThrottle(-1.0)


# ------------------------------------------------------------------------------------------------
# A real Triton


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _inputs(rows: int = 1):
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput("INPUT0", [rows, 16], "FP32")
    x.set_data_from_numpy(np.ones((rows, 16), dtype=np.float32))
    return [x]


def _batch_counts(client, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def _groups(url: str, model: str, group: int, repeats: int) -> tuple[list[float], list[int]]:
    """Send ``repeats`` groups of ``group`` concurrent requests; latency of each group, batch sizes seen."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    latencies, sizes = [], []
    try:
        for _ in range(repeats):
            done = threading.Semaphore(0)
            results = []

            def cb(result, error, results=results, done=done):
                results.append((result, error))
                done.release()

            t0 = time.perf_counter()
            for _ in range(group):
                client.async_infer(model, _inputs(), cb)
            for _ in range(group):
                assert done.acquire(timeout=30)
            latencies.append(time.perf_counter() - t0)
            for result, error in results:
                assert error is None, error
                sizes.append(int(result.as_numpy("BATCH_SIZE")[0, 0]))
            time.sleep(0.05)
    finally:
        client.close()
    return latencies, sizes


@pytest.mark.integration
@pytest.mark.slow
def test_applier_on_a_real_triton(triton_factory):
    import tritonclient.grpc as grpcclient

    server = triton_factory(models=("emulated_gpu",))
    url, model = server.grpc_url, "emulated_gpu"
    client = grpcclient.InferenceServerClient(url)
    clock = FakeClock()
    applier = ConfigModeApplier(url, model, min_interval_s=30.0, clock=clock)
    try:
        original = client.get_model_config(model, as_json=True)["config"]
        assert applier.current_settings() == DynamicBatchingSettings((128,), 0, 128)

        # 1. a reload under a steady stream of requests: every request succeeds
        stop = threading.Event()
        ok, errors, stamps = [], [], []

        def stream():
            c = grpcclient.InferenceServerClient(url)
            try:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        c.infer(model, _inputs())
                        ok.append(1)
                    except Exception as exc:  # every failure is counted, not raised in the thread
                        errors.append(str(exc))
                    stamps.append((t0, time.perf_counter()))
            finally:
                c.close()

        worker = threading.Thread(target=stream)
        worker.start()
        try:
            time.sleep(0.3)
            first = DynamicBatchingSettings((4, 8, 128), 20_000, 128)
            began = time.perf_counter()
            out = applier.submit(first)
            ended = time.perf_counter()
            time.sleep(0.3)
        finally:
            stop.set()
            worker.join(30)
        assert out.status == "applied" and out.reload_s > 0
        assert errors == []
        assert len(ok) >= 10
        assert any(began <= s <= ended for s, _ in stamps), "no request was sent during the reload"
        cfg = client.get_model_config(model, as_json=True)["config"]
        assert settings_from_config(cfg) == first
        # everything but the two fields survived the reload
        assert cfg["dynamic_batching"]["priority_levels"] == original["dynamic_batching"]["priority_levels"]
        assert cfg["dynamic_batching"]["default_queue_policy"] == original["dynamic_batching"]["default_queue_policy"]
        assert cfg["parameters"] == original["parameters"]

        # 2. rate limit with the injected clock: held, replaced by a newer one, applied when allowed
        second = DynamicBatchingSettings((128,), 100_000, 128)
        third = DynamicBatchingSettings((3, 128), 2_000_000, 128)
        clock.now += 5
        assert applier.submit(second).status == "pending"
        clock.now += 5
        held = applier.submit(third)
        assert held.status == "pending" and held.due_at == pytest.approx(1030.0)
        assert applier.pending == third
        clock.now = 1029.0
        assert applier.poll() is None
        assert settings_from_config(client.get_model_config(model, as_json=True)["config"]) == first
        assert applier.reloads == 1
        assert applier.submit(second).status == "pending"  # the newest wins again

        # 3. a pure timeout rule (P = {B}, 100 ms): groups of 3 wait the delay, then run as one batch
        clock.now = 1030.0
        assert applier.poll().status == "applied"
        assert applier.pending is None
        before = _batch_counts(client, model)  # after the reload: the new model's statistics start afresh
        assert settings_from_config(client.get_model_config(model, as_json=True)["config"]) == second
        lat, sizes = _groups(url, model, group=3, repeats=4)
        after = _batch_counts(client, model)
        assert sizes == [3] * 12
        assert after.get(3, 0) - before.get(3, 0) == 4
        assert sum(after.values()) - sum(before.values()) == 4
        assert min(lat) >= 0.095, lat  # the delay, not a preferred size, released them
        assert max(lat) < 1.0, lat

        # 4. preferred sizes {3, B} with a 2 s delay: a group of 3 goes at once, a pair waits 2 s
        clock.now = 1061.0
        assert applier.submit(third).status == "applied"
        before = _batch_counts(client, model)
        lat, sizes = _groups(url, model, group=3, repeats=3)
        assert sizes == [3] * 9 and max(lat) < 1.0, lat
        lat2, sizes2 = _groups(url, model, group=2, repeats=1)
        assert sizes2 == [2, 2] and lat2[0] >= 1.95, lat2
        after = _batch_counts(client, model)
        assert after.get(3, 0) - before.get(3, 0) == 3 and after.get(2, 0) - before.get(2, 0) == 1

        # 5. the same settings again: no reload
        clock.now = 1200.0
        assert applier.submit(third).status == "unchanged"
        assert applier.reloads == 3
    finally:
        applier.close()
        client.close()


@pytest.mark.integration
def test_applier_errors_name_the_model_and_cause(triton):
    with ConfigModeApplier(triton.grpc_url, "no_such_model") as applier:
        with pytest.raises(ConfigModeError, match="no_such_model.*(not found|unknown)"):
            applier.submit(DynamicBatchingSettings((8,), 0, 8))
        assert applier.pending is not None  # kept: a model that appears later gets it on poll
    with ConfigModeApplier(triton.grpc_url, "emulated_gpu") as applier:
        with pytest.raises(ConfigModeError, match="compiled for B = 64") as e:
            applier.submit(DynamicBatchingSettings((64,), 0, 64))
        assert not e.value.retryable and applier.pending is None and applier.reloads == 0


def _cli(argv: list[str]) -> int:
    from plugin.config_mode.cli import add_config_mode_command

    parser = argparse.ArgumentParser()
    add_config_mode_command(parser.add_subparsers())
    args = parser.parse_args(["config-mode", *argv])
    return args.func(args)


PROFILE_ARGS = ["--model", "emulated_gpu", "--profile", "profiles/v100_resnet50.csv"]


def test_cli_dry_run_prints_settings_and_costs(capsys):
    code = _cli([*PROFILE_ARGS, "--rate", "800", "--weight", "1e-3", "--idle-power", "40", "--dry-run",
                 "--requests", "20000", "--max-batch", "64", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    assert d["applied"] is None and d["settings"]["max_batch_size"] == 64
    assert d["smdp_predicted"]["cost"] == pytest.approx(d["smdp_gain"], rel=1e-9)
    assert d["compiled_simulated"]["cost"] >= d["smdp_simulated"]["cost"] * (1 - 0.01)
    DynamicBatchingSettings(tuple(d["settings"]["preferred_batch_size"]),
                            d["settings"]["max_queue_delay_microseconds"], 64)


def test_cli_errors_exit_2_with_one_line(capsys):
    assert _cli([*PROFILE_ARGS, "--rate", "1e6", "--dry-run"]) == 2
    assert "capacity" in capsys.readouterr().err
    assert _cli([*PROFILE_ARGS, "--rate", "100"]) == 2
    assert "--triton is required" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_applies_to_a_private_triton(triton_factory, capsys):
    server = triton_factory(models=("emulated_gpu",))
    code = _cli([*PROFILE_ARGS, "--triton", server.grpc_url, "--rate", "1000", "--weight", "1e-4",
                 "--requests", "20000"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "applied: model emulated_gpu reloaded" in out
    with ConfigModeApplier(server.grpc_url, "emulated_gpu") as applier:
        now = applier.current_settings()
    assert now.max_batch_size == 128 and now.preferred_batch_size[0] > 1 and now.max_queue_delay_microseconds > 0
    assert f"max_queue_delay_microseconds: {now.max_queue_delay_microseconds}" in out
