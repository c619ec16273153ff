"""The instance-context module (training/context.py): what it sums, what it ignores, and that
it exports to ONNX with the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from reir.training.context import InstanceContext  # noqa: E402

D, SLOTS = 16, 4


def _context(seed: int = 0) -> InstanceContext:
    torch.manual_seed(seed)
    ctx = InstanceContext(D, SLOTS)
    for layer in (ctx.out, ctx.position):  # trained weights are not zero
        torch.nn.init.normal_(layer.weight, std=0.3)
    return ctx.eval()


def _scene(q: int = 3):
    torch.manual_seed(1)
    hidden = torch.randn(1, q, D)
    boxes = torch.tensor([[[0.2, 0.5, 0.1, 0.1], [0.8, 0.5, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1]]])[:, :q]
    return hidden, boxes, torch.full((1, q), 5.0)


def test_new_module_starts_as_the_plain_decoder_state():
    hidden, boxes, obj = _scene()
    torch.testing.assert_close(InstanceContext(D, SLOTS)(hidden, boxes, obj), hidden)


def test_a_neighbour_counts_by_its_state_place_and_objectness_but_the_instance_itself_does_not():
    ctx = _context()
    hidden, boxes, obj = _scene()
    with torch.no_grad():
        base = ctx(hidden, boxes, obj)[0, 0]
        other = hidden.clone()
        other[0, 1] += 1.0  # what the neighbour is
        assert (ctx(other, boxes, obj)[0, 0] - base).abs().max() > 1e-3
        moved = boxes.clone()
        moved[0, 1, 0] = 0.05  # where it is: from right of instance 0 to its left
        assert (ctx(hidden, moved, obj)[0, 0] - base).abs().max() > 1e-3
        gone = obj.clone()
        gone[0, 1] = -30.0  # a background query: as if it were absent
        alone = ctx(hidden[:, [0, 2]], boxes[:, [0, 2]], obj[:, [0, 2]])[0, 0]
        torch.testing.assert_close(ctx(hidden, boxes, gone)[0, 0], alone, atol=1e-5, rtol=0)
        # The instance's own state reaches its embedding only through the residual.
        itself = hidden.clone()
        itself[0, 0] += 1.0
        torch.testing.assert_close(ctx(itself, boxes, obj)[0, 0] - base, itself[0, 0] - hidden[0, 0])


def test_no_gradient_reaches_boxes_or_objectness():
    ctx = _context()
    hidden, boxes, obj = _scene()
    boxes.requires_grad_(True)
    obj.requires_grad_(True)
    hidden.requires_grad_(True)
    ctx(hidden, boxes, obj).sum().backward()
    assert boxes.grad is None and obj.grad is None
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0


def test_context_exports_to_onnx_with_the_same_numbers(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    ctx = _context()
    hidden, boxes, obj = _scene()
    path = tmp_path / "context.onnx"
    dyn = {"hidden": {0: "b", 1: "q"}, "boxes": {0: "b", 1: "q"}, "objectness": {0: "b", 1: "q"}}
    torch.onnx.export(
        ctx, (hidden, boxes, obj), str(path), dynamo=False, opset_version=17,
        input_names=["hidden", "boxes", "objectness"], output_names=["out"], dynamic_axes=dyn,
    )  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(3)
    hidden5, boxes5, obj5 = torch.randn(2, 5, D), torch.rand(2, 5, 4) * 0.5 + 0.25, torch.randn(2, 5)
    got = sess.run(None, {"hidden": hidden5.numpy(), "boxes": boxes5.numpy(), "objectness": obj5.numpy()})[0]
    with torch.no_grad():
        want = ctx(hidden5, boxes5, obj5).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_model_with_context_keeps_the_visual_branch_text_free_and_per_image():
    from reir.training.config import load_config
    from reir.training.model import build_model

    tiny = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"
    cfg = load_config(tiny, {"model.context_slots": SLOTS})
    model = build_model(cfg.model).eval()
    assert model.context is not None and len(model.context) == cfg.model.dec_layers
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        both, one = model.encode_image(x), model.encode_image(x[1:])
    torch.testing.assert_close(one["embeddings"][-1][0], both["embeddings"][-1][1], atol=1e-5, rtol=1e-5)


def test_context_probe_measures_each_added_term():
    """A new model's context and own-box terms start at zero (zero-initialised projections),
    so the probe must read 0 for both; once the context projection is not zero it must read
    more than 0, and a model without the heads is refused by name."""
    from reir.training.config import load_config
    from reir.training.model import build_model
    from reir.training.probes.context import context_spread

    tiny = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"
    cfg = load_config(tiny, {"model.context_slots": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size)
    fresh = context_spread(model, images, min_objectness=0.0)
    assert fresh["state"] > 0 and fresh["context"] == 0.0 and fresh["own box"] == 0.0
    assert 0 < fresh["mean gate"] < 1
    torch.nn.init.normal_(model.context[-1].out.weight, std=0.3)
    assert context_spread(model, images, min_objectness=0.0)["context"] > 0
    with pytest.raises(ValueError, match=r"no query scored above objectness 0\.99"):
        context_spread(model, images, min_objectness=0.99)
    plain = build_model(load_config(tiny, {"model.context_slots": 0}).model)
    with pytest.raises(ValueError, match="no instance-context heads"):
        context_spread(plain, images)
