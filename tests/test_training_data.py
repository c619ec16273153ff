"""Training data: flips keep text, boxes and logical forms consistent; CLIA labels are exact."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from reir.datasets import load_dataset  # noqa: E402
from reir.datasets.synth.logic import satisfying  # noqa: E402
from reir.training.batches import TrainSet, collate, lookalike_keys, positives, twin_keys  # noqa: E402
from reir.training.clia import clia_labels, positive_matrix  # noqa: E402


def test_flipped_samples_stay_true(synth_small):
    ds = load_dataset(synth_small)
    always = TrainSet(ds, "train", 128, hflip=1.0, composed=3)
    never = TrainSet(ds, "train", 128, hflip=0.0, composed=3)
    n_texts = 0
    for idx in range(20):
        a, b = always[idx], never[idx]
        assert torch.equal(a.image, b.image.flip(-1))
        torch.testing.assert_close(a.boxes[:, 0], 1 - b.boxes[:, 0])
        for t in a.texts:  # every text (dataset or composed) is true of exactly its target
            assert satisfying(t.logic, a.objects, *a.orig_size) == [t.target], t.text
            n_texts += 1
        first_a, first_b = a.texts[0].text, b.texts[0].text
        if "left" in first_b.split():
            assert "right" in first_a.split()
    assert n_texts > 40  # composed expressions really are added


def test_flip_twins_mirror_the_scene_and_reverse_its_relations(synth_small):
    """A twin is its scene mirrored (x, y or both): same objects and attributes, pixels and
    boxes mirrored, its own texts true in its frame; a relation text of the original that is
    directional becomes false of the original's target in the twin."""
    import numpy as np

    ds = load_dataset(synth_small)
    ts = TrainSet(ds, "train", 128, hflip=0.5, composed=2)
    keys = twin_keys(list(range(10)), 8, np.random.default_rng(0))  # 10 = two batches of 4 + 2 left over
    assert [k for k, _ in keys] == [0, 1, 2, 3] * 2 + [4, 5, 6, 7] * 2  # 4 scenes then their twins, per batch
    assert [t for _, t in keys[:4]] == [0] * 4 and {t for _, t in keys[4:8]} <= {1, 2, 3}
    kinds, reversed_relations = set(), 0
    for idx in range(30):
        a = ts[idx]
        for kind in (1, 2, 3):
            b = ts[(idx, kind)]
            kinds.add(kind)
            want = a.image
            if kind & 1:
                want = want.flip(-1)
                torch.testing.assert_close(b.boxes[:, 0], 1 - a.boxes[:, 0])
            if kind & 2:
                want = want.flip(-2)
                torch.testing.assert_close(b.boxes[:, 1], 1 - a.boxes[:, 1])
            assert torch.equal(b.image, want)
            assert [(o.shape, o.color, o.size, o.fill) for o in b.objects] == [
                (o.shape, o.color, o.size, o.fill) for o in a.objects
            ]
            assert len(b.texts) == len(a.texts) and all(
                satisfying(t.logic, b.objects, *b.orig_size) == [t.target] for t in b.texts
            )
            t = a.texts[0]
            rel = (t.logic.get("relation") or {}).get("type")
            if (kind & 1 and rel in ("left_of", "right_of")) or (kind & 2 and rel in ("above", "below")):
                assert t.target not in satisfying(t.logic, b.objects, *b.orig_size), t.text
                reversed_relations += 1
    assert reversed_relations >= 5


def test_lookalike_groups_share_an_instance_and_describe_it_first(synth_small):
    """A look-alike group is a drawn image and `group` others that hold an instance of the
    same detection name; every member's first composed text is about that instance (unless
    its dataset expression already is), and every text stays true of exactly its target."""
    import numpy as np

    ds = load_dataset(synth_small)
    ts = TrainSet(ds, "train", 128, hflip=0.5, composed=2)  # shape names: 120 images hold each many times
    keys = lookalike_keys(ts, list(range(12)), 3, np.random.default_rng(0))
    assert [k[0] for k in keys[::4]] == list(range(12))  # every drawn image leads its group
    others, described = 0, 0
    for g in range(12):
        group = keys[4 * g : 4 * g + 4]
        name = group[0][2]
        assert {k[2] for k in group} == {name}
        for idx, twin, _ in group:
            assert twin == 0
            insts = ts.instances[ts.image_ids[idx]]
            holders = [n for n, i in enumerate(insts) if ts.name_of(i) == name]
            assert holders, f"image {idx} holds no {name!r}"
            s = ts[(idx, 0, name)]
            plain = ts[idx]
            assert s.texts[0].text == plain.texts[0].text  # the dataset expression: the same draw
            assert len(s.texts) == len(plain.texts)
            targets = [t.target for t in s.texts]
            # the dataset expression comes first; the composed ones start with the focus
            described += targets[0] in holders or targets[1] in holders
            for t in s.texts:
                assert satisfying(t.logic, s.objects, *s.orig_size) == [t.target], t.text
        others += len({k[0] for k in group}) - 1
    assert described == 48  # every member of every group describes its look-alike
    assert others >= 30  # partners are other images (a name held by one image only repeats it)


