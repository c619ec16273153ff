"""Triton python model `text_encoder` (config `pyort`): the ONNX graph in onnxruntime, for
servers without the onnxruntime backend (e.g. the CPU tritonserver of nvidia-pytriton).
Production configs use `onnxruntime_onnx` or `tensorrt_plan` on the same model.onnx."""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from reir.engine.runtime.encoders import session


class TritonPythonModel:
    def initialize(self, args):
        self.sess = session(Path(args["model_repository"]) / args["model_version"] / "model.onnx", "cpu", 1)

    def execute(self, requests):
        out = []
        for req in requests:  # each request is already a batch; shapes are checked by Triton
            try:
                ids = pb_utils.get_input_tensor_by_name(req, "input_ids").as_numpy().astype(np.int64)
                mask = pb_utils.get_input_tensor_by_name(req, "attention_mask").as_numpy().astype(np.int64)
                if ids.shape != mask.shape:
                    raise ValueError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ")
                q = self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("query", q.astype(np.float32))]))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"text_encoder: {e}")))
        return out
