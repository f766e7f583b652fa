"""Simulator throughput: wall time to simulate 10^6 Poisson requests per rule, load and service law.

Prints a table (seconds, requests simulated per second, batches, and the ratio of the generic
ask-every-epoch loop to the specialised fast path for the same rule). Timings are machine-dependent;
nothing here asserts on them.

    python bench/sim_bench.py [--requests N]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from solver import arrivals
from solver.model import ServiceProfile
from solver.policy import Decision, TimeoutRule, greedy, threshold
from solver.quantities import DEFAULT_IDLE_POWER_W
from solver.simulate import simulate


@dataclass(frozen=True)
class _Generic:
    """Hides the rule's type so the simulator uses its generic loop (for the ratio)."""

    inner: object

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        return self.inner.decide(n, oldest_wait_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()
    big_b = args.max_batch
    base = ServiceProfile.from_csv("profiles/v100_resnet50.csv", max_batch=big_b)
    cap = big_b / base.mean_s[-1]
    print(f"V100 ResNet-50 profile, B = {big_b}, capacity {cap:.0f} req/s, {args.requests:,} Poisson requests")
    print(f"{'law':>6} {'load':>5} {'rule':>14} {'fast s':>7} {'req/s':>11} {'batches':>9} {'generic s':>9} {'ratio':>6}")
    for cv in (0.0, 0.5):
        prof = ServiceProfile(base.mean_s, base.energy_j, base.cv * 0 + cv, interpolated=base.interpolated)
        law = "det" if cv == 0 else f"cv{cv}"
        for load in (0.2, 0.5, 0.8):
            arr = arrivals.poisson(load * cap, n=args.requests, rng=1)
            for name, rule in (("greedy", greedy(big_b)), ("threshold:16", threshold(big_b, 16)),
                               ("timeout:2ms", TimeoutRule(big_b, 0.002))):
                t0 = time.perf_counter()
                res = simulate(prof, rule, arr, idle_power_w=DEFAULT_IDLE_POWER_W, weight=0.0, seed=1)
                fast = time.perf_counter() - t0
                t0 = time.perf_counter()
                simulate(prof, _Generic(rule), arr, idle_power_w=DEFAULT_IDLE_POWER_W, weight=0.0, seed=1)
                slow = time.perf_counter() - t0
                print(f"{law:>6} {load:>5.1f} {name:>14} {fast:>7.2f} {args.requests / fast:>11,.0f} "
                      f"{res.n_batches:>9,} {slow:>9.2f} {slow / fast:>6.1f}")


if __name__ == "__main__":
    main()
