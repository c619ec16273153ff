"""Triton python model `text_encoder` (config `pyort`): the ONNX graph in onnxruntime, for
servers without the onnxruntime backend (e.g. the CPU tritonserver of nvidia-pytriton).
Production configs use `onnxruntime_onnx` or `tensorrt_plan` on the same model.onnx. The
config's `graph` parameter names another (model.cpu.onnx: a bundle's int8 CPU graph); not
default_model_filename, which names this file for the python backend."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from reir.engine.runtime.encoders import session


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        name = params.get("graph", {}).get("string_value") or "model.onnx"
        self.sess = session(Path(args["model_repository"]) / args["model_version"] / name, "cpu", 1)

    def execute(self, requests):
        """The requests Triton batched together, run as one: each padded to the longest
        sequence (masked, so its vectors do not change) and answered with its own rows."""
        out, good = [None] * len(requests), []
        for i, req in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(req, "input_ids").as_numpy().astype(np.int64)
            mask = pb_utils.get_input_tensor_by_name(req, "attention_mask").as_numpy().astype(np.int64)
            if ids.shape != mask.shape or ids.ndim != 2:
                shapes = f"input_ids {list(ids.shape)}, attention_mask {list(mask.shape)}"
                why = f"text_encoder: {shapes}: need two equal [batch, sequence] shapes"
                out[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(why))
            else:
                good.append((i, ids, mask))
        if good:
            width = max(ids.shape[1] for _, ids, _ in good)
            pad = [((0, 0), (0, width - ids.shape[1])) for _, ids, _ in good]
            ids = np.concatenate([np.pad(a, p) for (_, a, _), p in zip(good, pad, strict=True)])
            mask = np.concatenate([np.pad(m, p) for (_, _, m), p in zip(good, pad, strict=True)])
            try:
                q = self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
            except Exception as e:
                for i, _, _ in good:
                    out[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"text_encoder: {e}"))
                return out
            at = 0
            for i, a, _ in good:
                rows = q[at : at + len(a)]
                at += len(a)
                out[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("query", rows)])
        return out
