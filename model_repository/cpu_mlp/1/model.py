"""Triton Python-backend model: a real CPU workload whose cost per request falls with batch size.

Triton hands ``execute`` every request its batcher grouped; they are stacked and pushed through the
MLP as one matrix product per layer, then split back per request, so a batch of b costs much less
than b single executions (the property the SMDP exploits). Weights come from the ``seed`` and
``layer_sizes`` config parameters (see mlp_weights.py).
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mlp_weights import forward, make_weights, parse_layer_sizes


def _parameter(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value.strip() or default


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        try:
            sizes = parse_layer_sizes(_parameter(config, "layer_sizes", "256,512,512,16"))
            seed = int(_parameter(config, "seed", "20240601"))
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        in_dims = [i["dims"] for i in config["input"] if i["name"] == "INPUT0"]
        out_dims = [o["dims"] for o in config["output"] if o["name"] == "OUTPUT0"]
        if in_dims != [[sizes[0]]] or out_dims != [[sizes[-1]]]:
            raise pb_utils.TritonModelException(
                f"layer_sizes {sizes} do not match INPUT0 dims {in_dims} and OUTPUT0 dims {out_dims}"
            )
        self.layers = make_weights(sizes, seed)

    def execute(self, requests: list) -> list:
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        outputs = forward(np.concatenate(inputs, axis=0), self.layers)
        splits = np.cumsum([x.shape[0] for x in inputs])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", np.ascontiguousarray(y))])
            for y in np.split(outputs, splits)
        ]

    def finalize(self) -> None:
        pass
