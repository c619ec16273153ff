"""The synthetic benchmark: exact boxes, unique expressions, exact multi-positive GT."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from reir.datasets import load_dataset, validate
from reir.datasets.synth import SynthConfig, generate, render_one
from reir.datasets.synth.grammar import Phraser, train_vocabulary
from reir.datasets.synth.logic import satisfying
from reir.datasets.synth.scene import SHAPES, SceneObject, render_scene


def obj(shape, color, box, size="medium", fill="solid"):
    return SceneObject(shape, color, size, fill, box)


# A 100x100 scene:   red circle (left, top) · blue star (right, top) · red circle (left, bottom)
#                    small green square next to the blue star
SCENE = [
    obj("circle", "red", (5, 5, 25, 25), size="large"),
    obj("star", "blue", (70, 5, 90, 25)),
    obj("circle", "red", (5, 70, 17, 82), size="small"),
    obj("square", "green", (92, 8, 99, 15), size="small"),
]


@pytest.mark.parametrize(
    "logic, expected",
    [
        ({"target": {"color": "red"}}, [0, 2]),
        ({"target": {"color": "red", "size": "small"}}, [2]),
        ({"target": {"shape": "circle"}, "location": {"v": "top"}}, [0]),
        ({"target": {"shape": "circle"}, "location": {"h": "left", "v": "bottom"}}, [2]),
        ({"target": {}, "location": {"h": "right"}}, [1, 3]),
        ({"target": {"shape": "circle"}, "relation": {"type": "left_of", "anchor": {"shape": "star"}}}, [0, 2]),
        ({"target": {"shape": "circle"}, "relation": {"type": "above", "anchor": {"shape": "circle"}}}, [0]),
        ({"target": {}, "relation": {"type": "next_to", "anchor": {"shape": "star"}}}, [3]),
        ({"target": {}, "relation": {"type": "right_of", "anchor": {"color": "blue"}}}, [3]),
        ({"target": {"shape": "circle"}, "superlative": {"by": "area", "descending": True, "rank": 1}}, [0]),
        ({"target": {}, "superlative": {"by": "x", "descending": True, "rank": 1}}, [3]),
        ({"target": {}, "superlative": {"by": "x", "descending": True, "rank": 2}}, [1]),
        # circles 0 and 2 share the same centre x: "the leftmost circle" is undecidable -> nobody
        ({"target": {"shape": "circle"}, "superlative": {"by": "x", "descending": False, "rank": 1}}, []),
        ({"target": {"color": "purple"}}, []),
    ],
)
def test_logic_semantics_on_a_hand_built_scene(logic, expected):
    assert satisfying(logic, SCENE, 100, 100) == expected


def test_exact_answer_sets_match_brute_force(synth_small: Path):
    """The benchmark's answer sets equal a brute-force evaluation over every gallery image."""
    ds = load_dataset(synth_small)
    cfg = SynthConfig(images=120, seed=7)
    scenes = {i + 1: render_one(cfg, i, None)[1].objects for i in range(cfg.images)}
    insts_of = ds.instances_by_image()
    checked = 0
    for split, gallery_split in (("test", "test"), ("test-novel", "test"), ("val", "val")):
        gallery = [i for i, im in ds.images.items() if im.split == gallery_split]
        for e in ds.split_expressions(split):
            want = set()
            for image_id in gallery:
                ids = sorted(i.id for i in insts_of[image_id])
                want.update(ids[k] for k in satisfying(e.logic, scenes[image_id], 128, 128))
            assert set(e.answers) == want, e.text
            assert e.instance_id in want
            checked += 1
    assert checked > 50


def test_answer_sample_answers_only_the_drawn_expressions_and_answers_them_exactly(synth_small: Path, tmp_path: Path):
    """`answer_sample`: N test expressions (and their test-novel twins) get the same answer sets
    as a full run over the same images; the rest get none, and nothing else changes."""
    full = load_dataset(synth_small)
    ds, _ = generate(tmp_path / "s", SynthConfig(images=120, seed=7, answer_sample=5), progress=False)
    ds = load_dataset(tmp_path / "s")
    assert ds.expressions.keys() == full.expressions.keys()
    for split in ("test", "val"):
        answered = [e for e in ds.split_expressions(split) if e.answers is not None]
        assert len(answered) == 5 < len(ds.split_expressions(split))
        for e in answered:
            assert e.answers == full.expressions[e.id].answers
    novel = [e for e in ds.split_expressions("test-novel") if e.answers is not None]
    picked = {(e.instance_id, json.dumps(e.logic)) for e in ds.split_expressions("test") if e.answers is not None}
    assert sorted((e.instance_id, json.dumps(e.logic)) for e in novel) == sorted(picked)  # one rephrasing each
    assert all(e.answers == full.expressions[e.id].answers for e in novel)
    again, _ = generate(tmp_path / "t", SynthConfig(images=120, seed=7, answer_sample=5), progress=False)
    assert [e.id for e in again.expressions.values() if e.answers is not None] == [
        e.id for e in ds.expressions.values() if e.answers is not None
    ]


