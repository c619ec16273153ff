"""The `reir` command line, run as a user runs it: a subprocess, checked output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image as PILImage


def reir(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_synth_validate_stats_show(tmp_path: Path):
    out = tmp_path / "synth-data"
    r = reir("synth", "--out", str(out), "--images", "60", "--seed", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout and "test-novel" in r.stdout
    r = reir("data", "validate", str(out))
    assert r.returncode == 0 and "OK (60 images" in r.stdout
    r = reir("data", "stats", str(out), "--json")
    st = json.loads(r.stdout)
    assert st["counts"]["images"] == 60 and set(st["splits"]) == {"train", "val", "test", "test-novel"}
    refs = json.loads((out / "refs.json").read_text())["refs"]
    png = tmp_path / "show.png"
    r = reir("data", "show", str(out), "--expr", str(refs[0]["id"]), "-o", str(png))
    assert r.returncode == 0, r.stderr
    img = PILImage.open(png)
    assert img.width >= 384 and img.height > img.width  # scaled up, text band below


def test_synth_refuses_to_overwrite_and_leaves_no_partial_output(tmp_path: Path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = reir("synth", "--out", str(out), "--images", "5", "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (out / "keep.txt").read_text() == "user data"
    assert not list(tmp_path.glob(".d.*"))  # no temp directory left behind


def test_bad_input_gives_one_clear_line(tmp_path: Path):
    r = reir("data", "validate", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "instances.json").write_text('{"images": [], "annotations": []}')
    (bad / "refs.json").write_text("{oops")
    r = reir("data", "stats", str(bad))
    assert r.returncode == 2 and "refs.json: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = reir("synth", "--out", str(tmp_path / "x"), "--images", "5", "--splits", "0.5,0.5")
    assert r.returncode == 2 and "--splits" in r.stderr


def test_validate_skip_invalid_and_convert(tmp_path: Path):
    d = tmp_path / "raw"
    (d / "images").mkdir(parents=True)
    PILImage.new("RGB", (32, 32)).save(d / "images" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [0, 0, 8, 8], "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [30, 30, 8, 8], "category_id": 1},
        ],
    }
    (d / "instances.json").write_text(json.dumps(coco))
    refs = [
        {"ref_id": 0, "ann_id": 1, "split": "val", "sentences": [{"sent_id": 0, "raw": "left thing"}]},
        {"ref_id": 1, "ann_id": 2, "split": "val", "sentences": [{"sent_id": 1, "raw": "thing off the edge"}]},
    ]
    import pickle

    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    r = reir("data", "validate", str(d))
    assert r.returncode == 1
    assert "instances.json: annotation 2: box_outside_image" in r.stderr
    r = reir("data", "validate", str(d), "--skip-invalid")
    assert r.returncode == 0 and "skipped 1 invalid record(s): box_outside_image 1" in r.stderr
    r = reir("data", "convert", str(d), "--out", str(tmp_path / "canon"))
    assert r.returncode == 2 and "--skip-invalid" in r.stderr and not (tmp_path / "canon").exists()
    r = reir("data", "convert", str(d), "--out", str(tmp_path / "canon"), "--skip-invalid")
    assert r.returncode == 0, r.stderr
    r = reir("data", "validate", str(tmp_path / "canon"))
    assert r.returncode == 0 and "1 images, 1 instances, 1 expressions" in r.stdout
