"""Triton python model `visual_encoder` (config `pyort`): uint8 images -> boxes, scores,
embeddings, num_detections, with NMS inside the ONNX graph. See text_encoder/1/model.py."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from reir.engine.runtime.encoders import session

OUTPUTS = ["boxes", "scores", "embeddings", "num_detections"]


class TritonPythonModel:
    def initialize(self, args):
        self.sess = session(Path(args["model_repository"]) / args["model_version"] / "model.onnx", "cpu", 1)

    def execute(self, requests):
        out = []
        for req in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(req, "images").as_numpy()
                res = self.sess.run(None, {"images": images})
                res[3] = res[3].reshape(-1, 1)  # num_detections [B] -> [B, 1], as the config declares
                tensors = [pb_utils.Tensor(n, a) for n, a in zip(OUTPUTS, res, strict=True)]
                out.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"visual_encoder: {e}")))
        return out
