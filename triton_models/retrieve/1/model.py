"""Triton python model `retrieve` (BLS): a search request in, its answer out.

Input `REQUEST` [B, 1] string: one search request per row, the JSON document of the search
contract (reir.engine.serving.contract: text, k, per_image, tags, gallery). Output
`RESPONSE` [B, 1] string: its JSON answer (results with hits, truncated, partial,
missing_shards). The text goes through the `encode_query` ensemble (tokenizer ->
text_encoder, batched by Triton); the vectors are searched in the gallery named under the
configured `gallery_root` (`default_gallery` when the request names none).

Requests that arrive together (dynamic batching) are answered together: their texts are
encoded in one `encode_query` call. A wrong request (the contract's RequestError) is
answered INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) or NOT_FOUND for an unknown
gallery, with the message every path gives; anything else is the server's fault and
stays INTERNAL, so monitoring can tell them apart.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from reir.engine.serving.contract import NOT_FOUND, RequestError, SearchRequest
from reir.engine.serving.metrics import triton_families
from reir.engine.serving.service import SearchService

ENCODE_BATCH = 32  # encode_query's max_batch_size


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.service = SearchService(
            self.encode,
            p["model_id"],
            int(p["dim"]),
            p["gallery_root"],
            p.get("default_gallery") or None,
            families=triton_families(pb_utils),  # the reir_* series on Triton's :8002/metrics
        )
        self.gauges_at = 0.0

    def encode(self, texts):
        """Query vectors and truncation flags from `encode_query`, in its batch size."""
        vectors, cut = [], []
        for start in range(0, len(texts), ENCODE_BATCH):
            chunk = texts[start : start + ENCODE_BATCH]
            text = pb_utils.Tensor("TEXT", np.array([[t.encode("utf-8")] for t in chunk], dtype=object))
            res = pb_utils.InferenceRequest(
                model_name="encode_query", requested_output_names=["query", "truncated"], inputs=[text]
            ).exec()
            if res.has_error():
                raise RuntimeError(f"encode_query: {res.error().message()}")
            vectors.append(pb_utils.get_output_tensor_by_name(res, "query").as_numpy())
            cut += [bool(x) for x in pb_utils.get_output_tensor_by_name(res, "truncated").as_numpy().reshape(-1)]
        return np.concatenate(vectors).astype(np.float32), cut

    def execute(self, requests):
        rows, parsed = [], []  # (request index, row) of each JSON document, and what it parsed to
        for i, req in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(req, "REQUEST")
            for raw in tensor.as_numpy().reshape(-1):
                rows.append(i)
                try:
                    parsed.append(SearchRequest.from_json(raw if isinstance(raw, bytes) else str(raw)))
                except RequestError as e:
                    parsed.append(e)
                    self.service.metrics.outcome("invalid")
        valid = [j for j, p in enumerate(parsed) if not isinstance(p, RequestError)]
        self.service.metrics.batch.observe(len(parsed))  # Triton's queue and its times are Triton's own metrics
        try:
            answers = dict(zip(valid, self.service.answer_batch([parsed[j] for j in valid]), strict=True))
        except Exception as e:  # the server's fault: every request of the batch gets it
            self.service.metrics.outcome("error", len(valid))
            error = pb_utils.TritonError(f"retrieve: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        out = []
        for i in range(len(requests)):
            mine = [answers.get(j, parsed[j]) for j, r in enumerate(rows) if r == i]
            bad = next((a for a in mine if isinstance(a, RequestError)), None)
            if bad is not None:
                code = pb_utils.TritonError.NOT_FOUND if bad.code == NOT_FOUND else pb_utils.TritonError.INVALID_ARG
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(bad), code)))
                continue
            body = np.array([[json.dumps(a.to_json()).encode("utf-8")] for a in mine], dtype=object)
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("RESPONSE", body)]))
        if time.monotonic() - self.gauges_at > 1.0:  # Triton scrapes on its own: keep the gallery gauges fresh
            self.service.update_gauges()
            self.gauges_at = time.monotonic()
        return out

    def finalize(self):
        self.service.close()
