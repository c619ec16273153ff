"""One search contract on every path. The same requests go to the embedded service, a real
tritonserver (gRPC and HTTP) and a real Ray Serve app (`reir cluster serve`, its own Ray
on loopback), all over one gallery root: `main` (120 images, the shipped model) and
`other` (indexed under another model's id).

Valid requests must get identical hits everywhere; every wrong one the same error class and
message everywhere: 4xx over HTTP, INVALID_ARGUMENT (NOT_FOUND for an unknown gallery) over
gRPC, never a 500.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import same_response

from reir.engine.serving.contract import RequestError
from reir.engine.serving.service import SearchService

pytestmark = [pytest.mark.triton, pytest.mark.cluster]
pytest.importorskip("ray", reason="ray not installed (cluster extra)")


def _valid(texts: list[str]) -> list[dict]:
    t = texts[0]
    return [
        {"text": t, "k": 1},
        {"text": t},
        {"text": t, "k": 100},
        {"text": t, "k": 10, "tags": {"part": "1"}},
        {"text": t, "k": 10, "tags": {"part": "1", "nothing": "here"}},
        {"text": t, "k": 10, "per_image": False},
        {"text": texts[1:4], "k": 5},
        {"text": t, "gallery": "main", "k": 3},
        {"text": "the red circle " * 30, "k": 3},  # truncated at the model's max length
    ]


INVALID = {
    "empty text": {"text": ""},
    "blank text in a list": {"text": ["a red circle", "   "]},
    "no text": {"k": 3},
    "k of 0": {"text": "a red circle", "k": 0},
    "k above the limit": {"text": "a red circle", "k": 101},
    "unknown field": {"text": "a red circle", "colour": "red"},
    "k as a string": {"text": "a red circle", "k": "10"},
    "k as a float": {"text": "a red circle", "k": 10.0},
    "text as a number": {"text": 5},
    "per_image as a string": {"text": "a red circle", "per_image": "yes"},
    "tags as a list": {"text": "a red circle", "tags": ["part", "1"]},
    "a tag of a number": {"text": "a red circle", "tags": {"part": 1}},
    "too many texts": {"text": ["a red circle"] * 65},
    "gallery outside the root": {"text": "a red circle", "gallery": "../../etc"},
    "gallery of another model": {"text": "a red circle", "gallery": "other"},
    "unknown gallery": {"text": "a red circle", "gallery": "nope"},
}
RAW = {
    "malformed JSON": b'{"text": "a red circle",',
    "not an object": b'["a red circle"]',
    "not UTF-8": b'{"text": "\xff\xfe"}',
    "nested too deeply": b"[" * 5000 + b"]" * 5000,
    "too large": json.dumps({"text": "a" * 300_000}).encode(),
}


def _body(case) -> bytes:
    return case if isinstance(case, bytes) else json.dumps(case).encode()


@pytest.fixture(scope="module")
def serve_url(served_root):
    """`reir cluster serve` over the root: its own Ray instance, loopback only."""
    from reir.engine.serving.triton_server import free_port

    root, _ = served_root
    port = free_port()
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="reir-ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    cmd = [sys.executable, "-m", "reir.cli", "cluster", "serve", "--root", str(root), "--gallery", "main", "other"]
    cmd += ["--default", "main", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines = []
    try:
        while True:
            line = proc.stdout.readline()
            assert line, "reir cluster serve exited before it was ready:\n" + "".join(lines[-40:])
            lines.append(line)
            if line.startswith("ready:"):
                break
        yield f"http://127.0.0.1:{port}/reir"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def paths(served_root, engine, triton, serve_url):
    """name -> a client of the contract (each with `answer_json`)."""
    from reir.engine.serving.serve_client import ServeRetriever
    from reir.engine.serving.triton_client import TritonRetriever

    root, _ = served_root
    clients = {
        "embedded": SearchService.embedded(engine, root, "main"),
        "triton-grpc": TritonRetriever(f"grpc://{triton.grpc_url}"),
        "triton-http": TritonRetriever(f"http://{triton.http_url}"),
        "serve": ServeRetriever(serve_url),
    }
    deadline = time.monotonic() + 120
    while True:  # the app's replicas may still be starting
        try:
            clients["serve"].search("warm up", k=1)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    yield clients
    for c in clients.values():
        c.close()


def test_valid_requests_get_the_same_hits_on_every_path(paths, served_root):
    _, texts = served_root
    for request in _valid(texts):
        answers = {name: c.answer_json(_body(request)) for name, c in paths.items()}
        reference = answers["embedded"]
        assert all(r.hits for r in reference.results) or "nothing" in json.dumps(request), request
        for name, response in answers.items():
            same_response(response, reference, f"{name}: {request}")
    assert not paths["embedded"].answer_json(_body(_valid(texts)[4])).hits  # no image has both tags
    assert [r.truncated for r in paths["embedded"].answer_json(_body(_valid(texts)[-1])).results] == [True]


@pytest.mark.parametrize("case", [*INVALID, *RAW])
def test_wrong_requests_get_the_same_error_on_every_path(paths, case):
    body = _body(INVALID.get(case) or RAW[case])
    errors = {}
    for name, client in paths.items():
        with pytest.raises(RequestError) as e:
            client.answer_json(body)
        errors[name] = (type(e.value), e.value.code, str(e.value))
    assert len(set(errors.values())) == 1, errors
    assert errors["embedded"][2].split(":")[0] in ("text", "text[1]", "k", "per_image", "tags", "gallery", "body")


@pytest.mark.parametrize("case", ["unknown field", "gallery of another model", "unknown gallery", "malformed JSON"])
def test_the_wire_says_client_error_not_server_error(paths, served_root, triton, case):
    """The status codes themselves, as a client that is not ours sees them."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    body = _body(INVALID.get(case) or RAW[case])
    status, _, reply = paths["serve"].post(body)
    assert 400 <= status < 500 and "error" in json.loads(reply), (status, reply)
    expected = ("StatusCode.NOT_FOUND", "404") if case == "unknown gallery" else ("StatusCode.INVALID_ARGUMENT", "400")
    for mod, url, code in ((grpc, triton.grpc_url, expected[0]), (http, triton.http_url, expected[1])):
        t = mod.InferInput("REQUEST", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[body]], dtype=object))
        with pytest.raises(Exception) as e:
            mod.InferenceServerClient(url).infer("retrieve", [t])
        assert str(e.value.status()) == code, e.value


