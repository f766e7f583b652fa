"""The closed loop of an adaptive model: measure, re-solve, install.

- ``rate``: the arrival rate, estimated online, and when it changed (a CUSUM);
- ``profile``: the service-time profile, learned from completed batches, and when it drifted;
- ``telemetry``: Triton's metrics (power) and statistics, read and parsed;
- ``controller``: one model's ``PolicyController``, which asks a solver (in-process or a shared
  ``smdp solver-serve``) for a new rule when the rate or the profile moved, and installs it.
"""
