"""Real servers on 127.0.0.1 for integration tests: moto's S3 server, an MLflow tracking server
and a Ray head with token auth. Each is a context manager that picks free ports, waits until
the server answers, and always tears its own processes down (by process group, never
``ray stop``, which would kill every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    return free_port()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s: {_tail(log)}")


def _tail(log: Path | None, n: int = 3000) -> str:
    if log is None or not log.is_file():
        return ""
    return log.read_text(errors="replace")[-n:]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class Server:
    """A started server process: ``wait()`` until it answers, ``stop()`` kills its process group."""

    name: str
    proc: subprocess.Popen
    url: str
    health: str
    log: Path
    timeout: float
    env: dict[str, str] | None = None
    temp_dir: Path | None = None
    address: str | None = None  # a Ray head's GCS address (``ray start --address``)

    def wait(self) -> "Server":
        wait_http(self.url + self.health, self.proc, self.timeout, self.log)
        return self

    def stop(self) -> None:
        _stop(self.proc, grace=10 if self.name == "ray" else 5)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_moto_s3(workdir: Path) -> Server:
    """moto's standalone S3 server process (not in-process patching of boto3)."""
    port = free_port()
    log = workdir / "moto.log"
    cmd = [sys.executable, "-c", "from moto.server import main; main()", "-H", HOST, "-p", str(port)]
    proc = _spawn(cmd, {**os.environ, **S3_ENV}, log)
    return Server("moto", proc, f"http://{HOST}:{port}", "/moto-api/", log, 60)


def start_mlflow(workdir: Path, artifacts_destination: str, s3_endpoint: str) -> Server:
    """``mlflow server``: sqlite backend, artifacts proxied to ``artifacts_destination`` (S3)."""
    port = free_port()
    log = workdir / "mlflow.log"
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL_S3": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
           "--artifacts-destination", artifacts_destination]
    return Server("mlflow", _spawn(cmd, env, log), f"http://{HOST}:{port}", "/health", log, 150)


def start_ray_head(num_cpus: int = 2, env: dict[str, str] | None = None) -> Server:
    """A Ray head on 127.0.0.1 with token auth (``RAY_AUTH_MODE=token``), every port chosen free.

    ``server.url`` is the dashboard (``ray job submit --address``); ``server.env`` holds the
    auth variables every client needs.
    """
    token = secrets.token_hex(32)
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {**os.environ, **(env or {}), **auth, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    worker_lo = 10000 + (dash % 9000)  # below the ephemeral range the other free ports come from
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address", HOST, "--dashboard-host", HOST, "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--include-dashboard", "true", "--temp-dir", str(temp), "--disable-usage-stats",
           "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 200),
           *[x for kv in ports.items() for x in (kv[0], str(kv[1]))]]
    log = temp / "ray-start.log"
    return Server("ray", _spawn(cmd, env, log), f"http://{HOST}:{dash}", "/api/version", log, 180, auth, temp,
                  f"{HOST}:{ports['--port']}")


def start_ray_worker(head: Server, num_cpus: int = 1, env: dict[str, str] | None = None) -> Server:
    """A second Ray node joining ``head`` (``ray start --address``) on 127.0.0.1, ports chosen free.
    Its ``url`` is the head's dashboard (a worker node serves no HTTP); wait for it with
    :func:`wait_nodes`."""
    assert head.address and head.env and head.temp_dir
    env = {**os.environ, **(env or {}), **head.env, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    worker_lo = 10000 + (ports["--node-manager-port"] % 9000)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--address", head.address, "--block",
           "--node-ip-address", HOST, "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats",
           "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 200),
           *[x for kv in ports.items() for x in (kv[0], str(kv[1]))]]
    log = head.temp_dir / f"ray-worker-{ports['--node-manager-port']}.log"
    return Server("ray", _spawn(cmd, env, log), head.url, "/api/version", log, 180, head.env)


def wait_nodes(head: Server, count: int, timeout: float = 180) -> list[dict]:
    """Block until ``count`` Ray nodes are alive (the head's state API, with its token)."""
    import json
    import urllib.request

    deadline = time.time() + timeout
    nodes: list[dict] = []
    while time.time() < deadline:
        req = urllib.request.Request(f"{head.url}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.loads(r.read())
            nodes = [n for n in body["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE"]
            if len(nodes) >= count:
                return nodes
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(2)
    raise TimeoutError(f"only {len(nodes)} of {count} Ray nodes alive after {timeout}s; see {head.temp_dir}")


@contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Wait for servers started concurrently; stop all of them on exit, even after a failure."""
    try:
        for s in servers:
            s.wait()
        yield servers
    finally:
        for s in reversed(servers):
            s.stop()
