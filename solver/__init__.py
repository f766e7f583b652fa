import smdp  # noqa: F401  (process-wide gRPC defaults, set before gRPC starts)
from solver.evaluate import Evaluation, UnstablePolicyError, evaluate
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import BatchRule, Decision, PolicyTable, TimeoutRule, greedy, static, threshold
from solver.result import SolveResult
from solver.smdp import solve
from solver.arrivals import ArrivalError, mmpp, poisson, ramp, steps, trace, windowed_rate
from solver.simulate import SimResult, simulate
