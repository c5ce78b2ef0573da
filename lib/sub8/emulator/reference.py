"""The reference the integer kernels are proven against: one ONNX operator run by ONNX Runtime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def run_onnx_node(op: str, inputs: Mapping[str, np.ndarray], out_type: int, **attrs: Any) -> np.ndarray:
    """Run one ONNX node (default domain, opset 13), built in memory, on ONNX Runtime's CPU provider, one thread;
    ``inputs`` are fed in the node's input order."""
    # Imported here: ONNX Runtime is needed only to check the kernels, never to run the emulator.
    import onnxruntime as ort
    from onnx import helper

    node = helper.make_node(op, list(inputs), ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in inputs.items()],
        [helper.make_tensor_value_info("y", out_type, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(inputs))[0]
