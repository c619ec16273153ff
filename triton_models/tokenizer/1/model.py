"""Triton python model `tokenizer`: expressions (TYPE_STRING) -> input_ids, attention_mask.

Same cleaning and tokenizer.json as the embedded engine (reir.engine.runtime.tokenizer). Pads to
the model's max length so that requests batch together downstream. Texts longer than
that are truncated and flagged in `truncated`.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from reir.engine.runtime.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.tok = Tokenizer(here / "tokenizer.json", int(p["max_length"]), int(p["pad_id"]), p["pad_token"], True)

    def execute(self, requests):
        out = []
        for req in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(req, "TEXT").as_numpy().reshape(-1)
                texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
                if any(not t.strip() for t in texts):  # the client's error: INVALID_ARG (HTTP 400)
                    error = pb_utils.TritonError("tokenizer: empty expression", pb_utils.TritonError.INVALID_ARG)
                    out.append(pb_utils.InferenceResponse(error=error))
                    continue
                ids, mask, truncated = self.tok(texts)
                out.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("input_ids", ids),
                            pb_utils.Tensor("attention_mask", mask),
                            pb_utils.Tensor("truncated", np.array(truncated, dtype=bool).reshape(-1, 1)),
                        ]
                    )
                )
            except Exception as e:  # one bad request gets an error, the instance stays up
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {e}")))
        return out
