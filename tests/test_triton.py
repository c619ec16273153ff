"""Triton: the generated repository validates offline and a real tritonserver serves it.

The server is nvidia-pytriton's tritonserver 2.51 (python backend only), started on
127.0.0.1 from the `.venv-triton` environment (`make triton-env`: numpy < 2 for its stub),
with the `pyort` configs: the ONNX graphs run in onnxruntime inside python models.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (triton extra)")

from reir.export.triton_validate import validate_repository

ROOT = Path(__file__).resolve().parents[1]
SERVER_PYTHON = Path(os.environ.get("REIR_TRITON_PYTHON", ROOT / ".venv-triton" / "bin" / "python"))
needs_server = pytest.mark.skipif(
    not SERVER_PYTHON.exists(), reason=f"Triton server environment not built ({SERVER_PYTHON}; run `make triton-env`)"
)
EXPRESSIONS = ["the red circle", "the small blue square left of the green star", "the largest triangle"]


@pytest.fixture(scope="module")
def setup(tiny_bundle, tmp_path_factory):
    """(repository, embedded retriever, gallery dir): the same bundle and gallery on both sides."""
    from reir.datasets.synth import SynthConfig, generate
    from reir.engine.runtime.engine import Engine
    from reir.engine.gallery.shard import Gallery
    from reir.engine.gallery.ingest import index_images
    from reir.engine.serving.retriever import Retriever
    from reir.export.triton import write_repository

    root = tmp_path_factory.mktemp("triton")
    ds, _ = generate(root / "data", SynthConfig(images=50, seed=11), progress=False)
    engine = Engine.open(tiny_bundle, threads=1)
    gallery = Gallery.create(root / "galleries" / "main", engine.dim, model=engine.model_id)
    index_images(gallery, engine, [ds.image_path(i) for i in sorted(ds.images)], progress=False)
    gallery.close()
    repo = write_repository(tiny_bundle, root / "repo", root / "galleries", "main")
    retriever = Retriever(engine, Gallery.open(root / "galleries" / "main", progress=False))
    return repo, retriever


def test_repository_validates_offline_and_names_problems(setup, tmp_path):
    repo, _ = setup
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


@pytest.fixture(scope="module")
def server(setup):
    from reir.engine.serving.triton_server import TritonServer

    repo, _ = setup
    srv = TritonServer(repo, SERVER_PYTHON, "pyort")
    try:
        srv.start(timeout=180)
    except Exception:
        srv.stop()
        raise
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None  # stopped by its pid


def _same(remote, local):
    assert [h.instance_key for h in remote] == [h.instance_key for h in local]
    assert [h.image_id for h in remote] == [h.image_id for h in local]
    np.testing.assert_allclose([h.score for h in remote], [h.score for h in local], rtol=0, atol=1e-4)
    np.testing.assert_allclose([h.box for h in remote], [h.box for h in local], rtol=0, atol=1e-3)


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_results_equal_the_embedded_engine(setup, server, protocol):
    from reir.engine.serving.triton_client import TritonRetriever

    _, local = setup
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with TritonRetriever(url, protocol) as remote:
        assert remote.is_server_ready() and remote.is_model_ready() and remote.is_model_ready("encode_query")
        for text in EXPRESSIONS:
            _same(remote.search(text, k=10), local.search(text, k=10))
        many = remote.search(EXPRESSIONS, k=5)  # one request, three expressions
        for text, hits in zip(EXPRESSIONS, many, strict=True):
            _same(hits, local.search(text, k=5))


@needs_server
def test_encode_query_equals_the_embedded_text_encoder(setup, server):
    """What a Ray Serve front end calls with --encoder: the same vectors as ONNX Runtime here."""
    from reir.engine.serving.triton_client import TritonRetriever

    with TritonRetriever(server.grpc_url) as remote:
        q, cut = remote.encode([*EXPRESSIONS, "red " * 200])
    local, local_cut = setup[1].engine.encode([*EXPRESSIONS, "red " * 200])
    np.testing.assert_allclose(q, local, rtol=0, atol=1e-4 * float(np.abs(local).max()))
    assert cut == local_cut == [False] * len(EXPRESSIONS) + [True]


@needs_server
def test_async_client(setup, server):
    from reir.engine.serving.triton_client import AsyncTritonRetriever

    _, local = setup

    async def run():
        r = AsyncTritonRetriever(server.grpc_url)
        try:
            return await asyncio.gather(*(r.search(t, k=5) for t in EXPRESSIONS))
        finally:
            await r.close()

    for text, hits in zip(EXPRESSIONS, asyncio.run(run()), strict=True):
        _same(hits, local.search(text, k=5))


@needs_server
def test_bad_requests_get_errors_and_the_server_stays_up(setup, server):
    import tritonclient.grpc as g
    import tritonclient.http as h

    from reir.engine.serving.triton_client import TritonError, TritonRetriever

    client = g.InferenceServerClient(server.grpc_url)
    http = h.InferenceServerClient(server.http_url)

    def infer(model, inputs):
        with pytest.raises(Exception) as err:
            client.infer(model, inputs)
        return str(err.value)

    def client_error(inputs, why):
        """The client's mistakes come back as INVALID_ARGUMENT / HTTP 400 with the message, not 500."""
        with pytest.raises(Exception) as err:
            client.infer("retrieve", inputs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and why in str(err.value), err.value
        hin = []
        for t in inputs:
            arr = np.array([[v] for v in t._raw_values], dtype=object)
            x = h.InferInput(t.name(), list(arr.shape), "BYTES")
            x.set_data_from_numpy(arr)
            hin.append(x)
        with pytest.raises(Exception) as err:
            http.infer("retrieve", hin)
        assert str(err.value.status()) == "400" and why in (err.value.message() or ""), err.value

    def text_input(name, values):
        arr = np.array([[v] for v in values], dtype=object)
        t = g.InferInput(name, list(arr.shape), "BYTES")
        t.set_data_from_numpy(arr)
        t._raw_values = values  # for the same request over HTTP
        return t

    def k_input(k):
        t = g.InferInput("K", [1, 1], "INT32")
        t.set_data_from_numpy(np.array([[k]], np.int32))
        return t

    client_error([text_input("TEXT", [b"   "])], "empty expression")
    client_error([text_input("TEXT", [b"a red circle"]), text_input("GALLERY", [b"nope"])], "no gallery named")
    client_error([text_input("TEXT", [b"a red circle"]), text_input("GALLERY", [b"../../etc"])], "outside")
    with pytest.raises(Exception) as err:
        client.infer("retrieve", [text_input("TEXT", [b"a red circle"]), k_input(0)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "K must be in [1, 100], got 0" in str(err.value)

    assert "empty expression" in infer("retrieve", [text_input("TEXT", [b"   "])])
    ids = g.InferInput("input_ids", [1, 4], "INT32")  # wrong dtype
    ids.set_data_from_numpy(np.ones((1, 4), np.int32))
    mask = g.InferInput("attention_mask", [1, 4], "INT64")
    mask.set_data_from_numpy(np.ones((1, 4), np.int64))
    assert "INT32" in infer("text_encoder", [ids, mask]) or "data-type" in infer("text_encoder", [ids, mask])
    img = g.InferInput("images", [1, 17, 17, 3], "UINT8")  # wrong shape
    img.set_data_from_numpy(np.zeros((1, 17, 17, 3), np.uint8))
    assert "shape" in infer("visual_encoder", [img])
    big = text_input("TEXT", [b"a red circle"] * 100)  # over max_batch_size
    assert "batch" in infer("retrieve", [big])
    assert "no gallery named" in infer(
        "retrieve", [text_input("TEXT", [b"a red circle"]), text_input("GALLERY", [b"nope"])]
    )
    assert "outside" in infer(
        "retrieve", [text_input("TEXT", [b"a red circle"]), text_input("GALLERY", [b"../../etc"])]
    )
    with TritonRetriever(server.grpc_url) as r:
        long = "the small red circle left of the blue star " * 20
        hits = r.search(long, k=3)
        assert len(hits) == 3 and r.last_truncated == [True]
        assert r.search("the red circle", k=3) and r.is_model_ready()  # instances survived every bad request
        with pytest.raises(ValueError, match="empty"):
            r.search("")
    with pytest.raises(TritonError, match="retrieve"):
        TritonRetriever("127.0.0.1:1", timeout_s=1, retries=1).search("a red circle")


@needs_server
def test_cli_search_through_the_server(server):
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "reir.cli",
            "search",
            "the red circle",
            "--server",
            f"grpc://{server.grpc_url}",
            "-k",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert len([line for line in res.stdout.splitlines() if line.strip()[:1].isdigit()]) == 3


@needs_server
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_reir_serve_leaves_no_process_behind(setup, sig):
    """What systemd, `docker stop` and Kubernetes do: signal the wrapper. The server, its
    process group (the python stubs) and its ports go with it."""
    import signal
    import socket
    import subprocess
    import sys

    from reir.engine.serving.triton_server import free_port

    repo, _ = setup
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "reir.cli", "serve", "--repository", str(repo), "--python", str(SERVER_PYTHON)]
    cmd += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    # started as a shell starts a background job: SIGINT ignored, which the child inherits
    background = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=background)
    try:
        line = ""
        while not line.startswith("ready:"):
            line = proc.stdout.readline()
            assert line, "reir serve exited before it was ready"
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
def test_a_broken_repository_fails_fast_with_the_log(setup, tmp_path):
    from reir.engine.serving.triton_server import ServerError, TritonServer

    repo, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    (bad / "retrieve" / "1" / "model.py").write_text("raise RuntimeError('boom at load')\n")
    srv = TritonServer(bad, SERVER_PYTHON, "pyort")
    with pytest.raises(ServerError, match=r"boom at load|failed to load"):
        srv.start(timeout=120)
    assert srv.proc.poll() is not None


def test_checked_in_reference_configs_match_the_generator(tmp_path):
    from reir.engine.runtime.bundle import Bundle, default_bundle
    from reir.export.triton import REFERENCE_GALLERY_ROOT, write_configs

    write_configs(Bundle.open(default_bundle()).manifest, tmp_path, REFERENCE_GALLERY_ROOT, "main")
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.pbtxt"))
    checked_in = sorted(p.relative_to(ROOT / "triton_models") for p in (ROOT / "triton_models").rglob("*.pbtxt"))
    assert generated == checked_in and len(generated) == 13
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / "triton_models" / rel).read_text(), rel


@needs_server
def test_pre_tokenised_ids_skip_the_string_path(setup, server):
    import tritonclient.grpc as g

    _, local = setup
    ids, mask, _ = local.engine.text.tokenizer(["the red circle"])
    inputs = []
    for name, arr in (("INPUT_IDS", ids), ("ATTENTION_MASK", mask)):
        t = g.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    res = g.InferenceServerClient(server.grpc_url).infer("retrieve", inputs)
    expected = local.search("the red circle", k=10)
    assert res.as_numpy("INSTANCE_KEYS")[0].tolist() == [h.instance_key for h in expected]
    np.testing.assert_allclose(res.as_numpy("SCORES")[0], [h.score for h in expected], atol=1e-4)
