"""Start a real `tritonserver` on CPU from the `nvidia-pytriton` wheel (docs/environment.md).

The wheel bundles Triton 2.51 with only the python backend, so the repository runs with
`--model-config-name pyort` (ONNX Runtime inside python models). The python backend's stub
needs numpy < 2 in the environment it runs in, so the server gets its own virtual
environment (`make triton-env` builds `.venv-triton`); pass its interpreter as `python`.

Loopback only unless told otherwise; the server is stopped by its pid (and its process
group: the python stubs), also when the caller fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from reir.engine.errors import ReirError

NGC_COMMAND = (
    "docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
    "-v {repo}:/models -v {gallery_root}:{gallery_root} "
    "nvcr.io/nvidia/tritonserver:25.10-py3 bash -c 'pip install clare-reir[engine] && "
    "tritonserver --model-repository=/models --model-config-name=gpu-trt'"
)


class ServerError(ReirError):
    pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are, since a port just
    released can be handed out again (two of a server's three ports once came out equal)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _env_info(python: Path) -> tuple[Path, str, str]:
    """(pytriton package dir, X.Y, libdir) of the server environment's interpreter."""
    code = (
        "import importlib.util, sys, sysconfig; "
        "print(importlib.util.find_spec('pytriton').submodule_search_locations[0]); "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}'); print(sysconfig.get_config_var('LIBDIR'))"
    )
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "no output"
        raise ServerError(f"{python}: nvidia-pytriton not found ({why}); build the environment with `make triton-env`")
    pkg, ver, libdir = res.stdout.split("\n")[:3]
    return Path(pkg), ver, libdir


class TritonServer:
    def __init__(
        self,
        repository: Path,
        python: Path | None = None,
        model_config_name: str | None = "pyort",
        address: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
    ):
        self.repository = Path(repository).resolve()
        self.python = Path(python) if python else Path(sysconfig.get_path("scripts")) / "python"
        self.model_config_name = model_config_name
        self.address = address
        spare = iter(free_ports(3, address))
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._scratch: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> TritonServer:
        pkg, ver, libdir = _env_info(self.python)
        self._scratch = Path(tempfile.mkdtemp(prefix="reir-triton-"))
        server = self._scratch / "tritonserver"
        shutil.copytree(pkg / "tritonserver", server, symlinks=True)
        stub = server / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no python backend stub for Python {ver}")
        shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")
        env = dict(os.environ)
        env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"  # the stub finds the env's packages
        libs = [libdir, str(pkg.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=3",
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        log = open(self.log_path or self._scratch / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServerError(f"tritonserver exited with {self.proc.returncode} while loading:\n{tail}")
            if self.ready():
                return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path or (self._scratch / "server.log" if self._scratch else None)
        if path is None or not Path(path).is_file():
            return ""
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # stubs left by a crash
                os.killpg(self.proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._scratch is not None and self.log_path is None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
