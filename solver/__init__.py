from solver.arrivals import ArrivalError, mmpp, poisson, ramp, steps, trace, windowed_rate
from solver.simulate import SimResult, simulate
