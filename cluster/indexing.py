"""Distributed indexing on Ray Data: CPU tasks read, hash, decode and resize; an actor pool
runs the visual encoder (one ONNX Runtime session per actor, a GPU each where there are
GPUs); the driver writes every shard through its one writer.

    paths ──read tasks (CPU)──> pixels ──Encoder actors──> detections ──driver──> shard-00k/

Resuming is by content hash, as on one host: the hashes already stored go to every read
task (a sorted array in the object store), which skips those images before decoding them;
the driver checks again before each transaction, so an image is written exactly once even
when Ray re-runs a task after a lost node. A killed job loses only what it had not yet
committed; re-running the same command finishes it.

The driver must see the gallery directory; every node must see the images and the bundle
(same paths: one host, or a shared file system).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from reir.engine.gallery.gallery import Gallery
from reir.engine.gallery.ingest import IndexReport, list_images
from reir.engine.gallery.records import NewImage
from reir.engine.runtime.bundle import Bundle
from reir.engine.runtime.detections import Detections
from reir.engine.runtime.engine import Engine
from reir.engine.runtime.image import ImageError, read_rgb, resize_rgb

SAVE_EVERY_S = 30.0  # index commit points while writing, as `reir index` does


def list_source(source: str | Path | list) -> tuple[list[Path], list[str]]:
    """Image paths from a directory, a list file, a Parquet manifest with a `path` column
    (relative paths are relative to the manifest), or a list of paths."""
    if isinstance(source, list | tuple):
        return [Path(p) for p in source], []
    source = Path(source)
    if source.suffix != ".parquet":
        return list_images(source)
    import pyarrow.parquet as pq  # comes with ray[data]; only Parquet manifests need it

    try:
        table = pq.read_table(source)
    except (OSError, ValueError) as e:
        raise ImageError(f"{source}: not a readable Parquet manifest ({e})") from None
    if "path" not in table.column_names:
        raise ImageError(f"{source}: the manifest needs a 'path' column (has {table.column_names})")
    paths = [Path(p) for p in table.column("path").to_pylist() if p]
    return [p if p.is_absolute() else source.parent / p for p in paths], []


def _digest(sha256_hex: str) -> bytes:
    return bytes.fromhex(sha256_hex)[:16]


def _known_array(gallery: Gallery) -> np.ndarray:
    """Every stored image's hash (first 16 bytes: collisions are out of reach), sorted."""
    rows = [_digest(r[0]) for g in gallery.shards for r in g.db.execute("SELECT sha256 FROM images")]
    return np.sort(np.array(rows, dtype="S16")) if rows else np.zeros(0, "S16")


def read_batch(batch: dict, known: np.ndarray, input_hw: tuple[int, int]) -> dict:
    """CPU task: bytes, hash, decode and resize; known images and bad files pass through
    without pixels (`status` says which)."""
    h, w = input_hw
    n = len(batch["path"])
    out = {k: [] for k in ("path", "sha256", "width", "height", "bytes", "status")}
    pixels = np.zeros((n, h, w, 3), np.uint8)
    for i, p in enumerate(batch["path"]):
        sha, width, height, size, status = "", 0, 0, 0, "ok"
        try:
            data = Path(p).read_bytes()
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
            digest = np.bytes_(_digest(sha))
            pos = int(np.searchsorted(known, digest))
            if pos < len(known) and known[pos] == digest:
                status = "known"
            else:
                img = read_rgb(p, data)
                width, height = img.size
                pixels[i] = resize_rgb(img, h, w)
        except OSError as e:
            status = f"{p}: cannot read ({e.strerror or e})"
        except ImageError as e:
            status = str(e)
        for key, value in zip(out, (str(p), sha, width, height, size, status), strict=True):
            out[key].append(value)
    return {k: np.array(v) for k, v in out.items()} | {"pixels": pixels}


