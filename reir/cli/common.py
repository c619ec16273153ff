"""What several commands share: tag arguments, printing hits, signals, the remote client."""

from __future__ import annotations

import argparse
import signal
import sys

BACKENDS = ("triton", "serve")


def parse_tags(pairs: list[str] | None) -> dict[str, str] | None:
    """KEY=VALUE arguments as a tag dict (None when there are none)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tags {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out or None


def add_tags(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--tags", nargs="*", metavar="KEY=VALUE", help=help)


def remote_client(url: str, backend: str | None):
    """The contract's client for a server: `--server URL --backend triton|serve`."""
    if backend is None:
        raise ValueError("--server needs --backend triton (Triton's retrieve) or --backend serve (the Ray Serve app)")
    if backend == "triton":
        from reir.engine.serving.triton_client import TritonRetriever  # tritonclient: the triton extra

        return TritonRetriever(url)
    from reir.engine.serving.serve_client import ServeRetriever

    return ServeRetriever(url)


def print_hits(text: str, result, limit: str) -> None:
    """One expression's ranked hits as a table."""
    print(f'"{text}"')
    if result.truncated:
        print(f"note: the expression was truncated at {limit}")
    print(f"{'rank':>4}  {'score':>8}  {'image':>6}  {'box (x1, y1, x2, y2)':<28} path")
    for rank, h in enumerate(result.hits, 1):
        box = ", ".join(f"{v:.0f}" for v in h.box)
        print(f"{rank:>4}  {h.score:>8.3f}  {h.image_id:>6}  ({box}){'':<{max(0, 24 - len(box))}} {h.path}")
    if not result.hits:
        print("(no image matches: the gallery is empty, or no image has these tags)")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (systemd, `docker stop`, Kubernetes) exit through the servers'
    `finally` blocks, so nothing is left behind. A shell starts background jobs with SIGINT
    ignored, and a child inherits that: take SIGINT back, or `kill -INT` would never stop it."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def warn_if_exposed(host: str, what: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host}: {what} is reachable from the network", file=sys.stderr)
