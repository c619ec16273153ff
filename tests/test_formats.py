"""Readers, validation and the restricted unpickler, on fixtures built here."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from reir.datasets import DataError, drop_invalid, load_dataset, read_canonical, validate, write_canonical
from reir.datasets.refcoco import load_plain_pickle


def _image(path: Path, w: int = 64, h: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _coco(images, anns):
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "mug"}]}


@pytest.fixture
def refcoco_dir(tmp_path: Path) -> Path:
    d = tmp_path / "refcoco"
    d.mkdir()
    _image(d / "images" / "a.jpg")
    _image(d / "images" / "b.jpg")
    coco = _coco(
        [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
        ],
        [
            {"id": 100, "image_id": 1, "bbox": [1, 2, 10, 20], "category_id": 1},
            {"id": 101, "image_id": 2, "bbox": [5, 5, 5, 5], "category_id": 1},
        ],
    )
    (d / "instances.json").write_text(json.dumps(coco))
    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "sentences": [
                {"sent_id": 7, "raw": "the red mug", "sent": "the red mug", "tokens": ["the"]},
                {"sent_id": 8, "raw": "mug on the left", "sent": "mug on the left", "tokens": []},
            ],
        },
        {
            "ref_id": 1,
            "ann_id": 101,
            "image_id": 2,
            "split": "testA",
            "category_id": 1,
            "sentences": [{"sent_id": 9, "raw": "small mug", "sent": "small mug", "tokens": []}],
        },
    ]
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return d


def test_refcoco_reader(refcoco_dir: Path):
    ds = load_dataset(refcoco_dir)
    assert ds.counts() == {"images": 2, "instances": 2, "expressions": 3}
    assert ds.expressions[8].text == "mug on the left" and ds.expressions[8].instance_id == 100
    assert ds.instances[100].box == (1.0, 2.0, 11.0, 22.0)  # COCO xywh -> xyxy
    assert ds.expressions[9].split == "testA"
    assert validate(ds) == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path: Path):
    f = tmp_path / "refs(unc).p"
    f.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil()}]))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: unsafe pickle: refused to load 'posix.system'"):
        load_plain_pickle(f)
    f.write_bytes(pickle.dumps({"a": [1, 2.5, "x", None, (True,)]})[:-5])
    with pytest.raises(DataError, match="truncated or corrupt pickle"):
        load_plain_pickle(f)


def test_uninext_reader_merges_entries_of_one_picture(tmp_path: Path):
    f = tmp_path / "reir_coco_test.json"
    _image(tmp_path / "images" / "p.jpg")
    raw = {
        "images": [
            {"id": 1, "file_name": "p.jpg", "width": 64, "height": 48, "expressions": ["the cat", "a grey cat"]},
            {"id": 2, "file_name": "p.jpg", "width": 64, "height": 48, "expressions": ["the dog"]},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 0},
            {"id": 12, "image_id": 2, "bbox": [20, 20, 10, 10], "category_id": 1, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "object"}],
    }
    f.write_text(json.dumps(raw))
    ds = load_dataset(f)
    assert ds.counts() == {"images": 1, "instances": 2, "expressions": 3}  # one picture, two objects
    assert {e.split for e in ds.expressions.values()} == {"test"}  # from the file name
    assert {ds.instances[e.instance_id].image_id for e in ds.expressions.values()} == {1}
    assert validate(ds) == []


def test_canonical_roundtrip(tmp_path: Path, refcoco_dir: Path):
    ds = load_dataset(refcoco_dir)
    out = tmp_path / "canon"
    out.mkdir()
    write_canonical(ds, out, image_root=str(ds.image_root))
    again = read_canonical(out)
    assert again.counts() == ds.counts()
    assert again.instances[101].box == ds.instances[101].box
    assert again.expressions[7].text == "the red mug"
    assert validate(again) == []  # absolute image_root still finds the files


def _bad_canonical(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    _image(d / "images" / "1.png")
    images = [
        {"id": 1, "file_name": "1.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "missing.png", "width": 64, "height": 48},
        {"id": 1, "file_name": "dup.png", "width": 64, "height": 48},
    ]
    anns = [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1},
        {"id": 2, "image_id": 1, "bbox": [60, 40, 10, 10], "category_id": 1},  # outside 64x48
        {"id": 3, "image_id": 1, "bbox": [5, 5, 0, 4], "category_id": 1},  # zero width
        {"id": 4, "image_id": 99, "bbox": [0, 0, 4, 4], "category_id": 1},  # unknown image
        {"id": 5, "image_id": 1, "bbox": "oops", "category_id": 1},  # malformed
        {"id": 6, "image_id": 2, "bbox": [0, 0, 4, 4], "category_id": 1},  # on the missing file
    ]
    (d / "instances.json").write_text(json.dumps(_coco(images, anns)))
    refs = [
        {"id": 1, "instance_id": 1, "text": "fine", "split": "test"},
        {"id": 2, "instance_id": 1, "text": "   ", "split": "test"},
        {"id": 3, "instance_id": 42, "text": "ghost", "split": "test"},
        {"id": 4, "instance_id": 2, "text": "outside", "split": "test"},
        {"id": 5, "instance_id": 6, "text": "on a missing image", "split": "test"},
        {"id": 1, "instance_id": 1, "text": "duplicate id", "split": "test"},
    ]
    (d / "refs.json").write_text(json.dumps({"format": "clare-reir/refs", "version": 1, "refs": refs}))
    return d


def test_validate_names_file_record_and_problem(tmp_path: Path):
    d = _bad_canonical(tmp_path)
    ds = load_dataset(d)
    problems = validate(ds)
    found = {(Path(p.file).name, p.record, p.kind) for p in problems}
    assert found == {
        ("instances.json", "image 1", "duplicate_id"),
        ("instances.json", "image 2", "missing_file"),
        ("instances.json", "annotation 2", "box_outside_image"),
        ("instances.json", "annotation 3", "box_nonpositive"),
        ("instances.json", "annotation 4", "unknown_image"),
        ("instances.json", "annotation 5", "malformed"),
        ("refs.json", "expression 2", "empty_text"),
        ("refs.json", "expression 3", "unknown_instance"),
        ("refs.json", "ref 1", "duplicate_id"),
    }
    assert any("field 'bbox' should be list, got 'oops'" in p.message for p in problems)

    clean, dropped = drop_invalid(ds, problems)
    assert dropped["box_outside_image"] == 1 and dropped["missing_file"] == 1
    assert set(clean.images) == {1}
    assert set(clean.instances) == {1}  # 6 went with its missing image
    assert set(clean.expressions) == {1}  # 4 and 5 went with their instances
    assert validate(clean) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "refs.json: file not found"),
        ("{not json", "refs.json: not valid JSON"),
        ('{"format": "something-else"}', "not a clare-reir refs file"),
        ('{"format": "clare-reir/refs", "version": 99, "refs": []}', "format version 99 is not supported"),
        ('{"format": "clare-reir/refs", "version": 1}', "missing list field 'refs'"),
    ],
)
def test_unreadable_files_raise_one_clear_error(tmp_path: Path, content, message):
    (tmp_path / "instances.json").write_text(json.dumps(_coco([], [])))
    if content is not None:
        (tmp_path / "refs.json").write_text(content)
    with pytest.raises(DataError, match=message):
        read_canonical(tmp_path)
