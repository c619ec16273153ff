"""Triton: the generated repository validates offline and a real tritonserver serves it.

The server is nvidia-pytriton's tritonserver 2.51 (python backend only), started on
127.0.0.1 from the `.venv-triton` environment (`make triton-env`: numpy < 2 for its stub),
with the `pyort` configs: the ONNX graphs run in onnxruntime inside python models. That
`retrieve` answers the search contract as every other path does is tests/test_conformance.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SERVER_PYTHON, same_response

pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (triton extra)")
pytestmark = pytest.mark.triton

from reir.engine.runtime.bundle import Bundle, default_bundle  # noqa: E402
from reir.export.triton_validate import validate_repository  # noqa: E402

needs_server = pytest.mark.skipif(
    not SERVER_PYTHON.exists(), reason=f"Triton server environment not built ({SERVER_PYTHON}; run `make triton-env`)"
)


def _reir(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from reir.export.triton import write_repository

    root = tmp_path_factory.mktemp("repo")
    return write_repository(default_bundle(), root / "repo", root / "galleries", "main")


def test_repository_validates_offline_and_names_problems(repo, tmp_path):
    assert validate_repository(repo) == []
    for model in ("text_encoder", "visual_encoder"):
        assert {p.stem for p in (repo / model / "configs").glob("*.pbtxt")} == {"cpu", "gpu-trt", "pyort", "jetson"}
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    cfg = bad / "tokenizer" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size", "max_batch_sizee"))
    ens = bad / "encode_query" / "config.pbtxt"
    ens.write_text(ens.read_text().replace('value: "mask"', 'value: "nope"', 1))  # the tokenizer's output
    (bad / "visual_encoder" / "1" / "model.onnx").unlink()
    problems = "\n".join(validate_repository(bad))
    assert "tokenizer/config.pbtxt" in problems and "max_batch_sizee" in problems
    assert "encode_query/config.pbtxt" in problems and "'mask' is not produced" in problems
    assert "visual_encoder/config.pbtxt: version 1: model.onnx missing" in problems


def test_retrieve_knows_the_model_it_serves(repo):
    """`retrieve` refuses galleries of another model: the repository carries the bundle's id."""
    text = (repo / "retrieve" / "config.pbtxt").read_text()
    b = Bundle.open(default_bundle())
    assert f'string_value: "{b.model_id}"' in text and f'string_value: "{b.dim}"' in text


def test_encode_query_equals_the_embedded_text_encoder(triton, engine):
    """What a Ray Serve front end calls with --encoder: the same vectors as ONNX Runtime here."""
    from reir.engine.serving.triton_client import TritonRetriever

    texts = ["the red circle", "the small blue square left of the green star", "red " * 200]
    with TritonRetriever(f"grpc://{triton.grpc_url}") as remote:
        q, cut = remote.encode(texts)
    local, local_cut = engine.encode(texts)
    np.testing.assert_allclose(q, local, rtol=0, atol=1e-4 * float(np.abs(local).max()))
    assert cut == local_cut == [False, False, True]


def test_async_client_keeps_many_searches_in_flight(triton, served_root, engine):
    from reir.engine.gallery.gallery import Gallery
    from reir.engine.serving.retriever import Retriever
    from reir.engine.serving.triton_client import AsyncTritonRetriever

    root, texts = served_root

    async def run():
        r = AsyncTritonRetriever(f"grpc://{triton.grpc_url}")
        try:
            return await asyncio.gather(*(r.search(t, k=5) for t in texts[:6]))
        finally:
            await r.close()

    with Gallery.open(root / "main", progress=False) as g:
        local = Retriever(engine, g)
        for text, response in zip(texts[:6], asyncio.run(run()), strict=True):
            same_response(response, local.search(text, k=5), text)


def test_wrong_tensors_get_errors_and_the_server_stays_up(triton):
    import tritonclient.grpc as g

    from reir.engine.serving.contract import ServiceError, Unavailable
    from reir.engine.serving.triton_client import TritonRetriever

    client = g.InferenceServerClient(triton.grpc_url)

    def refused(model, inputs) -> str:
        with pytest.raises(Exception) as err:
            client.infer(model, inputs)
        return str(err.value)

    ids = g.InferInput("input_ids", [1, 4], "INT32")  # wrong dtype
    ids.set_data_from_numpy(np.ones((1, 4), np.int32))
    mask = g.InferInput("attention_mask", [1, 4], "INT64")
    mask.set_data_from_numpy(np.ones((1, 4), np.int64))
    assert "INT32" in refused("text_encoder", [ids, mask]) or "data-type" in refused("text_encoder", [ids, mask])
    img = g.InferInput("images", [1, 17, 17, 3], "UINT8")  # wrong shape
    img.set_data_from_numpy(np.zeros((1, 17, 17, 3), np.uint8))
    assert "shape" in refused("visual_encoder", [img])
    many = g.InferInput("REQUEST", [100, 1], "BYTES")  # over max_batch_size
    many.set_data_from_numpy(np.array([[b'{"text": "a"}']] * 100, dtype=object))
    assert "batch" in refused("retrieve", [many])
    with TritonRetriever(f"grpc://{triton.grpc_url}") as r:
        assert r.search("the red circle", k=3).hits and r.is_model_ready()  # instances survived
    with pytest.raises(Unavailable, match="retrieve"):  # nothing listens: after its retries, one clear error
        TritonRetriever("grpc://127.0.0.1:1", timeout_s=1, retries=1).search("a red circle")
    assert issubclass(Unavailable, ServiceError)


