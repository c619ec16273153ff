"""Triton python model `retrieve` (BLS): expressions -> encode_query -> gallery search -> hits.

Inputs (per request, batch B): TEXT strings [B, 1], or pre-tokenised INPUT_IDS and
ATTENTION_MASK [B, L] to skip the string path; optional K [B, 1] (default: parameter
`default_k`, capped at `max_k`) and GALLERY [B, 1], a gallery name under the configured
`gallery_root` (default: `default_gallery`). A name that escapes the root is refused.
Outputs, padded to K per query: IMAGE_IDS (-1 = no hit), BOXES xyxy in original pixels,
SCORES, INSTANCE_KEYS, DETECTION_SCORES, PATHS; TRUNCATED says an expression exceeded the max length.

A request the client got wrong (empty text, K out of range, an unknown gallery or one
outside the root, missing inputs) is answered INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT);
anything else is the server's fault and stays INTERNAL, so monitoring can tell them apart.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from reir.engine.sharded_gallery import is_sharded, open_gallery


class ClientError(ValueError):
    """The request is wrong: the client's to fix."""


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.root = Path(p["gallery_root"]).resolve()
        self.default_gallery = p.get("default_gallery", "")
        self.default_k = int(p.get("default_k", "10"))
        self.max_k = int(p.get("max_k", "100"))
        self.galleries = {}

    def gallery(self, name):
        path = (self.root / (name or self.default_gallery)).resolve()
        if not path.is_relative_to(self.root):
            raise ClientError(f"gallery {name!r} is outside the configured gallery root")
        if path not in self.galleries:
            if not (path / "gallery.sqlite").is_file() and not is_sharded(path):
                raise ClientError(f"no gallery named {name or self.default_gallery!r} under the gallery root")
            self.galleries[path] = open_gallery(path, progress=False)
        return self.galleries[path]

    def encode(self, req):
        text = pb_utils.get_input_tensor_by_name(req, "TEXT")
        if text is not None:
            for t in text.as_numpy().reshape(-1):
                if not (t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)).strip():
                    raise ClientError("empty expression")
            inputs, model = [pb_utils.Tensor("TEXT", text.as_numpy())], "encode_query"
        else:
            ids = pb_utils.get_input_tensor_by_name(req, "INPUT_IDS")
            mask = pb_utils.get_input_tensor_by_name(req, "ATTENTION_MASK")
            if ids is None or mask is None:
                raise ClientError("send TEXT, or INPUT_IDS and ATTENTION_MASK")
            inputs, model = (
                [pb_utils.Tensor("input_ids", ids.as_numpy()), pb_utils.Tensor("attention_mask", mask.as_numpy())],
                "text_encoder",
            )
        names = ["query", "truncated"] if model == "encode_query" else ["query"]
        res = pb_utils.InferenceRequest(model_name=model, requested_output_names=names, inputs=inputs).exec()
        if res.has_error():  # the encoder's verdict decides whose fault it is
            err = res.error()
            if err.code() == pb_utils.TritonError.INVALID_ARG:
                raise ClientError(err.message())
            raise RuntimeError(err.message())
        q = pb_utils.get_output_tensor_by_name(res, "query").as_numpy()
        t = pb_utils.get_output_tensor_by_name(res, "truncated")
        trunc = t.as_numpy().reshape(-1) if t is not None else np.zeros(len(q), bool)
        return q, trunc

    def execute(self, requests):
        out = []
        for req in requests:
            try:
                q, trunc = self.encode(req)
                k_in = pb_utils.get_input_tensor_by_name(req, "K")
                g_in = pb_utils.get_input_tensor_by_name(req, "GALLERY")
                k = int(k_in.as_numpy().reshape(-1)[0]) if k_in is not None else self.default_k
                if not 1 <= k <= self.max_k:
                    raise ClientError(f"K must be in [1, {self.max_k}], got {k}")
                name = g_in.as_numpy().reshape(-1)[0] if g_in is not None else b""
                name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
                hits = self.gallery(name).search(q, k=k)
                b = len(q)
                ids = np.full((b, k), -1, np.int64)
                keys = np.full((b, k), -1, np.int64)
                boxes = np.zeros((b, k, 4), np.float32)
                scores = np.zeros((b, k), np.float32)
                det = np.zeros((b, k), np.float32)
                paths = np.full((b, k), b"", dtype=object)
                for i, hs in enumerate(hits):
                    for j, h in enumerate(hs):
                        ids[i, j], keys[i, j], scores[i, j] = h.image_id, h.instance_key, h.score
                        det[i, j] = h.detection_score
                        boxes[i, j] = h.box
                        paths[i, j] = h.path.encode("utf-8")
                tensors = [
                    pb_utils.Tensor("IMAGE_IDS", ids),
                    pb_utils.Tensor("BOXES", boxes),
                    pb_utils.Tensor("SCORES", scores),
                    pb_utils.Tensor("INSTANCE_KEYS", keys),
                    pb_utils.Tensor("DETECTION_SCORES", det),
                    pb_utils.Tensor("PATHS", paths),
                    pb_utils.Tensor("TRUNCATED", np.asarray(trunc, bool).reshape(b, 1)),
                ]
                out.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except ClientError as e:
                error = pb_utils.TritonError(f"retrieve: {e}", pb_utils.TritonError.INVALID_ARG)
                out.append(pb_utils.InferenceResponse(error=error))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"retrieve: {e}")))
        return out

    def finalize(self):
        for g in self.galleries.values():
            g.close()
