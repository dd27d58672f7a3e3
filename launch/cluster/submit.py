"""Ray Jobs: run any sonosynth verb on a Ray cluster through the Job Submission API.

``submit(["train-lora", "lora_joint_tiny", ...], address=...)`` sends one Ray job whose
entrypoint is ``python -m sonosynth.launch.cluster.submit VERB ARGS...`` (this module's ``main``: it
prints which sonosynth it runs from, then runs the CLI verb). What travels with the job:

- **the installed package, never the repo.** ``package="wheel"`` (the default) ships the
  ``sonosynth`` package as a wheel would install it, through ``runtime_env["py_modules"]``:
  from a checkout (an editable install) a wheel is built once per content hash of the
  package's files (``~/.cache/sonosynth/packages/<hash>/``) and unpacked; from a regular
  install the installed package folder itself. ``package="image"`` ships nothing: the
  cluster's image has sonosynth installed (the KubeRay manifests). ``working_dir`` is never
  set, so nothing of the checkout (``datasets/`` would shadow HuggingFace ``datasets``) is
  put on the job's path.
- **environment by name, never a secret.** ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``,
  ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_DEFAULT_REGION`` and ``AWS_REGION`` are copied when set
  here, plus every name given with ``env``. Only names are printed. A job's runtime env and
  command are shown to anyone who can read the dashboard, so credentials never travel: a
  URI's ``user:password@`` is stripped (with a warning), and an ``env`` name that holds a
  secret (by its name, ``infra/secrets.is_secret_name``, or its value), an argument or a
  local recipe holding a password or a secret's value are refused (exit 2). The cluster
  holds its own (KubeRay pods read them from a Secret; the local stack's nodes have moto's).
- **a local YAML recipe**: its resolved content (``extends:`` merged) goes in the job's
  environment and the entrypoint reads it back, so a recipe that is not in the wheel works
  on a cluster too. Named recipes are in the wheel.

Authentication (Ray 2.60 turns token auth on): the token comes from ``token_file``, else
``$RAY_AUTH_TOKEN``, else ``$RAY_AUTH_TOKEN_PATH``, else, when ``$RAY_AUTH_MODE`` is
``token``, Ray's default ``~/.ray/auth_token``; it is sent as a bearer token header and
never printed. With ``wait`` the job's logs are streamed, the job's exit status becomes the
return code (0 done, the driver's own code when it failed, 1 otherwise) and Ctrl-C stops the
job (130).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sonosynth.infra.secrets import (has_uri_password, is_secret_name, redact, redact_uri, secret_values,
                                     strip_uri_credentials)
from sonosynth.infra.stage import UsageError

DEFAULT_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
               "SONOSYNTH_VERBOSE", "SONOSYNTH_PROGRESS_INTERVAL_S")
"""Copied into every job when set here (configuration, not secrets: a URI's password is stripped);
``sonosynth --verbose submit ...`` gives the job the whole console too."""
RECIPE_ENV = "SONOSYNTH_RECIPE_YAML"
"""A local recipe's resolved YAML, written back to a file by the job's entrypoint."""
PACKAGE_ENV = "SONOSYNTH_PACKAGE"
"""How the job got sonosynth (wheel and hash, or image), for the job's first log line."""
LOCAL_VERBS = ("stack", "submit", "jobs", "k8s")
"""Verbs that act on this machine or a cluster from outside; they are never jobs."""
OTHER_JOB_VERBS = ("champion", "config", "demo", "inspect", "tracking-replay")
"""The CLI's hand-written verbs a job may run; every stage of the registry is a job verb too."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PACKAGES = ("wheel", "image")


class SubmitUsageError(UsageError):
    """A bad request: unknown verb, no address, missing token; the message names the fix (exit 2)."""


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the job (exit 1)."""


# -- what runs ------------------------------------------------------------------------------

def job_verbs() -> list[str]:
    """Every verb a job may run: the stage registry's stages and the other verbs that are not
    local (``tests/unit/launch/test_stage_registry.py`` checks this against the CLI)."""
    from sonosynth.launch.stages import STAGES

    return sorted({*STAGES, *OTHER_JOB_VERBS})


def check_verb(argv: list[str]) -> None:
    if not argv:
        raise SubmitUsageError("no verb to run: put it after `--`, e.g. `sonosynth submit -- train-lora RECIPE`")
    verbs = job_verbs()
    if argv[0] not in verbs:
        raise SubmitUsageError(f"{argv[0]!r} is not a verb a job can run; verbs are {', '.join(verbs)}")


def local_recipe(argv: list[str]) -> Path | None:
    """The verb's recipe argument when it is a YAML file here (not a recipe name)."""
    if len(argv) > 1 and argv[1].endswith((".yaml", ".yml")) and Path(argv[1]).is_file():
        return Path(argv[1])
    return None


def resolved_recipe_yaml(path: Path) -> str:
    """A recipe file with its ``extends:`` chain merged: one self-contained YAML."""
    import yaml

    from sonosynth.launch.recipes import load_recipe

    return yaml.safe_dump(load_recipe(path), sort_keys=False)


def path_warnings(argv: list[str]) -> list[str]:
    """Relative paths in the arguments that exist here: a job runs in another folder."""
    out = []
    for arg in argv[1:]:
        value = arg.split("=", 1)[1] if "=" in arg and not arg.startswith("-") else arg
        if value.startswith("-") or "://" in value or ":/" in value or os.path.isabs(value):
            continue
        if ("/" in value or value.startswith(".")) and Path(value).exists():
            out.append(f"{arg!r} is a relative path on this machine; the job runs elsewhere: use an absolute "
                       f"path on storage every node sees, or s3://")
    return out


# -- the package ----------------------------------------------------------------------------

def checkout_root() -> Path | None:
    """The source checkout sonosynth is installed from in editable mode, else None."""
    import sonosynth
    import sonosynth.launch

    pkg = Path(sonosynth.__file__).resolve().parent
    launch = Path(sonosynth.launch.__file__).resolve().parent
    if launch.parent == pkg:  # a regular install: every subpackage sits inside the package
        return None
    root = launch.parent
    return root if (root / "pyproject.toml").is_file() else None


def _package_dirs(root: Path) -> list[str]:
    """The folders the wheel is built from (pyproject's package-dir), and its metadata files."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = None
    dirs: Iterable[str] = ("src/sonosynth", "datasets", "trainers", "launch", "infra", "configs")
    if tomllib is not None:
        data = tomllib.loads((root / "pyproject.toml").read_text())
        dirs = data.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values() or dirs
    return sorted(set(dirs))


def _source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml"] + [root / n for n in ("README.md", "setup.cfg", "setup.py", "MANIFEST.in")
                                         if (root / n).is_file() and n != "pyproject.toml"]
    for d in _package_dirs(root):
        for path in sorted((root / d).rglob("*")):
            rel = path.relative_to(root).parts
            if path.is_file() and "__pycache__" not in rel and not path.name.endswith((".pyc", ".pyo")) \
                    and not any(p.endswith(".egg-info") for p in rel):
                files.append(path)
    return files


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in _source_files(root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sonosynth" / "packages"


def build_package(root: Path, cache: Path | None = None) -> tuple[Path, str]:
    """The checkout's wheel, built once per content hash and unpacked: (its ``sonosynth`` folder, hash)."""
    digest = source_hash(root)
    target = (cache or cache_dir()) / digest[:16]
    if (target / "sonosynth" / "__init__.py").is_file():
        return target / "sonosynth", digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out, unpacked = Path(tmp) / "src", Path(tmp) / "dist", Path(tmp) / "unpacked"
        for path in _source_files(root):  # a clean copy: no build/ or egg-info of the checkout
            dest = src / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        out.mkdir()
        res = subprocess.run([sys.executable, "-c", "import sys\nfrom setuptools import build_meta as b\n"
                              "print(b.build_wheel(sys.argv[1]))", str(out)],
                             cwd=src, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise SubmitError(f"building the wheel from {root} failed:\n{res.stderr[-3000:]}")
        wheel = next(out.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        shutil.copy2(wheel, unpacked / wheel.name)
        try:
            unpacked.rename(target)
        except OSError:  # built by another process meanwhile
            if not (target / "sonosynth" / "__init__.py").is_file():
                raise
    return target / "sonosynth", digest


def package_to_ship(package: str = "wheel") -> tuple[Path | None, str]:
    """(the folder to ship as py_modules or None, a description for the log)."""
    import sonosynth

    if package == "image":
        return None, "image (the cluster's installed sonosynth)"
    if package != "wheel":
        raise SubmitUsageError(f"package must be one of {', '.join(PACKAGES)}, not {package!r}")
    root = checkout_root()
    if root is None:
        folder = Path(sonosynth.__file__).resolve().parent
        return folder, f"installed sonosynth {sonosynth.__version__}"
    folder, digest = build_package(root)
    return folder, f"wheel sonosynth {sonosynth.__version__} sha256:{digest[:12]}"


# -- the cluster ----------------------------------------------------------------------------

def token(token_file: str | None = None) -> str | None:
    """The Ray auth token (never printed): --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    or Ray's default file when $RAY_AUTH_MODE is token."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise SubmitUsageError(f"token file {token_file} not found")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise SubmitUsageError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist")
        return path.read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip()
    return None


def resolve_address(address: str | None) -> str:
    """The job server's URL: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitUsageError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                               "RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def client(address: str | None = None, token_file: str | None = None):
    """A JobSubmissionClient for the cluster, with the token header when there is a token."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    secret = token(token_file)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except ConnectionError as err:
        raise SubmitError(f"cannot reach the Ray job server at {redact_uri(url)} ({redact(str(err))}); --address "
                          f"is the dashboard (http://HEAD:8265), not the GCS (HEAD:6379)") from None
    except (RuntimeError, _ray_error()) as err:
        raise _explain(err, url) from None


def _ray_error() -> type[Exception]:
    from ray.exceptions import RayError as error

    return error


def _explain(err: Exception, url: str) -> Exception:
    text, url = redact(str(err)), redact_uri(url)
    if "401" in text or "403" in text or "Authentication" in text or "authentication" in text:
        return SubmitUsageError(f"the Ray cluster at {url} refused the request ({text.splitlines()[0]}): it uses "
                                f"token auth; pass --token-file or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return SubmitError(f"Ray job server at {url}: {text}")


@dataclass
class Submission:
    submission_id: str
    address: str
    entrypoint: str
    package: str
    env_names: list[str]
    warnings: list[str]


CLUSTER_SECRETS = ("give the cluster its own: on KubeRay, keys of the Secret sonosynth-s3, which the Ray pods "
                   "import into their environment (the S3 keys are there; add MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD for an MLflow that asks for a login); on a Ray cluster you started, "
                   "the environment of `ray start` on every node (docs/secrets.md)")
"""Where a job's credentials come from, since they never travel with it."""


def _refuse_secrets(what: str, value: str) -> None:
    """A value sent with the job (an argument, a recipe, an ``--env``) must hold no secret: a
    job's entrypoint and runtime env are shown to whoever reads the Ray dashboard."""
    if has_uri_password(value):
        raise SubmitUsageError(f"{what} holds a URI with a password ({redact_uri(_uri_in(value))}); a job's "
                               f"command and environment are shown to anyone who can read the Ray dashboard, "
                               f"so it is not sent: leave the password out and {CLUSTER_SECRETS}")
    if redact(value) != value:
        names = sorted({n for v, n in secret_values().items() if v in value})
        raise SubmitUsageError(f"{what} holds the value of {', '.join(names)}; a job's command and environment "
                               f"are shown to anyone who can read the Ray dashboard, so it is not sent: "
                               f"{CLUSTER_SECRETS}")


def _uri_in(text: str) -> str:
    return next((w for w in text.split() if has_uri_password(w)), text)[:200]


def check_secrets(argv: list[str], recipe_yaml: str | None = None) -> None:
    """Refuse (exit 2) arguments or a local recipe that carry a password or a secret's value."""
    for arg in argv:
        _refuse_secrets(f"the argument {redact(arg)!r}", arg)
    if recipe_yaml is not None:
        _refuse_secrets("the recipe", recipe_yaml)


def job_env_vars(env_names: Iterable[str] = ()) -> tuple[dict[str, str], list[str], list[str]]:
    """(the variables copied into a job, their names, warnings). ``DEFAULT_ENV`` is copied when
    set, with a URI's ``user:password@`` stripped (and a warning saying so); an ``--env`` name
    that holds a secret, by its name or its value, is refused."""
    names = [n for n in DEFAULT_ENV if os.environ.get(n)]
    for name in env_names:
        if name not in os.environ:
            raise SubmitUsageError(f"--env {name}: no such variable in this environment")
        if is_secret_name(name):
            raise SubmitUsageError(f"--env {name}: {name} holds a secret, and a job's environment is shown to "
                                   f"anyone who can read the Ray dashboard, so it is never copied: "
                                   f"{CLUSTER_SECRETS}")
        _refuse_secrets(f"--env {name}", os.environ[name])
        if name not in names:
            names.append(name)
    env_vars, warnings = {}, []
    for name in names:
        value, had_password = strip_uri_credentials(os.environ[name])
        if had_password:
            how = ("MLflow sends MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD as basic auth; "
                   if name == "MLFLOW_TRACKING_URI" else "")
            warnings.append(f"{name} holds a password; the job gets {value} without it (a job's environment "
                            f"is shown to anyone who can read the Ray dashboard). {how}{CLUSTER_SECRETS}")
        env_vars[name] = value
    return env_vars, names, warnings


def runtime_env(folder: Path | None, package: str, env_names: Iterable[str] = (),
                recipe_yaml: str | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """The job's runtime env, the names of the environment variables it carries, and warnings
    (a password stripped from a copied URI). It never holds a secret (docs/secrets.md)."""
    env_vars, names, warnings = job_env_vars(env_names)
    env_vars[PACKAGE_ENV] = package
    # the stage's own ray.init adds env vars (quiet logging, DS_ACCELERATOR) on top of the job's
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    if recipe_yaml is not None:
        check_secrets([], recipe_yaml)
        env_vars[RECIPE_ENV] = recipe_yaml
    env: dict[str, Any] = {"env_vars": env_vars}
    if folder is not None:
        env["py_modules"] = [str(folder)]
    return env, names, warnings


def entrypoint(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "sonosynth.launch.cluster.submit", *argv])


def submit(argv: list[str], address: str | None = None, *, package: str = "wheel", env_names: Iterable[str] = (),
           token_file: str | None = None, submission_id: str | None = None) -> Submission:
    """Send ``sonosynth ARGV`` as a Ray job; returns at once (``follow`` waits for it). What
    the job gets is checked here first: no secret travels with it (``check_secrets``,
    ``job_env_vars``), and a refusal (exit 2) sends nothing."""
    check_verb(argv)
    recipe = local_recipe(argv)
    recipe_yaml = resolved_recipe_yaml(recipe) if recipe else None
    check_secrets(argv, recipe_yaml)  # refused before the cluster is contacted
    job_env_vars(env_names)
    jobs = client(address, token_file)
    folder, what = package_to_ship(package)
    env, names, warnings = runtime_env(folder, what, env_names, recipe_yaml)
    command = entrypoint(argv)
    try:
        sid = jobs.submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id,
                              metadata={"sonosynth.verb": argv[0], "sonosynth.package": what})
    except (RuntimeError, _ray_error()) as err:
        raise _explain(err, resolve_address(address)) from None
    return Submission(sid, resolve_address(address), command, what, names,
                      warnings + path_warnings(argv[1:] if recipe else argv))


def exit_code(info) -> int:
    """A finished job's status as a command's exit status."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def wait_terminal(jobs, sid: str, timeout_s: float | None = None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = jobs.get_job_info(sid)
        if str(getattr(info.status, "value", info.status)) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def follow(jobs, sid: str, write: Callable[[str], Any] = sys.stdout.write, stop_on_interrupt: bool = True) -> int:
    """Stream a job's logs until it ends; returns its exit status. Ctrl-C stops the job
    (``stop_on_interrupt``) and returns 130, or only stops following."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(sid):
            write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError:  # the log stream broke off; the status says how the job ended
            pass
        return exit_code(wait_terminal(jobs, sid))
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            sys.stderr.write(f"\nstopped following job {sid}; it goes on\n")
            return 130
        sys.stderr.write(f"\nstopping job {sid} ...\n")
        jobs.stop_job(sid)
        info = wait_terminal(jobs, sid, timeout_s=60)
        sys.stderr.write(f"job {sid}: {getattr(info.status, 'value', info.status)}\n")
        return 130


def list_jobs(address: str | None = None, token_file: str | None = None) -> list[dict[str, Any]]:
    jobs = client(address, token_file)
    rows = []
    for job in jobs.list_jobs():
        rows.append({"id": job.submission_id or job.job_id, "status": str(getattr(job.status, "value", job.status)),
                     "start": job.start_time, "end": job.end_time, "entrypoint": job.entrypoint,
                     "exit_code": getattr(job, "driver_exit_code", None)})
    return sorted(rows, key=lambda r: r["start"] or 0)


# -- the job's side -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """The job's entrypoint: say which sonosynth runs, put back a shipped recipe, run the verb."""
    import sonosynth

    argv = list(sys.argv[1:] if argv is None else argv)
    origin = os.environ.get(PACKAGE_ENV, "installed")
    print(f"sonosynth {sonosynth.__version__} from {Path(sonosynth.__file__).resolve().parent} ({origin})",
          file=sys.stderr, flush=True)
    if os.environ.get(RECIPE_ENV) and len(argv) > 1:
        folder = Path(tempfile.mkdtemp(prefix="sonosynth-recipe-"))
        path = folder / Path(argv[1]).name
        path.write_text(os.environ[RECIPE_ENV])
        argv[1] = str(path)
    from sonosynth.launch.cli.app import main as cli_main
    from sonosynth.launch.cli.exits import DEBUG_ENV

    os.environ.setdefault(DEBUG_ENV, "1")  # a bug's traceback belongs in the job's log, not in the pod's /tmp
    sys.argv = ["sonosynth", *argv]
    cli_main()


if __name__ == "__main__":
    main()
