"""The local stack: real servers on this machine, started, health-checked and stopped by pid.

``up(folder)`` starts, each as its own process in its own session (process group):

- ``s3``: ``moto_server`` on loopback, with the bucket ``sonosynth``;
- ``mlflow``: ``mlflow server`` with a SQLite backend in the folder and its artifacts in
  ``s3://sonosynth/mlflow`` (served through the server, so clients need no S3 access for
  them);
- ``ray-head``: ``ray start --head --block`` with the dashboard and the job server on
  loopback and token authentication on (a token of its own in ``FOLDER/ray/auth_token``);
- ``ray-worker-N`` (optional): more Ray nodes joined with ``ray start --address``, so that
  multi-node placement can be tried on one machine.

Every process it starts, and everything those start (Ray workers, job drivers, MLflow
workers), carries ``SONOSYNTH_STACK_ID=<id>`` in its environment. ``down`` stops the
recorded process groups and then whatever still carries the marker, so it never touches
another Ray or MLflow on the machine (no ``ray stop``, no kill by name), and it checks that
none is left. The Ray head's GCS and raylet listen on the node's address as Ray always does
(Ray turns 127.0.0.1 into the node IP); the dashboard and job server, MLflow and S3 listen on
127.0.0.1 only, and the token guards Ray.

``FOLDER/stack.json`` holds the pids, ports and URLs; ``FOLDER/logs/`` each server's log;
``FOLDER/env.sh`` the environment a client needs (``source`` it; it names the token file,
never the token).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from sonosynth.infra.storage import BOTO_RETRY_DEFAULTS

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
MARKER = "SONOSYNTH_STACK_ID"
BUCKET = "sonosynth"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""What moto_server accepts; the stack's processes get them, so jobs on its Ray reach its S3."""


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says which server and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this Python's environment (beside sys.executable), else from PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not found beside {sys.executable} or on PATH; install sonosynth's dev extras")
    return found


# -- state --------------------------------------------------------------------------------

def state_path(folder: str | Path) -> Path:
    return Path(folder).resolve() / STATE_FILE


def load_state(folder: str | Path) -> dict[str, Any] | None:
    path = state_path(folder)
    return json.loads(path.read_text()) if path.is_file() else None


