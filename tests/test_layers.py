"""Dependencies go one way. Each layer imports, module by module, with every layer above it
(and the heavy packages it must not need) blocked:

    engine      serving (no torch, no data, no metrics), itself in four folders that go one way:
                runtime (bundle, sessions) and search (vectors, candidates) know nothing of each
                other; gallery builds on both; serving (the contract, clients) on all
    datasets    formats, readers, validation, the synthetic benchmark (may use engine's file helpers)
    evaluation  metrics, the gallery protocol, reports (datasets, engine)
    training    CLARE in PyTorch (evaluation, datasets, engine)
    export      bundles, precision, TensorRT, Triton (training, evaluation, datasets, engine)
    cluster     indexing and serving on Ray (engine only; no torch)
    benchmarks  everything below; the command line (reir.cli) sits on top of all
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "torchvision", "transformers")
ABOVE = {
    "reir.engine": (
        "reir.datasets",
        "reir.evaluation",
        "reir.training",
        "reir.export",
        "reir.cluster",
        "reir.benchmarks",
        "reir.cli",
        "ray",
    ),
    "reir.datasets": ("reir.evaluation", "reir.training", "reir.export", "reir.benchmarks", "reir.cli"),
    "reir.evaluation": ("reir.training", "reir.export", "reir.benchmarks", "reir.cli"),
    "reir.training": ("reir.export", "reir.benchmarks", "reir.cli"),
    "reir.export": ("reir.benchmarks", "reir.cli"),
    "reir.cluster": ("reir.datasets", "reir.evaluation", "reir.training", "reir.export", "reir.benchmarks", "reir.cli"),
}
ABOVE |= {  # inside the engine
    "reir.engine.runtime": ("reir.engine.gallery", "reir.engine.search", "reir.engine.serving", "faiss"),
    "reir.engine.search": ("reir.engine.runtime", "reir.engine.gallery", "reir.engine.serving", "onnxruntime"),
    "reir.engine.gallery": ("reir.engine.serving", "tritonclient"),
}
TORCH_FREE = (
    "reir.engine",
    "reir.engine.runtime",
    "reir.engine.search",
    "reir.engine.gallery",
    "reir.datasets",
    "reir.evaluation",
    "reir.cluster",
)
MODULES_AT_LEAST = {"reir.cluster": 3}  # how many modules the walk must find (5 elsewhere)


def _import_all(layer: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys

        BLOCKED = {blocked!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        layer = importlib.import_module({layer!r})
        names = [m.name for m in pkgutil.walk_packages(layer.__path__, {layer!r} + ".")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layer", list(ABOVE))
def test_each_layer_imports_with_the_layers_above_blocked(layer):
    torch_free = layer in TORCH_FREE
    if not torch_free:
        pytest.importorskip("torch", reason="torch not installed (training extra)")
    if layer == "reir.cluster":
        pytest.importorskip("ray", reason="ray not installed (cluster extra)")
    res = _import_all(layer, ABOVE[layer] + (HEAVY if torch_free else ()))
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip()) >= MODULES_AT_LEAST.get(layer, 5)  # the walk really found the layer's modules


def test_the_blocker_really_blocks():
    """Guard against a blocker that silently lets an import through."""
    res = _import_all("reir.engine", ("reir.engine.gallery.shard", "torch"))
    assert res.returncode != 0 and "blocked: reir.engine.gallery.shard" in res.stderr


ENGINE_EXTRA = ("onnxruntime", "faiss", "tokenizers", "tritonclient", "usearch")


@pytest.mark.parametrize(
    "blocked, argv",
    [
        (HEAVY, ["search", "a red circle", "--gallery", "g"]),  # a serving host: no training extra
        (HEAVY + ENGINE_EXTRA, ["synth", "--out", "d", "--images", "3", "--quiet"]),  # the core install alone
        # the command line itself loads no engine, numpy, Pillow or Ray: each command what it uses
        (HEAVY + ENGINE_EXTRA + ("numpy", "PIL", "ray"), ["gallery", "info", "g"]),
    ],
)
def test_the_command_line_needs_only_what_its_command_uses(tmp_path, blocked, argv):
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        from reir.cli import build_parser, main
        argv = {argv!r}
        if argv[0] == "synth":
            assert main(argv) == 0
        else:
            build_parser().parse_args(argv)
        assert "torch" not in sys.modules
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