def test_search_command_through_the_server_honours_every_field(triton, served_root, engine):
    """`reir search --server` once dropped --tags and --all-instances silently."""
    from reir.engine.gallery.gallery import Gallery
    from reir.engine.serving.retriever import Retriever

    root, texts = served_root
    args = ["search", texts[0], "--server", f"grpc://{triton.grpc_url}", "--backend", "triton", "-k", "4", "--json"]
    res = _reir(*args, "--tags", "part=1", "--all-instances")
    assert res.returncode == 0, res.stderr
    with Gallery.open(root / "main", progress=False) as g:
        local = Retriever(engine, g).search(texts[0], k=4, per_image=False, tags={"part": "1"})
    assert json.loads(res.stdout) == local.to_json()
    res = _reir("search", texts[0], "--server", f"grpc://{triton.grpc_url}")
    assert res.returncode == 2 and "--server needs --backend" in res.stderr


@needs_server
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_reir_triton_serve_leaves_no_process_behind(repo, sig):
    """What systemd, `docker stop` and Kubernetes do: signal the wrapper. The server, its
    process group (the python stubs) and its ports go with it."""
    import signal
    import socket

    from reir.engine.serving.triton_server import free_ports

    ports = free_ports(3)
    cmd = [sys.executable, "-m", "reir.cli", "triton", "serve", "--repository", str(repo), "--python"]
    cmd += [str(SERVER_PYTHON), "--http-port", str(ports[0]), "--grpc-port", str(ports[1])]
    cmd += ["--metrics-port", str(ports[2])]
    # started as a shell starts a background job: SIGINT ignored, which the child inherits
    background = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=background)
    try:
        line = ""
        while not line.startswith("ready:"):
            line = proc.stdout.readline()
            assert line, "reir triton serve exited before it was ready"
        server_pid = int(line.rsplit("(pid ", 1)[1].split(")")[0])
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=60) != 0 or sig == "SIGINT"
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ProcessLookupError):  # no process left in the server's group: server and stubs
        os.killpg(server_pid, 0)
    for port in ports:  # no listener left: the next start can have them (as the server binds, reusing TIME_WAIT)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()


@needs_server
def test_a_broken_repository_fails_fast_with_the_log(repo, tmp_path):
    from reir.engine.serving.triton_server import ServerError, TritonServer

    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    (bad / "retrieve" / "1" / "model.py").write_text("raise RuntimeError('boom at load')\n")
    srv = TritonServer(bad, SERVER_PYTHON, "pyort")
    with pytest.raises(ServerError, match=r"boom at load|failed to load"):
        srv.start(timeout=120)
    assert srv.proc.poll() is not None


def test_checked_in_reference_configs_match_the_generator(tmp_path):
    from reir.export.triton import REFERENCE_GALLERY_ROOT, write_configs

    write_configs(Bundle.open(default_bundle()).manifest, tmp_path, REFERENCE_GALLERY_ROOT, "main")
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.pbtxt"))
    checked_in = sorted(p.relative_to(ROOT / "triton_models") for p in (ROOT / "triton_models").rglob("*.pbtxt"))
    assert generated == checked_in and len(generated) == 13
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / "triton_models" / rel).read_text(), rel


def test_retrieve_reports_reir_metrics_and_refuses_past_its_queue(triton, served_root):
    """Triton's own endpoint carries the reir_* series (requests by outcome, stages, batch
    sizes, each gallery's state), and a burst far past the retrieve queue's bound gets fast
    UNAVAILABLE refusals (the client's Unavailable), not minutes in a queue."""
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from reir.engine.serving.contract import RequestError, Unavailable
    from reir.engine.serving.triton_client import TritonRetriever

    _, texts = served_root
    client = TritonRetriever(f"grpc://{triton.grpc_url}", retries=0)
    client.search(texts[0], k=3)
    with pytest.raises(RequestError):
        client.answer_json(b'{"text": 7}')

    def one(t: str):
        start = time.perf_counter()
        try:
            TritonRetriever(f"grpc://{triton.grpc_url}", retries=0).search(t, k=3)
            return "ok", time.perf_counter() - start
        except Unavailable:
            return "refused", time.perf_counter() - start

    burst = [texts[i % len(texts)] + f" #{i}" for i in range(400)]  # unique: no batch shares a text
    with ThreadPoolExecutor(128) as pool:
        outcomes = list(pool.map(one, burst))
    refused = [s for o, s in outcomes if o == "refused"]
    assert refused, "400 requests from 128 threads never filled a 32-deep queue"
    assert any(o == "ok" for o, _ in outcomes)
    # a refusal is answered once the 50 ms queue bound passes, not after the whole backlog
    assert sorted(refused)[len(refused) // 2] < 1.0, sorted(refused)[len(refused) // 2]

    text = urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=10).read().decode()
    series = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith("reir_")}
    assert series['reir_requests_total{outcome="ok"}'] >= 1 + sum(o == "ok" for o, _ in outcomes) - 1
    assert series['reir_requests_total{outcome="invalid"}'] >= 1
    assert series['reir_stage_seconds_count{stage="encode"}'] >= 1
    assert series["reir_batch_size_count"] >= 1 and series["reir_batch_size_sum"] > series["reir_batch_size_count"]
    assert series['reir_gallery_rows{gallery="main",shard="0"}'] > 0
    assert 'reir_gallery_generation{gallery="main",shard="0"}' in series
