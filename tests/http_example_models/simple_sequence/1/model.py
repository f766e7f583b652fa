"""OUTPUT = INPUT, plus 1 on a sequence's first request: what NVIDIA's sequence example expects of
"simple_sequence" (simple_http_sequence_sync_infer_client.py without --dyna)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            start = pb_utils.get_input_tensor_by_name(r, "START").as_numpy()
            value = pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", (value + (start != 0)).astype(np.int32))]))
        return out