def _save_state(state: dict[str, Any]) -> None:
    path = Path(state["folder"]) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a client of the stack needs (sonosynth verbs, submit, mlflow, boto3)."""
    head = state["services"].get("ray-head", {})
    env = {}
    if head:
        env.update(RAY_ADDRESS=head["gcs"], RAY_API_SERVER_ADDRESS=head["url"], RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=state["token_file"])
    if "mlflow" in state["services"]:
        env["MLFLOW_TRACKING_URI"] = state["services"]["mlflow"]["url"]
    if "s3" in state["services"]:
        env.update(AWS_ENDPOINT_URL=state["services"]["s3"]["url"],
                   MLFLOW_S3_ENDPOINT_URL=state["services"]["s3"]["url"], **CREDENTIALS)
    return env


def _write_env_file(state: dict[str, Any]) -> Path:
    path = Path(state["folder"]) / ENV_FILE
    lines = ["# sonosynth local stack: `source` this file to use it from a shell"]
    lines += [f"export {k}={v}" for k, v in client_env(state).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- processes ------------------------------------------------------------------------------

def _psutil():
    import psutil

    return psutil


def marked_processes(stack_id: str) -> list:
    """Every live process (zombies aside) that carries this stack's marker."""
    psutil = _psutil()
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARKER) == stack_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _is_ours(pid: int, stack_id: str) -> bool:
    psutil = _psutil()
    try:
        proc = psutil.Process(pid)
        return proc.environ().get(MARKER) == stack_id and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _reap() -> None:
    """Collect exited children of this process (when the stack was started in-process)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _spawn(state: dict[str, Any], name: str, args: list[str], env: dict[str, str], **record: Any) -> dict[str, Any]:
    folder = Path(state["folder"])
    log_path = folder / "logs" / f"{name}.log"
    full_env = {**os.environ, **env, MARKER: state["id"],
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True, close_fds=True)
    entry = {"pid": proc.pid, "log": str(log_path), "cmd": args, **record}
    state["services"][name] = entry
    _save_state(state)
    return entry


def _http(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until(state: dict[str, Any], name: str, check: Callable[[], bool], timeout_s: float) -> None:
    entry = state["services"][name]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        if not _is_ours(entry["pid"], state["id"]):
            raise StackError(f"{name} exited while starting; its log {entry['log']} ends:\n{_log_tail(entry['log'])}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not become healthy within {timeout_s:.0f} s; its log {entry['log']} "
                             f"ends:\n{_log_tail(entry['log'])}")
        time.sleep(0.3)


def auth_headers(state: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": "Bearer " + Path(state["token_file"]).read_text().strip()}


def _alive_raylets(state: dict[str, Any]) -> list[dict[str, Any]]:
    status, body = _http(state["services"]["ray-head"]["url"] + "/nodes?view=summary", auth_headers(state))
    if status != 200:
        return []
    data = json.loads(body).get("data", {}).get("summary", [])
    return [n["raylet"] for n in data if (n.get("raylet") or {}).get("state") == "ALIVE"]


def _alive_ray_nodes(state: dict[str, Any]) -> int:
    return len(_alive_raylets(state))


def _healthy(state: dict[str, Any], name: str) -> bool:
    try:
        return _is_ours(state["services"][name]["pid"], state["id"]) and _health(state, name)
    except (OSError, ValueError):
        return False


def _health(state: dict[str, Any], name: str) -> bool:
    entry = state["services"][name]
    if name == "s3":
        return _http(entry["url"] + "/moto-api/")[0] == 200
    if name == "mlflow":
        return _http(entry["url"] + "/health")[0] == 200
    if name == "ray-head":  # the job server answers (with the token) and the head node is alive
        return _http(entry["url"] + "/api/jobs/", auth_headers(state))[0] == 200 and _alive_ray_nodes(state) >= 1
    if name.startswith("ray-worker"):
        return _is_ours(entry["pid"], state["id"])
    return False


# -- starting -------------------------------------------------------------------------------

def _start_s3(state: dict[str, Any], timeout_s: float) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _spawn(state, "s3", [executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)], {}, url=url)
    _wait_until(state, "s3", lambda: _health(state, "s3"), timeout_s)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                 aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)


def _spawn_mlflow(state: dict[str, Any]) -> None:
    folder = Path(state["folder"])
    (folder / "mlflow").mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**CREDENTIALS, **BOTO_RETRY_DEFAULTS}  # the server's own S3 client retries with botocore
    if "s3" in state["services"]:
        s3 = state["services"]["s3"]["url"]
        env.update(MLFLOW_S3_ENDPOINT_URL=s3, AWS_ENDPOINT_URL=s3)
        artifacts = f"s3://{BUCKET}/mlflow"
    else:
        artifacts = str(folder / "mlflow" / "artifacts")
    _spawn(state, "mlflow", [executable("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
                             "--artifacts-destination", artifacts], env, url=url, artifacts=artifacts)


def _ray_env(state: dict[str, Any]) -> dict[str, str]:
    """What every Ray node of the stack runs with: token auth, and the stack's MLflow and S3."""
    env = {k: v for k, v in client_env(state).items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_file"], RAY_USAGE_STATS_ENABLED="0")
    return env


def _spawn_ray_head(state: dict[str, Any], num_cpus: int | None) -> None:
    folder = Path(state["folder"])
    token = folder / "ray" / "auth_token"
    token.parent.mkdir(exist_ok=True)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    state["token_file"] = str(token)
    gcs_port, dash_port = free_port(), free_port()
    args = [executable("ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
            "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
            "--temp-dir", state["ray_temp_dir"]]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    _spawn(state, "ray-head", args, _ray_env(state), gcs=f"127.0.0.1:{gcs_port}",
           url=f"http://127.0.0.1:{dash_port}")


WORKER_START_ATTEMPTS = 2
"""How many times a worker node is started before add_worker_node gives up."""


def add_worker_node(folder: str | Path, num_cpus: int = 1, timeout_s: float = 120.0) -> str:
    """Join one more Ray node (``ray start --address``) to the stack's head; returns its name."""
    state = load_state(folder)
    if not state or "ray-head" not in state["services"]:
        raise StackError(f"no stack with a Ray head in {folder}; run `sonosynth stack up --dir {folder}` first")
    n = 1 + sum(1 for k in state["services"] if k.startswith("ray-worker"))
    name = f"ray-worker-{n}"
    for attempt in range(WORKER_START_ATTEMPTS):
        port = free_port()  # its raylet's port tells it apart from a lost node not yet declared dead
        args = [executable("ray"), "start", "--address", state["services"]["ray-head"]["gcs"], "--block",
                "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                "--node-manager-port", str(port), "--dashboard-agent-listen-port", str(free_port())]
        entry = _spawn(state, name, args, _ray_env(state), num_cpus=num_cpus)
        try:
            _wait_until(state, name,
                        lambda port=port: any(int(r.get("nodeManagerPort", 0)) == port for r in _alive_raylets(state)),
                        timeout_s)
            return name
        except StackError:
            # `ray start` gives up when its raylet does not register within Ray's own wait (seen on a loaded
            # 2-core machine, once in a suite); a fresh start with fresh ports then joins
            _signal_group(entry["pid"], state["id"], signal.SIGKILL)
            if attempt + 1 == WORKER_START_ATTEMPTS:
                raise
            log.warning("%s did not join the head; starting it again", name)
    return name


def up(folder: str | Path, *, ray_cpus: int | None = None, worker_nodes: int = 0, worker_cpus: int = 1,
       mlflow: bool = True, s3: bool = True, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start the stack in ``folder`` (or return the one already running there) and health-check it."""
    folder = Path(folder).resolve()
    existing = load_state(folder)
    if existing:
        if existing["services"] and all(_healthy(existing, name) for name in existing["services"]):
            return existing
        down(folder)  # partly dead: clear what is left, then start afresh
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    stack_id = uuid.uuid4().hex[:12]
    state: dict[str, Any] = {"id": stack_id, "folder": str(folder), "started": time.time(), "services": {},
                             # short, so Ray's socket paths stay under the 107-byte limit
                             "ray_temp_dir": f"/tmp/sonosynth-ray-{stack_id}"}
    _save_state(state)
    try:
        if s3:
            _start_s3(state, timeout_s)
        if mlflow:  # MLflow and Ray start side by side; each is waited for
            _spawn_mlflow(state)
        _spawn_ray_head(state, ray_cpus)
        for name in ("mlflow", "ray-head"):
            if name in state["services"]:
                _wait_until(state, name, lambda name=name: _health(state, name), timeout_s)
        for _ in range(worker_nodes):
            add_worker_node(folder, worker_cpus, timeout_s)
            state = load_state(folder)
    except BaseException:
        try:
            down(folder)
        except StackError:
            pass
        raise
    state = load_state(folder)
    _write_env_file(state)
    return state


# -- stopping -------------------------------------------------------------------------------

def _signal_group(pid: int, stack_id: str, sig: int) -> None:
    """Signal the process group of a recorded pid, only while that pid is still ours."""
    if not _is_ours(pid, stack_id):
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_service(folder: str | Path, name: str) -> int:
    """SIGKILL one service and everything under it at once (a node lost, as on a cluster).
    Returns how many processes were killed. The entry stays in the state, marked ``killed``;
    ``down`` cleans up."""
    psutil = _psutil()
    state = load_state(folder)
    if not state or name not in state["services"]:
        raise StackError(f"no service {name!r} in the stack in {folder}")
    root = state["services"][name]["pid"]
    if not _is_ours(root, state["id"]):
        return 0
    procs = [psutil.Process(root)] + psutil.Process(root).children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    _reap()
    state["services"][name]["killed"] = True
    _save_state(state)
    return len(procs)


def down(folder: str | Path, grace_s: float = 10.0) -> list[str]:
    """Stop every process of the stack; returns one line per service. SIGTERM first; what is
    left after ``grace_s`` (a Ray head takes ~35 s to wind down gracefully) gets SIGKILL.
    Raises StackError if any process of the stack is still alive afterwards."""
    psutil = _psutil()
    state = load_state(folder)
    if not state:
        return []
    stack_id = state["id"]
    lines = []
    for name in reversed(list(state["services"])):  # workers, head, mlflow, s3
        pid = state["services"][name]["pid"]
        running = _is_ours(pid, stack_id)
        _signal_group(pid, stack_id, signal.SIGTERM)
        lines.append(f"{name:<12} pid {pid:<8} {'stopped' if running else 'was not running'}")
    deadline = time.monotonic() + grace_s
    while marked_processes(stack_id) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.3)
    left = marked_processes(stack_id)
    for proc in left:  # what ignored SIGTERM, and orphans (Ray workers run in groups of their own)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if left:
        psutil.wait_procs(left, timeout=10)
    _reap()
    left = marked_processes(stack_id)
    if left:
        raise StackError("processes of the stack are still alive after SIGKILL: "
                         + ", ".join(f"{p.pid} ({' '.join(p.cmdline())[:60]})" for p in left))
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    state_path(folder).unlink(missing_ok=True)
    (Path(state["folder"]) / ENV_FILE).unlink(missing_ok=True)
    return lines


def status(folder: str | Path) -> list[dict[str, Any]]:
    """Each service: name, pid, alive (the process is there), healthy (it answers), url, log."""
    state = load_state(folder)
    if not state:
        return []
    rows = []
    for name, entry in state["services"].items():
        alive = _is_ours(entry["pid"], state["id"])
        healthy = alive and _healthy(state, name)
        rows.append({"name": name, "pid": entry["pid"], "alive": alive, "healthy": healthy,
                     "url": entry.get("url"), "log": entry["log"]})
    return rows
