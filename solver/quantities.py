"""The quantities every tool shares (the sidecar, the CLIs, the load tests): default, unit and one
validator each. A config field, flag or dataclass that takes one of them takes its default from here
and checks it here, so the number and the rule are written once.
"""

from __future__ import annotations

import math

from .errors import ModelError

DEFAULT_IDLE_POWER_W = 40.0
"""P0, watts, where none is given: assumed, since the published V100 tables give no idle figure."""

DEFAULT_WEIGHT = 0.0
"""w, seconds of mean latency per watt, where none is given: 0 minimises mean latency alone."""


def weight(value: float, *, error: type[ValueError] = ModelError) -> float:
    """w as a float; ``error`` (a ModelError by default) unless it is finite and >= 0 seconds per watt."""
    return _finite_non_negative(value, "weight w must be finite and >= 0 (seconds per watt)", error)


def idle_power(value: float, *, error: type[ValueError] = ModelError) -> float:
    """P0 as a float; ``error`` unless it is finite and >= 0 watts."""
    return _finite_non_negative(value, "idle power P0 must be finite and >= 0 (watts)", error)


def _finite_non_negative(value: float, rule: str, error: type[ValueError]) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise error(f"{rule}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x) or x < 0:
        raise error(f"{rule}, got {value!r}")
    return x + 0.0  # -0.0 -> 0.0


def check_number(name: str, value: float, *, low: float = 0.0, inclusive: bool = False,
                 high: float | None = None) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite, > ``low`` (>= when
    ``inclusive``) and, given ``high``, < ``high``: the check of a setting with no quantity of its own."""
    value = float(value)
    ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f">= {low}" if inclusive else f"> {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_count(name: str, value: int, *, low: int = 1) -> int:
    """``value`` unchanged; ValueError naming ``name`` unless it is an integer (not a bool) >= ``low``:
    the check of a count setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
