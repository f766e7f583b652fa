"""Every validation error of BatchingModel and ServiceProfile names the bad value."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from solver import BatchingModel, ModelError, ServiceProfile

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def profile(B: int = 4) -> ServiceProfile:
    return ServiceProfile.affine(B, alpha_s=1e-4, tau0_s=2e-3, beta_j=0.04, c0_j=0.15)


def model(**kw) -> BatchingModel:
    args = {"rate": 100.0, "max_batch": 4, "profile": profile(), "idle_power_w": 40.0, "weight": 1e-4}
    args.update(kw)
    return BatchingModel(**args)


def write_csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.csv"
    p.write_text(text)
    return p


# --- BatchingModel --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, -5.0, NAN, math.inf])
def test_rate_must_be_finite_positive(rate):
    with pytest.raises(ModelError, match="arrival rate"):
        model(rate=rate)


def test_rate_at_or_above_capacity_names_both_numbers():
    cap = 4 / (4e-4 + 2e-3)  # B / tau(B) = 1666.67/s
    for rate in (cap, cap * 1.2):
        with pytest.raises(ModelError) as err:
            model(rate=rate)
        msg = str(err.value)
        assert f"{rate:.6g}" in msg and f"{cap:.6g}" in msg and "capacity" in msg
    assert model(rate=cap * 0.999).load == pytest.approx(0.999)


@pytest.mark.parametrize("w", [-1e-6, NAN, math.inf])
def test_weight_must_be_finite_non_negative(w):
    with pytest.raises(ModelError, match="weight"):
        model(weight=w)


@pytest.mark.parametrize("p0", [-1.0, NAN])
def test_idle_power_must_be_finite_non_negative(p0):
    with pytest.raises(ModelError, match="idle power"):
        model(idle_power_w=p0)


@pytest.mark.parametrize("B", [0, -3, 2.5, True])
def test_max_batch_must_be_an_integer_at_least_one(B):
    with pytest.raises(ModelError, match="max_batch"):
        model(max_batch=B)


def test_max_batch_beyond_the_profile():
    with pytest.raises(ModelError, match="max_batch 8 exceeds the largest batch size in the profile \\(4\\)"):
        model(max_batch=8)


def test_model_truncates_a_larger_profile_and_with_revalidates():
    m = BatchingModel(rate=100.0, max_batch=2, profile=profile(8), idle_power_w=40.0)
    assert m.profile.max_batch == 2
    with pytest.raises(ModelError, match="arrival rate"):
        m.with_(rate=-1.0)


# --- ServiceProfile -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, values, match",
    [
        ("mean_s", [0.002, 0.0], "mean service time for batch size 2"),
        ("mean_s", [-0.002, 0.003], "mean service time for batch size 1"),
        ("mean_s", [0.002, NAN], "mean service time for batch size 2"),
        ("energy_j", [0.1, NAN], "batch energy for batch size 2"),
        ("energy_j", [-0.1, 0.2], "batch energy for batch size 1"),
        ("cv", [NAN, 0.0], "service CV for batch size 1"),
        ("cv", [0.0, -1.0], "service CV for batch size 2"),
    ],
)
def test_profile_arrays_are_checked_per_batch_size(field, values, match):
    args = {"mean_s": [0.002, 0.003], "energy_j": [0.1, 0.2], "cv": [0.0, 0.0]}
    args[field] = values
    with pytest.raises(ModelError, match=match):
        ServiceProfile(**args)


def test_profile_shapes_and_samples():
    with pytest.raises(ModelError, match="empty"):
        ServiceProfile(mean_s=[], energy_j=[], cv=[])
    with pytest.raises(ModelError, match="one entry per batch size"):
        ServiceProfile(mean_s=[0.002, 0.003], energy_j=[0.1], cv=[0.0, 0.0])
    with pytest.raises(ModelError, match="every batch size"):
        ServiceProfile(mean_s=[0.002, 0.003], energy_j=[0.1, 0.2], cv=[0, 0], samples=(np.array([0.002]),))
    with pytest.raises(ModelError, match="batch size 2 must be non-empty, finite and > 0"):
        ServiceProfile(mean_s=[0.002, 0.003], energy_j=[0.1, 0.2], cv=[0, 0],
                       samples=(np.array([0.002]), np.array([0.003, NAN])))


@pytest.mark.parametrize(
    "sizes, t, e, match",
    [
        ([1, 2, 2], [1e-3, 2e-3, 2e-3], [0.1, 0.2, 0.2], "batch size 2 appears twice"),
        ([1, 2.5], [1e-3, 2e-3], [0.1, 0.2], "integers >= 1"),
        ([0, 2], [1e-3, 2e-3], [0.1, 0.2], "integers >= 1"),
        ([2, 4], [1e-3, 2e-3], [0.1, 0.2], "must include batch size 1"),
        ([1, 2], [1e-3, 0.0], [0.1, 0.2], "mean_service_s for batch size 2"),
        ([1, 2], [1e-3, NAN], [0.1, 0.2], "mean_service_s for batch size 2"),
        ([1, 2], [1e-3, 2e-3], [NAN, 0.2], "batch_energy_j for batch size 1"),
        ([], [], [], "no rows"),
    ],
)
def test_from_table_errors(sizes, t, e, match):
    with pytest.raises(ModelError, match=match):
        ServiceProfile.from_table(sizes, t, e)


def test_from_table_interpolates_and_reports_it():
    p = ServiceProfile.from_table([4, 1, 8], [4e-3, 1e-3, 6e-3], [0.4, 0.1, 0.6])
    assert p.interpolated == (2, 3, 5, 6, 7)
    assert p.mean_s[1] == pytest.approx(2e-3) and p.mean_s[5] == pytest.approx(5e-3)
    assert p.energy_j[2] == pytest.approx(0.3)
    with pytest.raises(ModelError, match="max_batch 9 exceeds"):
        ServiceProfile.from_table([1, 8], [1e-3, 6e-3], [0.1, 0.6], max_batch=9)
    q = p.truncated(4)
    assert q.interpolated == (2, 3)


def test_csv_errors(tmp_path):
    with pytest.raises(ModelError, match=r"missing column\(s\) \['batch_energy_j'\]"):
        ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s\n1,0.002\n"))
    with pytest.raises(ModelError, match="non-numeric"):
        ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s,batch_energy_j\n1,abc,0.1\n"))
    with pytest.raises(ModelError, match="appears twice"):
        ServiceProfile.from_csv(
            write_csv(tmp_path, "batch_size,mean_service_s,batch_energy_j\n1,0.002,0.1\n1,0.003,0.2\n"))
    with pytest.raises(ModelError, match="batch_energy_j for batch size 1"):
        ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s,batch_energy_j\n1,0.002,nan\n"))
    with pytest.raises(ModelError, match="cannot read profile"):
        ServiceProfile.from_csv(tmp_path / "absent.csv")


def test_published_csv_reports_the_interpolated_sizes():
    p = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
    assert p.max_batch == 128
    assert set(p.interpolated) == set(range(1, 129)) - {1, 2, 4, 8, 64, 128}
    assert p.law == "deterministic"
    p4 = ServiceProfile.from_csv(ROOT / "profiles" / "p4_resnet50.csv", max_batch=16)
    assert p4.max_batch == 16 and all(b <= 16 for b in p4.interpolated)


# --- empirical samples and busy power -------------------------------------------------------------


def test_samples_that_disagree_with_mean_s_are_refused():
    """mean_s 1 ms with samples of 3 ms used to pass validation (capacity from 1 ms) and fail in solve."""
    with pytest.raises(ModelError, match=r"batch size 1: mean_s 0\.001 s disagrees .* samples, 0\.003 s"):
        ServiceProfile(mean_s=[0.001], energy_j=[0.1], cv=[0.0], samples=(np.full(4, 0.003),))
    prof = ServiceProfile.from_samples([np.full(4, 0.003)], energy_j=[0.1])
    # capacity now comes from the samples' mean: 1 / 3 ms = 333/s, so 600/s is refused up front
    with pytest.raises(ModelError, match=r"at or above capacity .* 333\.3"):
        BatchingModel(rate=600.0, max_batch=1, profile=prof, idle_power_w=20.0)


def test_samples_define_mean_cv_and_keep_busy_power():
    s1, s2 = np.array([0.001, 0.003]), np.array([0.002, 0.002, 0.005])
    prof = ServiceProfile.from_samples([s1, s2], busy_power_w=[100.0, 150.0])
    assert prof.law == "empirical"
    np.testing.assert_allclose(prof.mean_s, [0.002, 0.003])
    np.testing.assert_allclose(prof.cv, [s1.std() / s1.mean(), s2.std() / s2.mean()])
    np.testing.assert_allclose(prof.energy_j, [0.2, 0.45])
    np.testing.assert_allclose(prof.busy_power_w, [100.0, 150.0])
    assert BatchingModel(rate=100.0, max_batch=2, profile=prof, idle_power_w=20.0).capacity == pytest.approx(2 / 0.003)
    with pytest.raises(ModelError, match="exactly one"):
        ServiceProfile.from_samples([s1], energy_j=[0.1], busy_power_w=[50.0])


def test_busy_power_column_is_an_alternative_to_batch_energy(tmp_path):
    p = ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s,busy_power_w\n1,0.002,100\n4,0.005,160\n"))
    np.testing.assert_allclose(p.mean_s, [0.002, 0.003, 0.004, 0.005])
    np.testing.assert_allclose(p.busy_power_w, [100.0, 120.0, 140.0, 160.0])  # power is interpolated
    np.testing.assert_allclose(p.energy_j, [0.2, 0.36, 0.56, 0.8])  # energy = power x tau(b)
    assert p.interpolated == (2, 3)
    with pytest.raises(ModelError, match="exactly one of the columns batch_energy_j .* both are present"):
        ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s,busy_power_w,batch_energy_j\n1,0.002,100,0.2\n"))
    with pytest.raises(ModelError, match="busy_power_w for batch size 1"):
        ServiceProfile.from_csv(write_csv(tmp_path, "batch_size,mean_service_s,busy_power_w\n1,0.002,-5\n"))
    with pytest.raises(ModelError, match="exactly one"):
        ServiceProfile.from_table([1], [0.002], None)


def test_samples_csv_replaces_the_profile_times(tmp_path):
    prof_csv = write_csv(tmp_path, "batch_size,mean_service_s,batch_energy_j\n1,0.002,0.2\n2,0.003,0.36\n4,0.005,0.8\n")
    samples = tmp_path / "s.csv"
    samples.write_text("batch_size,service_s\n1,0.001\n1,0.003\n4,0.006\n4,0.006\n4,0.009\n9,0.1\n")
    p = ServiceProfile.from_csv(prof_csv, samples=samples)
    assert p.law == "empirical" and p.max_batch == 4
    mean = np.interp([1, 2, 3, 4], [1, 4], [0.002, 0.007])  # sample means of sizes 1 and 4
    np.testing.assert_allclose(p.mean_s, mean)
    # sizes without samples take the nearest measured size's shape, scaled to the interpolated mean
    np.testing.assert_allclose(p.samples[1], np.array([0.001, 0.003]) * mean[1] / 0.002)
    np.testing.assert_allclose(p.samples[2], np.array([0.006, 0.006, 0.009]) * mean[2] / 0.007)
    np.testing.assert_allclose(p.busy_power_w, ServiceProfile.from_csv(prof_csv).busy_power_w)  # kept
    assert p.interpolated == (2, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("batch_size,service_s\n2,0.001\n")
    with pytest.raises(ModelError, match="samples must include batch size 1"):
        ServiceProfile.from_csv(prof_csv, samples=bad)
    bad.write_text("batch_size,service_s\n1,-0.001\n")
    with pytest.raises(ModelError, match="line 2"):
        ServiceProfile.from_csv(prof_csv, samples=bad)
    bad.write_text("batch_size,time\n1,0.001\n")
    with pytest.raises(ModelError, match=r"missing column\(s\) \['service_s'\]"):
        ServiceProfile.from_csv(prof_csv, samples=bad)
