"""Cost of a histogram update in the sidecar's metrics, in-process: one value (the Python plane's request
path) and a report's worth of values at once (the native plane's report bookkeeping).

    python bench/metrics_bench.py [--values 200] [--rounds 2] [--old REV]

Contenders in the same run, per update (best of 5 repeats, ns): prometheus_client's ``Histogram.observe``
(per value for the bulk case) and ``HistogramSeries.observe`` / ``observe_all`` of plugin/metrics.py.
``--old REV``: also a git revision's plugin/metrics.py ``observe_one`` / ``observe_all`` functions (the
earlier fast path through the library histogram's own fields), for a before/after on the same machine.
Figures only; the machine's other work shifts them, compare within a round.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _old_module(rev: str) -> object:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:plugin/metrics.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_metrics", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_metrics"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=int, default=200, help="values per bulk update (a report's worth)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old", default=None, help="git revision whose observe_one/observe_all to measure too")
    args = ap.parse_args()

    from prometheus_client import CollectorRegistry, Histogram

    from plugin.metrics import LATENCY_BUCKETS_S, HistogramFamily

    rng = random.Random(1)
    values = [rng.expovariate(1 / 0.004) for _ in range(args.values)]  # latencies around 4 ms
    one = values[0]

    def library() -> Histogram:
        return Histogram("h", "h", ("model",), buckets=LATENCY_BUCKETS_S, registry=CollectorRegistry()).labels("m")

    lib = library()
    ours = HistogramFamily("h", "h", ("model",), LATENCY_BUCKETS_S, CollectorRegistry()).labels("m")
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "one value: library Histogram.observe": (lambda: lib.observe(one), 200_000),
        "one value: HistogramSeries.observe": (lambda: ours.observe(one), 200_000),
        f"{args.values} values: library observe per value": (lambda: [lib.observe(v) for v in values], 2_000),
        f"{args.values} values: HistogramSeries.observe_all": (lambda: ours.observe_all(values), 2_000),
    }
    if args.old is not None:
        old, old_h = _old_module(args.old), library()
        cases[f"one value: {args.old} observe_one"] = (lambda: old.observe_one(old_h, one), 200_000)
        cases[f"{args.values} values: {args.old} observe_all"] = (lambda: old.observe_all(old_h, values), 2_000)
    for r in range(args.rounds):
        for name in sorted(cases, key=lambda n: (not n.startswith("one"), n)):
            fn, number = cases[name]
            best = min(timeit.repeat(fn, number=number, repeat=5)) / number
            print(f"round {r + 1}  {name:48s} {best * 1e9:10.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
