"""Session-wide test setup: Triton's interpreter on CPU-only machines, ``require`` for the test extra's
dependencies, and the shared S3 fixtures: a real HTTP S3 endpoint (moto's server) on 127.0.0.1, reset
between tests.

A real endpoint rather than in-process mocking, because s3fs/aiobotocore and pyarrow's C++ client bypass
Python-level mocks, and because loader worker processes must reach it too (they inherit the env vars).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Triton reads TRITON_INTERPRET when it is first imported, and libraries imported by other test directories
# (transformers, diffusers) import it early. This root conftest loads before any test module, so on a machine
# without CUDA every Triton kernel runs in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def require(module: str, extra: str = "test"):
    """Import a dependency of the ``extra`` install group, or fail the test module that needs it.

    A missing test dependency must not turn into a silent skip: the tests it guards would never run, and the
    suite would still look green.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    pytest.fail(f"{module} is not importable ({error}); the tests here need the '{extra}' extra: "
                f"pip install -e '.[{extra}]'", pytrace=False)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore >= 1.36 sends CRC checksum headers by default; S3-compatible servers may reject them.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 (all held open until every one is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and ``AWS_ENDPOINT_URL`` pointing at the moto server (seen by child processes too);
    the server's state is wiped after the test."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield s3_server
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).read()


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh empty bucket; returns its ``s3://name`` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(autouse=True)
def _no_stale_s3fs_instances():
    """s3fs and dataloaders.storage keep filesystem objects per process; a kept one may point at a previous
    test's endpoint or hold its listings."""
    yield
    if "s3fs" in sys.modules:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    if "dataloaders.storage" in sys.modules:
        sys.modules["dataloaders.storage"]._PROCESS_FILESYSTEMS.clear()


class LocalStack:
    """``python -m infra.local`` against a stack under its own FLOWSCALE_HOME, on free ports."""

    def __init__(self, home: Path):
        from infra.local import ADMIN_GRPC_OFFSET, DEFAULT_PORTS, port_in_use

        self.home = home
        self.ports = dict(zip(DEFAULT_PORTS, free_ports(len(DEFAULT_PORTS))))
        while not (self.ports["weed_admin"] + ADMIN_GRPC_OFFSET <= 65535  # SeaweedFS listens there too
                   and not port_in_use(self.ports["weed_admin"] + ADMIN_GRPC_OFFSET)):
            self.ports["weed_admin"] = free_port()
        self.port_args = [f"--port={name}={port}" for name, port in self.ports.items()]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "infra.local", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def up(self, *args: str) -> subprocess.CompletedProcess:
        out = self.cli("up", *args)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    def pids(self) -> dict[str, int]:
        return {p.stem: json.loads(p.read_text())["pid"] for p in (self.home / "stack" / "pids").glob("*.json")}

    def env(self) -> dict[str, str]:
        """This process's environment as ``eval "$(python -m infra.local env)"`` leaves it in a shell."""
        from infra.local import FOREIGN_VARS, client_env, open_stack

        return {**{k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}, **client_env(open_stack())}


@contextlib.contextmanager
def local_stack_at(home: Path, monkeypatch: pytest.MonkeyPatch):
    """A ``LocalStack`` (not started) with FLOWSCALE_HOME at ``home``; brought down at the end, whatever was
    left running."""
    monkeypatch.setenv("FLOWSCALE_HOME", str(home))
    stack = LocalStack(home)
    try:
        yield stack
    finally:
        if (home / "stack" / "stack.json").exists():
            stack.cli("down")


@pytest.fixture
def local_stack(tmp_path, monkeypatch):
    with local_stack_at(tmp_path / "home", monkeypatch) as stack:
        yield stack
