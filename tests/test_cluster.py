"""Real Ray, real local clusters (2 to 3 nodes on this host), every process on 127.0.0.1.

Each test (or, for the serving tests, the module's served app) starts and stops its own
cluster. Traffic goes to loopback only, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray not installed (cluster extra)")
pytestmark = pytest.mark.cluster

from reir.cluster.indexing import index_on_ray  # noqa: E402
from reir.cluster.local import LocalCluster  # noqa: E402
from reir.engine.gallery.gallery import Gallery  # noqa: E402
from reir.engine.runtime.bundle import default_bundle  # noqa: E402
from reir.engine.serving.serve_client import AsyncServeRetriever, ServeRetriever  # noqa: E402


def _loopback(addresses: set[str]) -> bool:
    out = []
    for a in addresses:
        ip = ipaddress.ip_address(a)
        mapped = getattr(ip, "ipv4_mapped", None)
        out.append((mapped or ip).is_loopback)
    return bool(addresses) and all(out)


def _rows(g) -> dict[str, list[tuple]]:
    """sha256 -> [(box, detection score, embedding)] over every shard."""
    out = {}
    for shard in g.shards:
        q = (
            "SELECT m.sha256, i.x1, i.y1, i.x2, i.y2, i.score, i.embedding FROM instances i "
            "JOIN images m ON m.id = i.image_id ORDER BY i.key"
        )
        for sha, *box, score, emb in shard.db.execute(q):
            out.setdefault(sha, []).append((np.array(box), score, np.frombuffer(emb, np.float32)))
    return out


@pytest.fixture(scope="module")
def single(synth_small, tmp_path_factory):
    """The reference: the same images indexed by one process."""
    from reir.engine.runtime.engine import Engine

    engine = Engine.open(default_bundle(), threads=2)
    g = Gallery.for_bundle(tmp_path_factory.mktemp("single") / "g", engine.bundle)
    g.add_images(sorted((synth_small / "images").glob("*.png")), engine)
    yield g
    g.close()


def test_distributed_indexing_equals_one_process(synth_small, single, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_small / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with LocalCluster(nodes=3) as cluster:
        report = index_on_ray(images, tmp_path / "g", default_bundle(), shards=3, workers=2, progress=False)
        assert report.added == 120 and report.skipped == 1
        assert "broken.png" in report.problems[0]
        again = index_on_ray(images, tmp_path / "g", default_bundle(), workers=2, progress=False)
        assert again.added == 0 and again.already_indexed == 120  # resumed: nothing twice
        assert _loopback(cluster.listening_addresses())
    with Gallery.open(tmp_path / "g", progress=False) as g:
        assert [s.images for s in g.info().per_shard] != [120, 0, 0]
        mine, ref = _rows(g), _rows(single)
        assert set(mine) == set(ref)  # same images
        for sha, rows in ref.items():
            assert len(mine[sha]) == len(rows)  # same instances
            for (box, score, emb), (box2, score2, emb2) in zip(mine[sha], rows, strict=True):
                np.testing.assert_allclose(box, box2, atol=1e-3)
                assert abs(score - score2) < 1e-4
                np.testing.assert_allclose(emb, emb2, atol=2e-3 * max(1.0, float(np.abs(emb2).max())))


def test_a_worker_node_killed_mid_indexing_loses_nothing_and_duplicates_nothing(synth_small, single, tmp_path):
    """The head runs no tasks here, so every encoder actor sits on a worker node; one of
    them is killed once the first images are committed. The job (or its re-run) must end
    with every image exactly once."""
    target = tmp_path / "g"
    errors = []
    with LocalCluster(nodes=3, head_cpus=0) as cluster:

        def job():
            try:
                index_on_ray(synth_small / "images", target, default_bundle(), shards=2, workers=2, progress=False)
            except Exception as e:  # a lost node may fail the job: the re-run below must finish it
                errors.append(e)

        t = threading.Thread(target=job)
        t.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _committed(target) == 0:
            time.sleep(0.2)
        assert _committed(target) > 0, "no image was committed before the kill"
        cluster.kill_node(cluster.workers[0])
        cluster.add_node()  # a replacement, as an autoscaler would start
        t.join(timeout=300)
        assert not t.is_alive(), "the indexing job hung after losing a node"
        report = index_on_ray(synth_small / "images", target, default_bundle(), workers=2, progress=False)
        assert report.added + report.already_indexed == 120
    with Gallery.open(target, progress=False) as g:
        assert g.info().images == 120
        assert set(_rows(g)) == set(_rows(single))
        assert g.check() == []


def _committed(path) -> int:
    import sqlite3

    total = 0
    for db in path.glob("shard-*/gallery.sqlite"):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                total += c.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            pass
    return total


# -- serving -----------------------------------------------------------------------------
PORT = 18741


@pytest.fixture(scope="module")
def served(synth_small, single, tmp_path_factory):
    """A 2-shard copy of the single gallery (`main`, the default) and a small one (`broken`,
    for a fault) served by Ray Serve on a 2-node cluster, two replicas per shard."""
    from ray import serve

    from reir.cluster.serving import build_app, start
    from reir.datasets import load_dataset
    from reir.engine.runtime.engine import Engine

    root = tmp_path_factory.mktemp("root")
    engine = Engine.open(default_bundle(), threads=2)
    images = sorted((synth_small / "images").glob("*.png"))
    with Gallery.create(root / "main", engine.dim, model=engine.model_id, shards=2) as g:
        g.add_images(images, engine)
    with Gallery.create(root / "broken", engine.dim, model=engine.model_id, shards=2) as g:
        g.add_images(images[:20], engine)
    texts = sorted({e.text for e in load_dataset(synth_small).expressions.values()})[:40]
    with LocalCluster(nodes=2) as cluster:
        app = build_app(default_bundle(), root, ["main", "broken"], replicas=2, deadline_s=5.0, default="main")
        url = start(app, port=PORT)
        _ready(url, texts[0])
        yield cluster, url, texts, engine, root
        serve.shutdown()


def _ready(url: str, text: str, within_s: float = 120) -> None:
    """A readiness probe, as a load balancer would run one: a full answer from every shard
    (the first calls set up connections and can miss the deadline on a loaded host)."""
    client, deadline = ServeRetriever(url), time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not client.search(text, k=1).partial:
            return
    raise AssertionError(f"the app gave no full answer within {within_s} s")


def _expected(single, engine, texts, k=10):
    return single.search(engine.encode_text(texts), k)


def test_served_search_equals_one_gallery(served, single):
    cluster, url, texts, engine, _ = served
    response = ServeRetriever(url).search(texts, k=10)
    assert not response.partial and response.missing_shards == ()
    for a, b in zip([r.hits for r in response.results], _expected(single, engine, texts), strict=True):
        assert [h.path for h in a] == [h.path for h in b] or all(
            abs(x.score - y.score) < 1e-5 for x, y in zip(a, b, strict=True)
        )
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5, atol=1e-5)
    assert _loopback(cluster.listening_addresses())


def test_async_client_and_the_search_command(served, single):
    import asyncio
    import subprocess
    import sys

    _, url, texts, engine, _ = served
    ref = _expected(single, engine, texts[:4], k=5)

    async def many():
        client = AsyncServeRetriever(url)
        return await asyncio.gather(*(client.search(t, k=5) for t in texts[:4]))

    for a, b in zip(asyncio.run(many()), ref, strict=True):
        assert a.hits and not a.partial and [h.path for h in a.hits] == [h.path for h in b]
    res = subprocess.run(
        [sys.executable, "-m", "reir.cli", "search", texts[0], "--server", url, "--backend", "serve", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["results"][0]["hits"][0]["path"] == ref[0][0].path


def test_a_bug_in_a_shard_is_an_error_not_a_missing_shard(served):
    """A shard whose code raises (here: its SQLite lost a table under the server) fails the
    request with a 5xx naming the error; it is not passed off as a `partial` answer."""
    import sqlite3

    from reir.engine.serving.contract import ServiceError

    _, url, texts, _, root = served
    client = ServeRetriever(url)
    assert client.search(texts[0], k=3, gallery="broken").hits  # healthy first
    with sqlite3.connect(root / "broken" / "shard-001" / "gallery.sqlite") as db:
        db.execute("DROP TABLE instances")
    with pytest.raises(ServiceError, match="HTTP 500"):
        client.search(texts[0], k=3, gallery="broken")
    assert client.search(texts[0], k=3).hits  # the other gallery is served as before


def _replicas(shard: str) -> list:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [ray.get_actor(n, namespace="serve") for n in names if n.startswith(f"SERVE_REPLICA::reir#{shard}#")]


def _load(url, texts, count: int, workers: int = 4) -> list[tuple[tuple, bool, tuple, float]]:
    """`count` queries from `workers` threads; per query (hits, partial, missing, seconds)."""
    client = ServeRetriever(url, timeout=30)  # one client shared by the threads (a connection each)

    def one(i):
        t0 = time.monotonic()
        r = client.search(texts[i % len(texts)], k=10)
        return r.hits, r.partial, r.missing_shards, time.monotonic() - t0

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


def test_killing_one_replica_under_16_clients_loses_no_query_and_it_is_replaced(served, single):
    """16 clients keep sending while one of shard 0's two replicas is killed: every query is
    answered in full (retried on the other replica), and Serve starts a replacement."""
    import ray
    from ray import serve

    _, url, texts, engine, _ = served
    ref = {t: h for t, h in zip(texts, _expected(single, engine, texts), strict=True)}
    victims = _replicas("main-shard-0")
    assert len(victims) == 2
    results = []
    loader = threading.Thread(target=lambda: results.extend(_load(url, texts, 240, workers=16)))
    loader.start()
    time.sleep(0.5)
    ray.kill(victims[0], no_restart=True)
    killed = time.monotonic()
    replaced = None
    while time.monotonic() - killed < 120:
        running = serve.status().applications["reir"].deployments["main-shard-0"].replica_states.get("RUNNING", 0)
        alive = [a for a in _replicas("main-shard-0") if a._actor_id != victims[0]._actor_id]
        if running == 2 and len(alive) == 2:
            replaced = time.monotonic() - killed
            break
        time.sleep(0.1)
    loader.join(timeout=180)
    assert len(results) == 240  # every query answered
    for i, (hits, partial, missing, _) in enumerate(results):
        assert not partial and missing == ()
        assert [h.path for h in hits][:1] == [h.path for h in ref[texts[i % len(texts)]]][:1]
    assert replaced is not None, "the killed replica was not replaced within two minutes"
    print(f"replica replaced {replaced:.1f} s after the kill")  # reported by docs/serving.md


def test_losing_every_replica_of_a_shard_gives_flagged_partial_answers_then_full_ones(served, single):
    import ray

    _, url, texts, engine, root = served
    ref = _expected(single, engine, texts[:1])[0]
    with Gallery.open(root / "main", shard=0, progress=False) as g:  # what shard 0 alone holds
        only0 = g.search(engine.encode_text(texts[:1]), 10)[0]
    # Serve starts replacements at once, in about the deadline's time (5.8 s measured), so
    # whether the first answers were partial was a race: keep shard 1 down while they run
    down = threading.Event()

    def keep_down():
        while not down.is_set():
            with contextlib.suppress(Exception):  # a replica gone between listing and killing
                for victim in _replicas("main-shard-1"):
                    ray.kill(victim, no_restart=True)
            time.sleep(0.05)

    killer = threading.Thread(target=keep_down)
    killer.start()
    try:
        time.sleep(0.5)
        results = _load(url, texts[:1], 8, workers=2)
    finally:
        down.set()
        killer.join()
    partial = [r for r in results if r[1]]
    assert partial, "no answer was flagged partial while shard 1 had no replica"
    for hits, _, missing, seconds in partial:
        # the 5 s deadline from the request's arrival, plus the 1 s grace, plus slack: a request
        # queued behind one that waited out the dead shard does not wait a second deadline
        assert missing == (1,) and seconds < 5.0 + 1.0 + 2.0, [r[3] for r in results]
        assert [(h.image_id, h.path) for h in hits] == [(h.image_id, h.path) for h in only0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve replaces the replicas
        hits, was_partial, _, _ = _load(url, texts[:1], 1, workers=1)[0]
        if not was_partial:
            break
        time.sleep(1)
    assert not was_partial, "shard 1 did not come back within two minutes"
    assert [h.path for h in hits] == [h.path for h in ref]


def test_the_whole_indexing_job_killed_then_rerun_finishes_exactly_once(synth_small, single, tmp_path):
    """`reir cluster index` (its own Ray on this host) killed with SIGKILL once images are
    committed; the same command again completes the gallery, and no Ray process is left."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    cmd = [sys.executable, "-m", "reir.cli", "cluster", "index", str(synth_small / "images")]
    cmd += ["--gallery", str(tmp_path / "g"), "--shards", "2", "--workers", "1", "--batch", "4", "--quiet"]
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="reir-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _committed(tmp_path / "g") == 0 and job.poll() is None:
        time.sleep(0.02)  # a transaction every 4 images: the first one comes long before the last
    running = job.poll() is None
    assert running and 0 < _committed(tmp_path / "g") < 120, (tmp_path / "job.log").read_text()[-3000:]
    os.killpg(job.pid, signal.SIGKILL)  # the driver and everything it started
    job.wait(timeout=30)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already indexed" in res.stdout and " 0 already indexed" not in res.stdout
    with Gallery.open(tmp_path / "g", progress=False) as g:
        assert g.info().images == 120 and set(_rows(g)) == set(_rows(single))
        assert g.check() == []
    time.sleep(2)
    left = [p for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {[p.pid for p in left]}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_replica_listener_shim_is_needed_and_works(served):
    """Serve binds each replica's inter-deployment gRPC server on every interface; the shim
    (cluster/compat.py) keeps it on the node's address. Two more apps on the served cluster,
    one whose deployment skips the shim."""
    import os

    import psutil
    from ray import serve

    from reir.cluster.compat import RayIncompatible, check_version, keep_replica_listener_on_node

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Plain:
        def pid(self) -> int:
            return os.getpid()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Shimmed:
        def __init__(self):
            keep_replica_listener_on_node()

        def pid(self) -> int:
            return os.getpid()

    def listening(pid: int) -> set[str]:
        return {c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}

    plain = serve.run(Plain.bind(), name="plain", route_prefix="/plain")
    shimmed = serve.run(Shimmed.bind(), name="shimmed", route_prefix="/shimmed")
    try:
        wide, narrow = listening(plain.pid.remote().result()), listening(shimmed.pid.remote().result())
    finally:
        serve.delete("plain")
        serve.delete("shimmed")
    assert wide & {"::", "0.0.0.0"}, wide  # needed: without it a replica listens on every interface
    assert narrow and _loopback(narrow), narrow  # works: with it, on loopback only
    with pytest.raises(RayIncompatible, match=r"tested with Ray 2\.58, 2\.59, 2\.60"):
        check_version("2.61.0")


def test_overload_refusals_metrics_and_a_live_gallery_on_serve(served, tmp_path):
    """A second app with a tight queue bound over a copy of `main`: a burst gets fast 503s
    with Retry-After and the admitted requests their answers; /metrics counts both; an
    image added to the gallery while it is served is found without a restart."""
    import dataclasses
    import urllib.request

    from ray import serve

    from reir.cluster.serving import build_app
    from reir.engine.serving.batching import BatchPolicy
    from reir.engine.serving.contract import Unavailable

    _, url, texts, _, root = served
    live = tmp_path / "root"
    shutil.copytree(root / "main", live / "main")
    tight = BatchPolicy(max_batch=2, max_queue_s=0.001)
    serve.run(build_app(default_bundle(), live, ["main"], policy=tight), name="tight", route_prefix="/tight")
    tight_url = url.rsplit("/", 1)[0] + "/tight"
    client = ServeRetriever(tight_url, timeout=60)
    for t in texts[:6]:  # past the warm-up after which admission refuses
        client.search(t, k=5)
    outcomes = []

    def send(t):
        try:
            outcomes.append(client.search(t, k=5))
        except Unavailable as e:
            outcomes.append(e)

    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(send, (texts * 2)[:32]))
        refused = [o for o in outcomes if isinstance(o, Unavailable)]
        assert refused and len(refused) < len(outcomes), "a burst past the bound must be refused, not all of it"
        assert all(e.retry_after > 0 for e in refused) and "overloaded" in str(refused[0])

        top = client.search(texts[0], k=5).hits[0]
        with Gallery.open(live / "main", writable=True, progress=False) as writer:
            shard = writer.shards[top.image_id % writer.shard_count]
            original = next(im for im in shard.stored() if im.path == top.path)
            twin = dataclasses.replace(original, path=original.path + ".copy.png", sha256=original.sha256[::-1])
            writer.add([twin])
        deadline, found = time.monotonic() + 10, False
        while time.monotonic() < deadline and not found:
            found = twin.path in {h.path for h in client.search(texts[0], k=5).hits}
            time.sleep(0.1)
        assert found, "an image added while the gallery is served was not found within 10 s"

        with urllib.request.urlopen(tight_url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        counts = {
            ln.split("{")[1].split("}")[0]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("reir_requests_total{")
        }
        assert counts['outcome="refused"'] == len(refused)
        assert counts['outcome="ok"'] >= len(outcomes) - len(refused) + 6
        assert 'reir_gallery_generation{gallery="main",shard="1"}' in text and "reir_batch_size_count" in text
    finally:
        serve.delete("tight")