def test_every_expression_is_unique_in_its_image(synth_small: Path):
    ds = load_dataset(synth_small)
    cfg = SynthConfig(images=120, seed=7)
    insts_of = ds.instances_by_image()
    for e in ds.expressions.values():
        image_id = ds.instances[e.instance_id].image_id
        objs = render_one(cfg, image_id - 1, None)[1].objects
        ids = sorted(i.id for i in insts_of[image_id])
        assert [ids[k] for k in satisfying(e.logic, objs, 128, 128)] == [e.instance_id], e.text


def test_boxes_are_tight_to_the_drawn_pixels():
    from reir.datasets.synth.scene import COLOR_JITTER, COLORS, MIN_VISIBLE, shape_mask

    rng = np.random.default_rng(3)
    owner = np.empty((128, 128), np.int16)
    for _ in range(30):
        image, objs = render_scene(rng, 128, owner_out=owner)
        for i, o in enumerate(objs):
            ys, xs = np.nonzero(owner == i)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # The pixels it owns carry its colour (jitter + noise at most).
            err = np.abs(image[owner == i].astype(int) - np.array(COLORS[o.color])).max()
            assert err <= COLOR_JITTER + 7
            # Occlusion is bounded: at least MIN_VISIBLE of the full shape shows.
            side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            full = shape_mask(o.shape, side, o.fill).sum()
            assert len(xs) >= MIN_VISIBLE * full * 0.9


def test_scene_variety():
    rng = np.random.default_rng(0)
    seen = {"shape": set(), "color": set(), "size": set(), "fill": set()}
    counts = []
    for _ in range(200):
        _, objs = render_scene(rng, 128)
        counts.append(len(objs))
        for o in objs:
            for k in seen:
                seen[k].add(o.attr(k))
    assert len(seen["shape"]) == len(SHAPES) >= 6 and len(seen["color"]) == 8
    assert len(seen["size"]) == 3 and len(seen["fill"]) == 2
    assert min(counts) >= 3 and max(counts) <= 8


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_and_independent_of_workers(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, SynthConfig(images=30, seed=3), progress=False)
    generate(b, SynthConfig(images=30, seed=3, workers=2), progress=False)
    assert _digest(a / "images") == _digest(b / "images")
    ja, jb = (json.loads((p / "refs.json").read_text()) for p in (a, b))
    ja["meta"]["generator"].pop("workers"), jb["meta"]["generator"].pop("workers")
    assert ja == jb
    c = tmp_path / "c"
    generate(c, SynthConfig(images=30, seed=4), progress=False)
    assert _digest(a / "images") != _digest(c / "images")


def test_generated_images_decode_to_the_rendered_pixels(synth_small: Path):
    img, _ = render_one(SynthConfig(images=120, seed=7), 11, None)
    assert np.array_equal(np.asarray(PILImage.open(synth_small / "images" / "0000012.png")), img)


def test_dataset_validates_and_has_all_splits(synth_small: Path):
    ds = load_dataset(synth_small)
    assert validate(ds) == []
    assert set(ds.splits()) == {"train", "val", "test", "test-novel"}
    assert ds.meta["generator"]["version"] and ds.meta["splits"]["test"]["images"] == 24
    train_imgs = {ds.instances[e.instance_id].image_id for e in ds.split_expressions("train")}
    test_imgs = {ds.instances[e.instance_id].image_id for e in ds.split_expressions("test")}
    assert not train_imgs & test_imgs
    assert {e.type for e in ds.split_expressions("test")} == {"attribute", "location", "relation", "superlative"}


def test_novel_phrasings_never_occur_in_train(synth_small: Path):
    ds = load_dataset(synth_small)
    vocab = train_vocabulary()
    train_words = {w for e in ds.split_expressions("train") for w in e.text.split()}
    assert train_words <= vocab  # the vocabulary function really covers the train lexicon
    novel = ds.split_expressions("test-novel")
    assert novel and all(e.novel for e in novel)
    for e in novel:
        assert set(e.text.split()) - vocab, f"no novel word in {e.text!r}"
    # Same logical forms as the test split, other words.
    by_logic = {json.dumps(e.logic, sort_keys=True) for e in ds.split_expressions("test")}
    assert all(json.dumps(e.logic, sort_keys=True) in by_logic for e in novel)


def test_phraser_renders_every_construct():
    rng = np.random.default_rng(0)
    p = Phraser(rng)
    text = p.render(
        {
            "target": {"shape": "circle", "color": "red", "size": "large", "fill": "solid"},
            "location": {"h": "left", "v": "top"},
            "relation": {"type": "left_of", "anchor": {"shape": "star", "color": "blue"}},
        }
    )
    assert "left" in text and any(w in text for w in ("star",)) and len(text.split()) >= 10
    sup = p.render({"target": {"shape": "square"}, "superlative": {"by": "x", "descending": False, "rank": 2}})
    assert sup.startswith("the second") and sup.endswith("from the left")


def test_hard_queries_are_at_least_a_third(tmp_path: Path):
    ds, _ = generate(tmp_path / "d", SynthConfig(images=1000, seed=0), progress=False)
    test = ds.split_expressions("test")
    few = [len(ds.answer_image_ids(e)) <= 3 for e in test]
    assert np.mean(few) >= 1 / 3
