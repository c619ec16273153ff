"""Adding image files to a gallery (`Gallery.add_images`, `reir index`), resumably.

Images are keyed by the SHA-256 of their bytes: re-running the same command after a crash
(or on a grown directory) adds only what is not there yet. Every batch is one SQLite
transaction; the search index is saved at commit points and at the end. Unusable files are
reported by path and skipped; the summary says how many.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image as PILImage
from tqdm import tqdm

from reir.engine.gallery.records import NewImage
from reir.engine.runtime.image import ImageError, read_rgb

if TYPE_CHECKING:  # the gallery calls the indexer, not the other way round
    from reir.engine.gallery.gallery import Gallery
    from reir.engine.runtime.engine import Engine


@dataclass
class IndexReport:
    added: int = 0
    instances: int = 0
    already_indexed: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def summary(self) -> str:
        rate = self.added / self.seconds if self.seconds > 0 else 0.0
        return (
            f"added {self.added} image(s) ({self.instances} instances, {rate:.1f} images/s); "
            f"{self.already_indexed} already indexed; {self.skipped} skipped"
        )


def image_extensions() -> set[str]:
    return {ext for ext, fmt in PILImage.registered_extensions().items() if fmt in PILImage.OPEN}


def list_images(source: str | Path) -> tuple[list[Path], list[str]]:
    """Image paths from a directory (recursive, sorted) or a text file with one path per line
    (relative paths are relative to the file). Returns the paths and the problems found."""
    source = Path(source)
    problems: list[str] = []
    if source.is_dir():
        exts = image_extensions()
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        paths = [p for p in files if p.suffix.lower() in exts]
        problems += [f"{p}: unsupported format ({p.suffix or 'no extension'})" for p in files if p not in set(paths)]
        return paths, problems
    if source.is_file():
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ImageError(f"{source}: cannot read the image list ({e})") from None
        base = source.parent
        paths = [Path(x.strip()) if Path(x.strip()).is_absolute() else base / x.strip() for x in lines if x.strip()]
        return paths, problems
    raise ImageError(f"{source}: no such directory or list file")


def ingest(
    gallery: Gallery,
    engine: Engine,
    paths: list[Path],
    tags: dict[str, str] | None = None,
    batch: int = 32,
    save_every_s: float = 30.0,
    progress: bool = True,
) -> IndexReport:
    """What `Gallery.add_images` does (it checks the engine's model first)."""
    report = IndexReport()
    if gallery.query_sample() is None and engine.query_sample is not None:
        gallery.set_query_sample(engine.query_sample)
    t0 = last_save = time.perf_counter()
    seen: set[str] = set()
    bar = tqdm(total=len(paths), desc="indexing", unit="img", disable=not progress)
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        loaded = []
        for p in chunk:
            try:
                data = Path(p).read_bytes()
            except OSError as e:
                report.problems.append(f"{p}: cannot read ({e.strerror or e})")
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                report.already_indexed += 1
                continue
            seen.add(sha)
            loaded.append((p, sha, data))
        known = gallery.known([sha for _, sha, _ in loaded])
        report.already_indexed += sum(sha in known for _, sha, _ in loaded)
        fresh = []
        for p, sha, data in loaded:
            if sha in known:
                continue
            try:
                img = read_rgb(p, data)
            except ImageError as e:
                report.problems.append(str(e))
                continue
            fresh.append((p, sha, len(data), img))
        if fresh:
            dets = engine.detect([img for _, _, _, img in fresh])  # decoded once, resized once
            news = [
                NewImage(str(Path(p).resolve()), sha, img.width, img.height, n, d, tags)
                for (p, sha, n, img), d in zip(fresh, dets, strict=True)
            ]
            save = time.perf_counter() - last_save >= save_every_s
            gallery.add(news, save_index=save)
            if save:
                last_save = time.perf_counter()
            report.added += len(news)
            report.instances += sum(len(d.scores) for d in dets)
        bar.update(len(chunk))
        bar.set_postfix(added=report.added, skipped=report.skipped)
    bar.close()
    gallery.save()
    report.seconds = time.perf_counter() - t0
    return report