class Encoder:
    """Actor: the visual graph on prepared pixels. Detections travel back as bytes (each
    image has its own number of instances)."""

    def __init__(self, bundle: str, threads: int = 1, device: str = "cpu"):
        self.engine = Engine(Bundle.open(bundle), device=device, threads=threads)

    def __call__(self, batch: dict) -> dict:
        ok = np.flatnonzero(batch["status"] == "ok")
        n = len(batch["path"])
        det = {"boxes": [b""] * n, "scores": [b""] * n, "embeddings": [b""] * n}
        if len(ok):
            sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in ok]
            found = self.engine.detect_prepared(batch["pixels"][ok], sizes)
            for i, d in zip(ok, found, strict=True):
                det["boxes"][i] = d.boxes.astype(np.float64).tobytes()
                det["scores"][i] = d.scores.astype(np.float32).tobytes()
                det["embeddings"][i] = d.embeddings.astype(np.float32).tobytes()
        keep = {k: v for k, v in batch.items() if k != "pixels"}
        return keep | {k: np.array(v, dtype=object) for k, v in det.items()}


def _detections(row: dict, dim: int) -> Detections:
    boxes = np.frombuffer(row["boxes"], np.float64).reshape(-1, 4)
    return Detections(
        boxes, np.frombuffer(row["scores"], np.float32), np.frombuffer(row["embeddings"], np.float32).reshape(-1, dim)
    )


def index_on_ray(
    source: str | Path | list,
    gallery: str | Path,
    bundle: str | Path,
    shards: int | None = None,
    workers: int = 2,
    batch: int = 16,
    tags: dict[str, str] | None = None,
    gpus_per_worker: float = 0.0,
    progress: bool = True,
) -> IndexReport:
    """Index SOURCE into the gallery at `gallery` (created with `shards` shards when new,
    default 1) on the connected Ray cluster. Returns the report `reir index` prints."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    paths, problems = list_source(source)
    b = Bundle.open(bundle)
    g = Gallery.for_bundle(Path(gallery), b, shards, progress=False)
    report = IndexReport(problems=list(problems))
    t0 = last_save = time.perf_counter()
    try:
        known = _known_array(g)  # shipped to the read tasks once, with the operator
        ds = ray.data.from_items([{"path": str(Path(p).resolve())} for p in paths])
        ds = ds.map_batches(read_batch, fn_kwargs={"known": known, "input_hw": b.input_hw}, batch_size=batch)
        ds = ds.map_batches(
            Encoder,
            fn_constructor_kwargs={"bundle": str(b.path), "device": "cuda" if gpus_per_worker else "cpu"},
            batch_size=batch,
            concurrency=(1, workers),  # a pool that shrinks when a node is lost, instead of waiting
            num_gpus=gpus_per_worker or None,
        )
        seen: set[str] = set()
        bar = tqdm(total=len(paths), desc="indexing", unit="img", disable=not progress)
        for rows in ds.iter_batches(batch_size=batch, batch_format="numpy"):  # a transaction per batch
            news = _new_images(rows, g, seen, report, tags)
            save = time.perf_counter() - last_save >= SAVE_EVERY_S
            if news:
                g.add(news, save_index=save)
                report.added += len(news)
                report.instances += sum(len(n.detections.scores) for n in news)
            if save:
                last_save = time.perf_counter()
            bar.update(len(rows["path"]))
            bar.set_postfix(added=report.added, skipped=report.skipped)
        bar.close()
        g.save()
    finally:
        g.close()
    report.seconds = time.perf_counter() - t0
    return report


def _new_images(rows: dict, g: Gallery, seen: set[str], report: IndexReport, tags) -> list[NewImage]:
    """The rows to write: not stored, not seen earlier in this run (a re-run task's output
    arrives twice), and not broken."""
    ok = [i for i, s in enumerate(rows["status"]) if s == "ok"]
    stored = g.known([str(rows["sha256"][i]) for i in ok])
    news = []
    for i, status in enumerate(rows["status"]):
        sha = str(rows["sha256"][i])
        if status not in ("ok", "known"):
            report.problems.append(str(status))
        elif status == "known" or sha in stored or sha in seen:
            report.already_indexed += 1
        else:
            seen.add(sha)
            d = _detections({k: rows[k][i] for k in ("boxes", "scores", "embeddings")}, g.dim)
            w, h = int(rows["width"][i]), int(rows["height"][i])
            news.append(NewImage(str(rows["path"][i]), sha, w, h, int(rows["bytes"][i]), d, tags))
    return news
