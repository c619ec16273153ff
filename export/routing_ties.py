"""MORE's routing ties in an ONNX text graph: the alternatives export/ties.py takes from the
PyTorch model, for a bundle that has only its graphs.

MORE routes each pooled text vector to its top-K experts (a TopK over the router's softmax
gates, under the `/text_proj` scope). Where another choice of K experts is within
`ROUTING_TIE` of the graph's own (its weakest gate at least the strongest other's minus the
tie), a reduced-precision graph may take it. `routing_alternatives(graph, tokenizer)` gives,
for each choice of K experts, the graph's queries routed to it wherever it ties and as usual
elsewhere, the form export/gates.py `parity` compares a candidate with.

How: one copy of the graph also returns each router's gates; another takes each router's K
experts as an input (the TopK replaced by a gather of the chosen gates), so any routing can
be imposed and the rest of the graph runs unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from reir.engine.runtime.encoders import session

from .ties import ROUTING_TIE

EncodeTextFn = Callable[[list[str]], np.ndarray]


def routers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "TopK" and n.name.startswith("/text_proj")]


def _k(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    src = node.input[1]
    tensor = inits[src] if src in inits else consts[src].attribute[0].t
    return int(onnx.numpy_helper.to_array(tensor).reshape(-1)[0])


def _with_gates(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in routers(m):
        m.graph.output.append(helper.make_empty_tensor_value_info(t.input[0]))
    return m


def _forced(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    chosen = {t.name: _k(model, t) for t in routers(m)}
    nodes = []
    for n in m.graph.node:
        if n.name not in chosen:
            nodes.append(n)
            continue
        route = f"{n.name}/route"
        m.graph.input.append(helper.make_tensor_value_info(route, onnx.TensorProto.INT64, ["batch", chosen[n.name]]))
        nodes.append(helper.make_node("GatherElements", [n.input[0], route], [n.output[0]], axis=-1))
        nodes.append(helper.make_node("Identity", [route], [n.output[1]]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def routing_alternatives(graph: Path, tokenizer) -> tuple[EncodeTextFn, ...]:
    """The graph's queries under each other choice of K experts, where it ties (none without MORE)."""
    model = onnx.load(str(graph))
    found = routers(model)
    if not found:
        return ()
    k = _k(model, found[0])
    gated, forced = _session(_with_gates(model)), _session(_forced(model))
    names = [f"{t.name}/route" for t in found]

    def under(choice: tuple[int, ...]) -> EncodeTextFn:
        c = np.array(choice)

        def encode(texts: list[str]) -> np.ndarray:
            ids, mask, _ = tokenizer(texts)
            feed = {"input_ids": ids, "attention_mask": mask}
            for name, gates in zip(names, gated.run(None, feed)[1:], strict=True):
                own = np.argsort(-gates, axis=1, kind="stable")[:, :k]
                ties = gates[:, c].min(1) >= np.delete(gates, c, axis=1).max(1) - ROUTING_TIE
                mine = c[np.argsort(-gates[:, c], axis=1, kind="stable")]
                feed[name] = np.where(ties[:, None], mine, own).astype(np.int64)
            return forced.run(None, feed)[0]

        return encode

    ids, mask, _ = tokenizer(["a"])
    experts = gated.run(None, {"input_ids": ids, "attention_mask": mask})[1].shape[1]
    return tuple(under(c) for c in itertools.combinations(range(experts), k))


def _session(model: onnx.ModelProto):
    return session(model.SerializeToString(), "cpu", 2)
