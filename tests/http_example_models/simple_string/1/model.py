"""String integers in, their sum and difference as strings out (NVIDIA's "simple_string")."""

import numpy as np
import triton_python_backend_utils as pb_utils


def _ints(t):
    return np.vectorize(lambda s: int(s.decode() if isinstance(s, bytes) else s))(t.as_numpy()).astype(np.int64)


def _strings(a):
    return np.vectorize(lambda v: str(v).encode(), otypes=[np.object_])(a)


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = _ints(pb_utils.get_input_tensor_by_name(r, "INPUT0"))
            b = _ints(pb_utils.get_input_tensor_by_name(r, "INPUT1"))
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", _strings(a + b)), pb_utils.Tensor("OUTPUT1", _strings(a - b)),
            ]))
        return out
