"""The load tests' solver profile: measured times, the table's energy, and P0 for the time the stack adds."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.stack_profile import compose, write_composed_csv
from solver.model import ServiceProfile


def test_composed_energy_charges_idle_power_for_what_the_stack_adds(tmp_path) -> None:
    table = ServiceProfile.from_table([1, 2, 4], [0.020, 0.022, 0.025], [2.0, 2.4, 3.0])
    measured = ServiceProfile.from_table([1, 2, 4], [0.0215, 0.0238, 0.0249], None, [0.03, 0.02, 0.01],
                                         busy_power_w=[0.0, 0.0, 0.0])
    p0 = 40.0
    prof = compose(measured, table, p0)
    assert prof.mean_s.tolist() == measured.mean_s.tolist() and prof.cv.tolist() == measured.cv.tolist()
    # a cycle of length T around one batch costs the same joules either way: the table's batch and P0 for
    # the rest (how the bench measures), or the composed batch and P0 for what is left of T
    for b in (1, 2, 3, 4):
        for cycle in (0.03, 0.1):
            measured_way = table.energy_j[b - 1] + p0 * (cycle - table.mean_s[b - 1])
            solver_way = prof.energy_j[b - 1] + p0 * (cycle - prof.mean_s[b - 1])
            if measured.mean_s[b - 1] >= table.mean_s[b - 1]:
                assert solver_way == pytest.approx(measured_way)
    # a measured time below the table's (b = 4 here) adds nothing, never negative energy
    assert prof.energy_j[3] == pytest.approx(table.energy_j[3])
    path = write_composed_csv(prof, tmp_path / "p.csv", "a note")
    back = ServiceProfile.from_csv(path)
    assert np.allclose(back.mean_s, prof.mean_s) and np.allclose(back.energy_j, prof.energy_j)
    assert "# power: modelled" in path.read_text()
