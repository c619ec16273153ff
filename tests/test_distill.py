"""The distilled text tower (export/distill_text.py) and the text side rebuilt from a graph
(export/text_from_graph.py): real graphs, real training steps, real gates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (training extra)")
pytest.importorskip("onnx", reason="onnx not installed (export extra)")

import torch

from reir.engine.runtime.bundle import Bundle, default_bundle

pytestmark = pytest.mark.export

TEACHER = Path(__file__).resolve().parents[1] / "models" / "synth-teacher"
TEXTS = [
    "the red circle left of the blue star",
    "a small green square",
    "the second largest hollow yellow triangle in the upper right",
    "the cross",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("which", ["shipped", "teacher", "tiny"])
def test_the_text_side_rebuilt_from_a_graph_gives_the_graphs_queries(which, request):
    from reir.export.text_from_graph import text_model

    path = {"shipped": default_bundle(), "teacher": TEACHER}.get(which) or request.getfixturevalue("tiny_bundle")
    bundle = Bundle.open(path)
    model = text_model(bundle)
    ids, mask, _ = bundle.tokenizer()(TEXTS)
    with torch.no_grad():
        q = model.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).numpy()
    ref = bundle.text_encoder(optimized=False)(TEXTS)
    assert np.abs(q - ref).max() <= 1e-5 * np.abs(ref).max()


def test_the_shipped_tower_is_a_two_layer_student_in_the_teachers_embedding_space():
    """Galleries indexed with the teacher stay valid: same model_id, the same visual graph,
    and queries that point where the teacher's do (recomputed here, not read back)."""
    from reir.datasets.synth.generate import SynthConfig, generate
    from reir.export.text_from_graph import text_model

    student, teacher = Bundle.open(default_bundle()), Bundle.open(TEACHER)
    assert student.model_id == teacher.model_id
    assert student.manifest["files"]["visual_encoder.onnx"] == teacher.manifest["files"]["visual_encoder.onnx"]
    assert len(text_model(student).text.model.encoder.layer) == 2
    assert len(text_model(teacher).text.model.encoder.layer) == 6
    entry = student.manifest["text"]["distilled"]
    assert entry["layers"] == [0, 5] and all(g["passed"] for g in entry["gates"])
    assert entry["after"]["error"] < 0.1 * entry["before"]["error"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # a seed neither the distillation nor the gates used
        ds, _ = generate(Path(tmp) / "d", SynthConfig(images=200, seed=4321, fractions=(0, 0, 1)), progress=False)
        texts = [e.text for e in ds.split_expressions("test")]
    # in-domain phrasings only: on the novel-phrasing split the student's queries move (mean
    # cosine about 0.85), where neither model retrieves better than chance (docs/deployment.md)
    cos = _cos(student.text_encoder()(texts), teacher.text_encoder()(texts))
    assert cos.mean() >= 0.98 and cos.min() >= 0.9


def test_a_student_keeps_what_the_teacher_froze_frozen():
    from reir.export.distill_text import student_of
    from reir.export.text_from_graph import text_model

    teacher = text_model(Bundle.open(TEACHER))
    student = student_of(teacher, (0, 5))
    layer0, layer1 = student.text.model.encoder.layer
    assert not any(p.requires_grad for p in layer0.parameters())  # pretrained, frozen in training
    assert all(p.requires_grad for p in layer1.parameters())  # the teacher's trained top layer
    words = student.text.model.embeddings.word_embeddings.weight
    assert words.requires_grad and not teacher.text.model.embeddings.word_embeddings.weight.requires_grad
    others = [p for p in student.text.model.embeddings.parameters() if p is not words]
    assert others and not any(p.requires_grad for p in others)  # positions, LayerNorm: as the teacher
    assert all(p.requires_grad for p in student.text_proj[-1].parameters())
    assert len(teacher.text.model.encoder.layer) == 6  # the teacher is left whole
    for bad in [(), (5, 0), (0, 6), (1, 1)]:
        with pytest.raises(ValueError, match="layers"):
            student_of(teacher, bad)


def test_distillation_lowers_the_error_and_a_failed_gate_writes_nothing(tmp_path):
    from reir.export.distill_text import distill, distill_bundle, grammar_texts, student_of
    from reir.export.gates import GateError
    from reir.export.text_from_graph import text_model

    bundle = Bundle.open(TEACHER)
    teacher = text_model(bundle)
    student = student_of(teacher, (0, 5))
    ids, mask, _ = bundle.tokenizer()(grammar_texts(tmp_path, 1200))
    done = distill(teacher, student, torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), 40, 64, 3e-4, 0)
    assert done["after"]["error"] < 0.7 * done["before"]["error"]
    assert done["after"]["cos_mean"] > done["before"]["cos_mean"]
    rows = student.text.model.embeddings.word_embeddings.weight.detach()
    unseen = np.setdiff1d(np.arange(len(rows)), ids)
    seen = np.unique(ids[mask.astype(bool)])
    before = teacher.text.model.embeddings.word_embeddings.weight.detach()
    assert torch.equal(rows[unseen], before[unseen])  # a word the texts lack keeps its row
    assert not torch.equal(rows[seen], before[seen])

    out = tmp_path / "out" / "student"
    with pytest.raises(GateError, match="distilled text encoder"):  # 2 steps cannot match the teacher
        distill_bundle(TEACHER, out, steps=2, texts=600, probe_images=60, log=lambda *_: None)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no bundle, no temp directory


def test_cli_distill_text_names_bad_arguments(tmp_path):
    def reir(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=120)

    r = reir("export", "distill-text", str(TEACHER), "--out", str(tmp_path / "x"), "--layers", "0,,5")
    assert r.returncode != 0 and "--layers" in r.stderr and "Traceback" not in r.stderr
    r = reir("export", "distill-text", str(TEACHER), "--out", str(tmp_path))
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
