"""Python-backend stand-ins for the models NVIDIA's example clients (triton-inference-server/client,
src/python/examples) use, with the same names, tensors and behaviour: ``simple`` (add and subtract
two INT32[16]), ``simple_sequence`` and ``simple_dyna_sequence`` (a running sum per sequence),
``simple_string`` (add and subtract numbers written as strings) and ``repeat_int32`` (decoupled: one
response per input element). Not a test module: ``write_example_repository(path)`` lays them out.
"""

from __future__ import annotations

from pathlib import Path

_SIMPLE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (a + b).astype(a.dtype)),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(a.dtype))]))
        return out
'''

_SIMPLE_CONFIG = '''
name: "simple"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "INPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "OUTPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''

_STRING = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy()
            x = np.vectorize(lambda s: int(s))(a)
            y = np.vectorize(lambda s: int(s))(b)
            fmt = np.vectorize(lambda v: str(v).encode())
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", fmt(x + y).astype(np.object_)),
                pb_utils.Tensor("OUTPUT1", fmt(x - y).astype(np.object_))]))
        return out
'''

_STRING_CONFIG = '''
name: "simple_string"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_STRING, dims: [ 16 ] }, { name: "INPUT1", data_type: TYPE_STRING, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_STRING, dims: [ 16 ] }, { name: "OUTPUT1", data_type: TYPE_STRING, dims: [ 16 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''

# The running sum of a sequence's inputs; START resets it. simple_dyna_sequence adds the correlation
# id to each output (as NVIDIA's does), read from its CORRID control input.
_SEQUENCE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        out = []
        for r in requests:
            start = int(pb_utils.get_input_tensor_by_name(r, "START").as_numpy().reshape(-1)[0])
            value = int(pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy().reshape(-1)[0])
            corr = pb_utils.get_input_tensor_by_name(r, "CORRID")
            key = r.correlation_id()
            total = value if start else self.sums.get(key, 0) + value
            self.sums[key] = total
            if corr is not None:
                total += int(corr.as_numpy().reshape(-1)[0])
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[total]], dtype=np.int32))]))
        return out
'''


def _sequence_config(name: str, dyna: bool) -> str:
    corrid = ('{ name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] },'
              if dyna else "")
    return f'''
name: "{name}"
backend: "python"
max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {corrid}
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] }} ] }}
  ]
}}
input [ {{ name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
'''


_REPEAT = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            values = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy().reshape(-1)
            for i, v in enumerate(values):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUT", np.array([v], dtype=np.int32)),
                    pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

_REPEAT_CONFIG = '''
name: "repeat_int32"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] }, { name: "DELAY", data_type: TYPE_UINT32, dims: [ -1 ] },
        { name: "WAIT", data_type: TYPE_UINT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] }, { name: "IDX", data_type: TYPE_UINT32, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''

MODELS = {
    "simple": (_SIMPLE, _SIMPLE_CONFIG),
    "simple_string": (_STRING, _STRING_CONFIG),
    "simple_sequence": (_SEQUENCE, _sequence_config("simple_sequence", dyna=False)),
    "simple_dyna_sequence": (_SEQUENCE, _sequence_config("simple_dyna_sequence", dyna=True)),
    "repeat_int32": (_REPEAT, _REPEAT_CONFIG),
}


def write_example_repository(root: Path, names: tuple[str, ...] = tuple(MODELS)) -> Path:
    for name in names:
        code, config = MODELS[name]
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "1" / "model.py").write_text(code)
        (root / name / "config.pbtxt").write_text(config)
    return root


# Triton 2.51 (the server the nvidia-pytriton wheel embeds) counts a region's users and refuses to
# unregister one still in use ("Failed to unregister the following system shared memory regions: ...").
# Its gRPC frontend drops the request's references at the end of the response callback, after the
# response is queued for sending, so a client that unregisters the moment its answer arrives can race
# that callback, with or without the sidecar in between (Triton 2.53 defers the unregister instead).
_SHM_IN_USE = "Failed to unregister the following system shared memory regions"


def unregister_system_shm(client, timeout_s: float = 5.0) -> None:
    """``client.unregister_system_shared_memory()`` (gRPC or HTTP), asked again while Triton still
    reports a region in use by an inference that has already answered; any other error is raised."""
    import time

    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.unregister_system_shared_memory()
            return
        except InferenceServerException as err:
            if _SHM_IN_USE not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)
