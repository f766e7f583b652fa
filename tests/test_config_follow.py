"""Config mode's closed loop: the rate from polled request counts, when to re-compile, the loop."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from plugin.config_mode.follow import FollowLoop, RateFollower, request_count
from plugin.loop.rate import RateEstimator


def poisson_times(segments: list[tuple[float, float]], rng: int = 0) -> np.ndarray:
    """Arrival times of a piecewise-constant Poisson process: [(duration s, rate/s), ...]."""
    gen = np.random.default_rng(rng)
    out, start = [], 0.0
    for duration, rate in segments:
        n = gen.poisson(rate * duration)
        out.append(np.sort(start + gen.uniform(0.0, duration, n)))
        start += duration
    return np.concatenate(out)


def counts_at(times: np.ndarray, polls: np.ndarray) -> np.ndarray:
    return np.searchsorted(times, polls, side="right")


def drive(follower: RateFollower, polls: np.ndarray, counts: np.ndarray, offset: int = 0):
    """Feed the samples; a request is compiled at once. Returns [(poll index, request)]."""
    asked = []
    for i, (t, c) in enumerate(zip(polls, counts)):
        req = follower.sample(float(t), int(c) + offset)
        if req is not None:
            asked.append((i, req))
            follower.compiled(req.rate, float(t))
    return asked


def test_a_x3_step_asks_for_one_recompile_at_the_new_rate_within_a_few_polls():
    for seed in range(5):
        step_at = 60.37  # mid-interval: the first interval after the step mixes both rates
        times = poisson_times([(step_at, 100.0), (60.0, 300.0)], rng=seed)
        polls = np.arange(0.0, 120.0, 1.0)
        asked = drive(RateFollower(window_s=30.0, settle_s=3.0), polls, counts_at(times, polls))
        first = [(i, r) for i, r in asked if polls[i] < step_at]
        after = [(i, r) for i, r in asked if polls[i] >= step_at]
        assert len(first) == 1 and first[0][1].reason == "first"
        assert first[0][1].rate == pytest.approx(100.0, rel=0.2)
        assert len(after) == 1, [(polls[i], r.rate, r.reason) for i, r in after]
        i, req = after[0]
        assert req.reason == "up"
        assert polls[i] - step_at <= 6.0  # detection within a poll or two, then settle_s of new data
        assert req.rate == pytest.approx(300.0, rel=0.2)


def test_a_step_down_is_followed_too():
    times = poisson_times([(40.0, 300.0), (60.0, 100.0)], rng=7)
    polls = np.arange(0.0, 100.0, 1.0)
    asked = drive(RateFollower(), polls, counts_at(times, polls))
    assert [r.reason for _, r in asked] == ["first", "down"]
    assert asked[1][1].rate == pytest.approx(100.0, rel=0.2) and polls[asked[1][0]] - 40.0 <= 6.0


def test_steady_noise_never_asks_again():
    for seed in range(5):
        times = poisson_times([(900.0, 100.0)], rng=100 + seed)
        polls = np.arange(0.0, 900.0, 1.0)
        asked = drive(RateFollower(), polls, counts_at(times, polls))
        assert [r.reason for _, r in asked] == ["first"]
    # also at a low rate, where the window holds few arrivals
    times = poisson_times([(900.0, 5.0)], rng=11)
    polls = np.arange(0.0, 900.0, 0.5)
    assert len(drive(RateFollower(), polls, counts_at(times, polls))) == 1


def test_a_counter_restart_is_not_a_bogus_rate():
    times = poisson_times([(120.0, 100.0)], rng=3)
    polls = np.arange(0.0, 120.0, 1.0)
    counts = counts_at(times, polls)
    # Triton ran for a while before (a large baseline), then reloads at t = 50.4: the counter restarts
    # at zero, and the requests the old model served during the 1.4 s swap are lost to it
    restart = 51.8
    seen = np.where(polls < restart, counts + 5000, counts - counts_at(times, np.array([restart]))[0])
    f = RateFollower()
    asked, rates = [], []
    for t, c in zip(polls, seen):
        req = f.sample(float(t), int(c))
        if req is not None:
            asked.append(req)
            f.compiled(req.rate, float(t))
        if t > 5:
            rates.append(f.estimate(float(t)).rate)
    assert f.resets == 1
    assert [r.reason for r in asked] == ["first"]
    assert min(rates) > 80 and max(rates) < 120
    # a restart the caller knows of (it reloaded) is taken as one even when the count grew
    g = RateFollower()
    for t in range(0, 20):
        g.sample(float(t), 10 * t)
    g.sample(20.0, 200, restarted=True)  # 200 since the restart, not 200 - 190 = 10
    assert g.resets == 1 and g.estimate(20.0).rate == pytest.approx((190 + 200) / 20.0)


def test_no_request_while_one_is_in_flight_and_a_failed_compile_is_retried_later():
    f = RateFollower(settle_s=2.0)
    reqs = [f.sample(float(t), 100 * t) for t in range(0, 10)]
    first = [r for r in reqs if r is not None]
    assert len(first) == 1 and f.in_flight is first[0]
    f.failed(10.0)
    assert f.sample(10.5, 1050) is None  # retry after settle_s
    assert f.sample(12.5, 1250) is not None


def test_the_rate_asked_for_is_clamped_to_the_solvable_range():
    f = RateFollower(max_rate=150.0, settle_s=1.0)
    req = next(r for t in range(10) if (r := f.sample(float(t), 1000 * t)) is not None)
    assert req.rate == 150.0
    f.compiled(req.rate, 5.0)
    # the load stays above max_rate: the detector fires but the clamped rate is the one in force
    assert all(f.sample(float(t), 1000 * t) is None for t in range(6, 60))


def test_observe_count_matches_the_per_arrival_estimate():
    times = poisson_times([(40.0, 200.0)], rng=5)
    a = RateEstimator(0.0, window_s=10.0, buckets=20)
    b = RateEstimator(0.0, window_s=10.0, buckets=20)
    for t in times:
        a.observe(float(t))
    polls = np.arange(0.8, 40.01, 0.8)  # the last poll at 40 s, after every arrival
    prev = 0
    for t, c in zip(polls, counts_at(times, polls)):
        b.observe_count(float(t), int(c - prev))
        prev = c
    ea, eb = a.estimate(40.0), b.estimate(40.0)
    assert eb.rate == pytest.approx(ea.rate, rel=0.03)
    assert eb.span_s == pytest.approx(ea.span_s)
    with pytest.raises(ValueError, match="count"):
        b.observe_count(50.0, -1)
    with pytest.raises(ValueError, match="before"):
        b.observe_count(1.0, 3)


def test_request_count_sums_the_models_versions():
    stats = {"model_stats": [
        {"name": "m", "version": "1", "inference_stats": {"success": {"count": "120", "ns": "5"}}},
        {"name": "m", "version": "2", "inference_stats": {"success": {"count": "3"}}},
        {"name": "other", "version": "1", "inference_stats": {"success": {"count": "999"}}},
        {"name": "m", "version": "3", "inference_stats": {"success": {}}},
    ]}
    assert request_count(stats, "m") == 123
    assert request_count({"model_stats": []}, "m") == 0


# ------------------------------------------------------------------------------------------------
# The loop, with a fake Triton


@dataclass
class FakeTriton:
    """A request counter that runs at ``rate`` and restarts at zero when a config is applied."""

    rate: float = 400.0
    started: float = 0.0
    applied: list = None
    reload_s: float = 0.05

    def __post_init__(self):
        self.started = time.monotonic()
        self.applied = []
        self._base = 0.0
        self._lock = threading.Lock()

    def count(self) -> int:
        with self._lock:
            return int(self._base + self.rate * (time.monotonic() - self.started))

    def set_rate(self, rate: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._base += self.rate * (now - self.started)
            self.started, self.rate = now, rate

    # the applier's interface
    pending = None

    def submit(self, settings):
        time.sleep(self.reload_s)
        with self._lock:
            self._base, self.started = 0.0, time.monotonic()  # Triton's statistics restart
        self.applied.append(settings)
        return SimpleNamespace(status="applied", settings=settings, reload_s=self.reload_s)

    def poll(self):
        return None


def fake_compile(rate: float):
    from plugin.config_mode.compiler import DynamicBatchingSettings

    return SimpleNamespace(settings=DynamicBatchingSettings((min(int(rate // 100), 127), 128), 1000, 128),
                           smdp_predicted=SimpleNamespace(cost=1.0 / rate),
                           compiled_simulated=SimpleNamespace(cost=1.1 / rate))


def test_the_loop_follows_a_step_and_stops_cleanly():
    triton = FakeTriton(rate=400.0)
    logs: list[str] = []
    follower = RateFollower(window_s=2.0, buckets=20, settle_s=0.3, min_arrivals=20)
    loop = FollowLoop(follower, triton.count, fake_compile, triton, poll_s=0.05, log=logs.append)
    stop = threading.Event()
    th = threading.Thread(target=loop.run, args=(stop,))
    th.start()
    try:
        deadline = time.monotonic() + 10
        while not triton.applied and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.8)  # steady: nothing more
        assert len(triton.applied) == 1
        triton.set_rate(1200.0)
        while len(triton.applied) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        time.sleep(0.8)
    finally:
        stop.set()
        th.join(10)
    assert not th.is_alive()
    assert [c.status for c in loop.changes] == ["applied", "applied"], logs
    assert loop.changes[0].rate == pytest.approx(400.0, rel=0.25)
    assert loop.changes[1].rate == pytest.approx(1200.0, rel=0.25) and loop.changes[1].reason == "up"
    assert follower.resets >= 2  # every reload restarted the counter; no bogus rate came of it
    assert len(triton.applied) == 2
    assert all(math.isfinite(r) and r < 2000 for _, _, r in loop.samples)
    assert any("rate 1" in line and "predicted J" in line for line in logs)


# ------------------------------------------------------------------------------------------------
# The command against a real Triton

FOLLOW_LINE = re.compile(r"config-follow: rate ([0-9.]+)/s \((\w+);.*preferred_batch_size \[([0-9, -]+)\], "
                         r"max_queue_delay_microseconds (\d+); .*: (\w+)")


def _sizes(ranges: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in ranges.split(","):
        a, _, b = part.strip().partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return tuple(out)


@pytest.mark.integration
def test_follow_recompiles_for_a_x3_load_on_a_real_triton(triton_factory, tmp_path):
    """Low Poisson load, then three times more, straight at Triton while ``smdp config-mode
    --follow`` runs: the model ends up with the settings compiled for the higher rate, and no
    request fails across the reloads."""
    import tritonclient.grpc as grpcclient

    from loadtest.openloop import run_open_loop
    from loadtest.stack import scaled_profile, write_profile_csv
    from loadtest.triton_control import BatchingOverride, ModelConfigControl
    from plugin.config_mode.follow import policy_compiler
    from plugin.config_mode.compiler import DynamicBatchingSettings, settings_from_config
    from solver.model import ServiceProfile

    scale, weight, low, high = 10.0, 1e-3, 20.0, 60.0
    server = triton_factory(models=("emulated_gpu",))
    url, model = server.grpc_url, "emulated_gpu"
    control = ModelConfigControl(url, model)
    control.apply(BatchingOverride(time_scale=scale))  # the emulated GPU 10x slower: real loads at low rates
    control.close()
    profile = scaled_profile(ServiceProfile.from_csv(Path("profiles/v100_resnet50.csv")).truncated(128), scale)
    csv = write_profile_csv(profile, tmp_path / "profile.csv")
    log_path = tmp_path / "follow.log"
    cmd = [sys.executable, "-m", "smdp.cli", "config-mode", "--follow", "--triton", url, "--model", model,
           "--profile", str(csv), "--weight", str(weight), "--poll-s", "0.5", "--min-interval", "2",
           "--window", "6", "--settle", "2", "--verbose"]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while "following" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        times = poisson_times([(9.0, low), (13.0, high)], rng=1)
        res = run_open_loop(url, model, times, timeout_s=30.0, drain_grace_s=5.0)
        assert res.n_failed == 0, res.failures()
        # the follower may still be reloading for the last change: give it a moment
        end = time.monotonic() + 10
        while time.monotonic() < end:
            applied = [m for m in FOLLOW_LINE.finditer(log_path.read_text()) if m.group(5) == "applied"]
            if applied and float(applied[-1].group(1)) > 1.5 * low:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    text = log_path.read_text()
    assert rc == 0, text
    assert "SIGTERM: stopping" in text and "config-follow: stopped after" in text
    changes = [(float(m.group(1)), m.group(2), DynamicBatchingSettings(_sizes(m.group(3)), int(m.group(4)), 128),
                m.group(5)) for m in FOLLOW_LINE.finditer(text)]
    applied = [c for c in changes if c[3] == "applied"]
    assert applied, text
    first, last = applied[0], applied[-1]
    assert first[0] == pytest.approx(low, rel=0.35), text
    assert last[0] == pytest.approx(high, rel=0.3), text
    assert last[2] != first[2], text
    # Triton runs what was compiled for the higher rate ...
    client = grpcclient.InferenceServerClient(url)
    try:
        cfg = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    assert settings_from_config(cfg) == last[2]
    assert cfg["parameters"]["time_scale"]["string_value"] == repr(scale)  # the rest of the config stayed
    # ... which is what compiling at that rate gives (the delay is chosen by simulation: sizes only)
    again = policy_compiler(profile, 128, weight=weight, idle_power_w=40.0)(last[0])
    assert again.settings.preferred_batch_size == last[2].preferred_batch_size


def test_cli_follow_argument_errors(capsys):
    import argparse

    from plugin.config_mode.cli import add_config_mode_command

    def cli(argv):
        parser = argparse.ArgumentParser()
        add_config_mode_command(parser.add_subparsers())
        args = parser.parse_args(["config-mode", "--model", "m", "--profile", "profiles/v100_resnet50.csv", *argv])
        return args.func(args)

    assert cli(["--follow"]) == 2
    assert "--follow needs --triton" in capsys.readouterr().err
    assert cli(["--dry-run"]) == 2
    assert "--rate is required unless --follow" in capsys.readouterr().err