def test_positives_and_clia_labels(synth_small):
    ds = load_dataset(synth_small)
    ts = TrainSet(ds, "train", 128, hflip=0.5, composed=2)
    batch = collate([ts[i] for i in range(6)])
    texts = [(t.logic, i) for i, t in batch.texts()]
    pos = positives(batch.samples, texts, 0)
    k = 0
    for i, s in enumerate(batch.samples):
        for t in s.texts:
            assert pos[i][k] == [t.target]  # own text: its target
            for j, other in enumerate(batch.samples):  # other images: exactly where the logic holds
                if j != i:
                    assert pos[j][k] == satisfying(t.logic, other.objects, *other.orig_size)
            k += 1
    n = max(len(s.boxes) for s in batch.samples)
    owners = torch.zeros(len(batch.samples), n + 2, n)  # query q <-> object q; two queries own nothing
    for i, s in enumerate(batch.samples):
        owners[i, : len(s.boxes), : len(s.boxes)] = torch.eye(len(s.boxes))
    labels = clia_labels(owners, positive_matrix(pos, n, len(texts)))
    assert labels.shape == (len(batch.samples), n + 2, len(texts))
    for i in range(len(batch.samples)):
        for k in range(len(texts)):
            assert set(torch.nonzero(labels[i, :, k]).flatten().tolist()) == set(pos[i][k])


def test_unreadable_images_are_skipped(synth_small, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(synth_small, copy)
    ds = load_dataset(copy)
    ts = TrainSet(ds, "train", 128, hflip=0.0)
    ds.image_path(ts.image_ids[0]).write_bytes(b"not a png")
    batch = collate([ts[0], ts[1]])
    assert batch.skipped == 1 and len(batch.samples) == 1


def test_attribute_names_label_instances_with_their_attributes(synth_small):
    ds = load_dataset(synth_small)
    plain = TrainSet(ds, "train", 128, hflip=0.0)
    named = TrainSet(ds, "train", 128, hflip=0.0, attribute_names=True)
    assert set(plain.categories) == {i.category for i in ds.instances.values()}
    assert len(named.categories) > len(plain.categories)
    sample = named[0]
    insts = named.instances[named.image_ids[0]]
    for label, inst in zip(sample.labels.tolist(), insts, strict=True):
        a = inst.attributes
        assert named.categories[label] == f"{a['size']} {a['fill']} {a['color']} {a['shape']}"
        assert inst.category in named.categories[label]


def test_counterfactuals_are_false_of_their_source_target_and_one_field_away(synth_small):
    """Each contrast text is one field of an image's expression changed, false of that
    expression's target, rendered in the train lexicon; relations are preferred."""
    from reir.datasets.synth.grammar import train_vocabulary

    ds = load_dataset(synth_small)
    ts = TrainSet(ds, "train", 128, hflip=0.5, composed=3)
    assert ts[0].contrasts == []  # off unless a CLIA stage asks
    ts.contrasts = 2
    words, n, relations = train_vocabulary(), 0, 0
    for idx in range(40):
        s = ts[idx]
        assert len(s.contrasts) <= 2
        for c in s.contrasts:
            sources = [t for t in s.texts if _one_field_apart(t.logic, c.logic)]
            assert sources, c.logic
            assert any(t.target not in satisfying(c.logic, s.objects, *s.orig_size) for t in sources)
            assert set(c.text.split()) <= words and c.target == -1
            relations += bool(c.logic.get("relation"))
            n += 1
    assert n >= 60 and relations >= n // 3


def _one_field_apart(a: dict, b: dict) -> bool:
    def leaves(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    la, lb = leaves(a), leaves(b)
    return sum(la.get(k) != lb.get(k) for k in set(la) | set(lb)) == 1


def test_counterfactuals_are_clia_negatives_of_their_own_image_and_exact_elsewhere(synth_small):
    """In a batch, contrast texts come after the texts with targets and are labelled by exact
    semantics in every image, their own included (no object is assumed to be theirs)."""
    ds = load_dataset(synth_small)
    ts = TrainSet(ds, "train", 128, hflip=0.5, composed=2)
    ts.contrasts = 1
    batch = collate([ts[i] for i in range(8)])
    real, contrasts = batch.texts(), batch.contrasts()
    assert contrasts
    texts = [(t.logic, i) for i, t in real] + [(t.logic, i) for i, t in contrasts]
    pos = positives(batch.samples, texts, 0)
    for k, (owner, c) in enumerate(contrasts, start=len(real)):
        for i, s in enumerate(batch.samples):
            assert pos[i][k] == satisfying(c.logic, s.objects, *s.orig_size)
        source = [t for t in batch.samples[owner].texts if _one_field_apart(t.logic, c.logic)]
        assert any(t.target not in pos[owner][k] for t in source)
