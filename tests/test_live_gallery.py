"""A gallery read while it is written: a reader sees new writes on refresh(), and every
answer is the exact ranking of one committed generation. Real SQLite files, a writer and a
reader on their own connections, as two processes would have."""

from __future__ import annotations

import threading

import numpy as np
from random_gallery import exact_keys, images, sample

from reir.engine.gallery.gallery import Gallery

DIM = 48


def _keys(g: Gallery, q: np.ndarray, k: int) -> list[int]:
    return [h.instance_key for h in g.search(q, k=k, per_image=False)[0]]


def test_a_reader_sees_appends_and_removals_on_refresh(tmp_path):
    rng = np.random.default_rng(0)
    w = Gallery.create(tmp_path / "g", DIM, queries=sample(rng))
    w.add(images(rng, 100))
    r = Gallery.open(tmp_path / "g", progress=False)
    q = sample(np.random.default_rng(1), 1)[0]
    assert not r.refresh() and r.generation == w.generation

    new = w.add([*images(rng, 20, start=100, per=12), _pointing_at(q, 10_000)])
    assert r.generation != w.generation and new[-1] not in {h.image_id for h in r.search(q, k=5)[0]}
    assert r.refresh() and r.generation == w.generation
    assert r.search(q, k=1)[0][0].image_id == new[-1]  # the appended image, found by its index
    assert _keys(r, q, 10) == exact_keys(w, q, 10)

    # a removal the reader has not refreshed for: its hit is gone from SQLite, so the search
    # refreshes by itself and answers the new generation, never a ranking with a hole in it
    w.remove_images([new[-1]])
    before = r.generation
    assert _keys(r, q, 10) == exact_keys(w, q, 10) and r.generation > before
    r.close()
    w.close()


def test_every_answer_is_the_exact_ranking_of_a_committed_generation(tmp_path):
    """A writer adds and removes while a reader searches and refreshes: each answer must
    equal the exact top-k of one of the generations the writer committed."""
    rng = np.random.default_rng(2)
    w = Gallery.create(tmp_path / "g", DIM, queries=sample(rng))
    ids = w.add(images(rng, 60))
    queries = sample(np.random.default_rng(3), 4)
    states = [_exact_all(w, queries)]
    r = Gallery.open(tmp_path / "g", progress=False)
    done, answers = threading.Event(), []

    def read():
        while not done.is_set():
            r.refresh()
            answers.append(_batch(r, queries))  # one call: its four answers from one generation

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(12):
        if step % 3 == 2:
            w.remove_images(ids[step : step + 3])
        else:
            w.add(images(rng, 5, start=1000 + 10 * step))
        states.append(_exact_all(w, queries))
    done.set()
    reader.join()
    r.refresh()
    answers.append(_batch(r, queries))
    assert len(answers) > 12
    for a in answers:
        assert a in states, "an answer that no committed generation gives"
    assert answers[-1] == states[-1]  # and the reader ends at the last one
    r.close()
    w.close()


def _batch(g: Gallery, queries: np.ndarray) -> list[list[int]]:
    return [[h.instance_key for h in hits] for hits in g.search(queries, k=8, per_image=False)]


def _exact_all(g: Gallery, queries: np.ndarray) -> list[list[int]]:
    return [exact_keys(g, q, 8) for q in queries]


def _pointing_at(q: np.ndarray, i: int):
    """An image whose first instance lies far along q: the top hit of q once it is added."""
    im = images(np.random.default_rng(i), 1, start=i, per=3)[0]
    im.detections.embeddings[0] = 50 * q / np.linalg.norm(q)
    return im
