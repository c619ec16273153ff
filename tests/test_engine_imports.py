"""engine/ must import on a host without torch (a Triton box, a Jetson)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_every_engine_module_imports_without_torch():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "transformers"):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import reir.engine as engine
        names = [m.name for m in pkgutil.walk_packages(engine.__path__, "reir.engine.")]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        print(len(names))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) >= 10  # the walk really found the package's modules


def test_blocker_really_blocks_torch():
    """Guard against a blocker that silently lets torch through."""
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "blocked: torch" in res.stderr