def test_the_serve_app_serves_its_schema_and_health(paths):
    import urllib.request

    url = paths["serve"].url
    with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
        assert json.loads(r.read())["galleries"] == ["main"]
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as r:
        assert "/" in json.loads(r.read())["paths"]


def _fuzz_value(rng: np.random.Generator, depth: int = 0):
    """A random JSON value: any type, sizes from empty to large, nesting up to a few levels."""
    kind = rng.integers(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.choice([0, 1, -1, 5, 100, 101, 2**31, -(2**63), 10**30]))
    if kind == 3:
        return float(rng.choice([0.5, -1.0, 1e300, 10.0, float("nan"), float("inf")]))
    if kind == 4:
        return "".join(rng.choice(list("ab c\u00e9\u4e2d\U0001f600\x00\ud800")) for _ in range(rng.integers(0, 12)))
    if kind == 5:
        return "the red circle " * int(rng.integers(1, 40))
    if kind == 6:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 5))]
    if kind == 7:
        return {str(_fuzz_value(rng, 3)): _fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}
    return [[[["deep"]]]] * int(rng.integers(1, 3))


def _fuzz_body(rng: np.random.Generator) -> bytes:
    """A request body a careless or hostile client might send."""
    shape = rng.integers(0, 6)
    if shape == 0:  # a top-level value of any type
        return json.dumps(_fuzz_value(rng)).encode()
    if shape == 1:  # random bytes
        return bytes(rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8))
    if shape == 2:  # a cut-off document
        whole = json.dumps({"text": "a red circle", "k": 3, "tags": {"part": "1"}}).encode()
        return whole[: int(rng.integers(0, len(whole)))]
    if shape == 3:  # nesting of any depth
        n = int(rng.integers(1, 20_000))
        return b'{"text": ' + b"[" * n + b"]" * n + b"}"
    fields = ["text", "k", "per_image", "tags", "gallery", "texts", "K", ""]
    doc = {f: _fuzz_value(rng) for f in rng.choice(fields, size=int(rng.integers(0, 5)), replace=False)}
    if shape == 4:
        doc["text"] = "a red circle"  # mostly valid, one field wrong
    return json.dumps(doc).encode()


def test_any_malformed_request_gets_a_client_error_with_a_message_on_every_path(paths):
    """300 generated bodies (seeded): every path answers each one, or refuses it with the
    contract's RequestError (a 4xx, INVALID_ARGUMENT or NOT_FOUND on the wire) and the same
    message; none is a server error."""
    from reir.engine.serving.contract import SearchResponse

    rng = np.random.default_rng(33)
    refused = 0
    for n in range(300):
        body = _fuzz_body(rng)
        seen = {}
        for name, client in paths.items():
            try:
                answer = client.answer_json(body)
                assert isinstance(answer, SearchResponse)
                seen[name] = ("answered", len(answer.results))
            except RequestError as e:
                assert str(e).strip(), (name, body[:200])
                seen[name] = ("refused", e.code, str(e))
            except Exception as e:  # a 500, a dropped connection, a traceback: never
                pytest.fail(f"case {n}, {name}: {type(e).__name__}: {e} for {body[:200]!r}")
        assert len(set(seen.values())) == 1, (n, body[:200], seen)
        refused += seen["embedded"][0] == "refused"
    assert 150 <= refused < 300  # the generator makes wrong bodies, and some right ones
