"""The cluster verbs of ``sonosynth``: ``stack``, ``submit``, ``jobs`` and ``k8s``.

``register(app)`` adds them to the main CLI (``launch/cli/app.py``). Same conventions as the
stage verbs: exit 2 for a usage error (the message names the fix), 1 for a failure.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from sonosynth.launch.cli.exits import CONTROL_FLOW, exit_status, failure, usage_error
from sonosynth.launch.stages import STAGES

DEFAULT_STACK = "runs/stack"

StackDir = Annotated[str, typer.Option("--dir", help="The stack's state folder (pids, logs, env.sh).")]
JobAddress = Annotated[Optional[str], typer.Option(
    help="Ray job server (the dashboard), e.g. http://head:8265 (default: $RAY_API_SERVER_ADDRESS, "
         "else $RAY_ADDRESS).")]
TokenFile = Annotated[Optional[str], typer.Option(
    help="File holding the Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, or "
         "~/.ray/auth_token when $RAY_AUTH_MODE=token).")]


def _submit_errors():
    """(usage, failed) of the job server: a bad request exits 2, an unreachable cluster 1."""
    from sonosynth.launch.cluster.submit import SubmitError, SubmitUsageError

    return (SubmitUsageError,), (SubmitError,)


# -- stack ----------------------------------------------------------------------------------

stack_app = typer.Typer(
    name="stack", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="A local cluster stack on this machine: a Ray head (dashboard and job server, token auth), "
         "an MLflow server (SQLite backend, artifacts in S3) and an S3-compatible server (moto_server), "
         "each its own process with its pid and log in the state folder.\n\n"
         "Example:\n\n"
         "\b\n"
         "    sonosynth stack up --dir runs/stack\n"
         "    source runs/stack/env.sh\n"
         "    sonosynth submit --wait -- generate generate_tiny ...\n"
         "    sonosynth stack down --dir runs/stack")


@stack_app.command("up")
def stack_up(
    dir: StackDir = DEFAULT_STACK,
    ray_cpus: Annotated[Optional[int], typer.Option(help="CPUs of the Ray head (default: all).")] = None,
    worker_nodes: Annotated[int, typer.Option(help="Extra Ray nodes joined to the head on this machine.")] = 0,
    worker_cpus: Annotated[int, typer.Option(help="CPUs of each extra Ray node.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each server to become healthy.")] = 180.0,
) -> None:
    """Start the stack (or find it running) and wait until every server answers.

    Writes DIR/stack.json (pids, ports, URLs), DIR/logs/ (one log per server) and DIR/env.sh,
    the environment a client needs: source it, and `sonosynth submit` finds the job server
    and the token, and jobs and local verbs find MLflow and S3 (bucket sonosynth).

    Example:

    \b
        sonosynth stack up --dir runs/stack --worker-nodes 1
    """
    from sonosynth.infra.local import stack

    with exit_status(failed=(stack.StackError,)):
        state = stack.up(dir, ray_cpus=ray_cpus, worker_nodes=worker_nodes, worker_cpus=worker_cpus,
                         timeout_s=timeout)
    _print_status(stack.status(dir))
    env = Path(state["folder"]) / stack.ENV_FILE
    typer.echo(f"\nenvironment: source {env}")
    typer.echo(f"submit:      sonosynth submit --wait -- VERB ARGS...   (after sourcing {env.name})")
    typer.echo(f"stop:        sonosynth stack down --dir {dir}")


@stack_app.command("down")
def stack_down(dir: StackDir = DEFAULT_STACK) -> None:
    """Stop every process of the stack by pid and check that none is left.

    SIGTERM first, SIGKILL after a grace period; only processes that carry this stack's
    marker are touched, never another Ray or MLflow on the machine. Logs stay in DIR/logs.

    Example:

    \b
        sonosynth stack down --dir runs/stack
    """
    from sonosynth.infra.local import stack

    with exit_status(failed=(stack.StackError,)):
        lines = stack.down(dir)
    typer.echo("\n".join(lines) if lines else f"no stack in {dir}")


@stack_app.command("status")
def stack_status(dir: StackDir = DEFAULT_STACK) -> None:
    """Health-check each server of the stack; exit 1 unless all answer.

    Example:

    \b
        sonosynth stack status --dir runs/stack
    """
    from sonosynth.infra.local import stack

    rows = stack.status(dir)
    if not rows:
        failure(f"no stack in {dir}; start one with `sonosynth stack up --dir {dir}`")
    _print_status(rows)
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


def _print_status(rows: list[dict]) -> None:
    for r in rows:
        state = "healthy" if r["healthy"] else ("running, not answering" if r["alive"] else "down")
        typer.echo(f"{r['name']:<13} pid {r['pid']:<8} {state:<8} {r['url'] or '':<26} log {r['log']}")


# -- submit and jobs ------------------------------------------------------------------------

def submit(
    args: Annotated[list[str], typer.Argument(
        metavar="VERB", help="The sonosynth verb to run, then its arguments (after `--`).")],
    address: JobAddress = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Stream the job's logs until it ends and exit with its status.")] = False,
    package: Annotated[str, typer.Option(
        help="What the job runs: 'wheel' ships this sonosynth (built from the checkout, cached by "
             "content hash); 'image' uses the cluster's installed one.")] = "wheel",
    env: Annotated[Optional[list[str]], typer.Option(
        "--env", metavar="NAME",
        help="Also copy this environment variable into the job (repeatable; only names are "
             "printed). A secret (AWS_SECRET_ACCESS_KEY, a *_TOKEN or *_PASSWORD, a URI with a "
             "password) is refused: the cluster holds its own.")] = None,
    token_file: TokenFile = None,
    submission_id: Annotated[Optional[str], typer.Option(help="Job id to use (default: Ray picks one).")] = None,
) -> None:
    """Run any sonosynth verb (a stage, or the pipeline) as a Ray job on a cluster.

    The job runs the same command as here, with the installed package (never the repo as a
    working directory) and this environment's MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL,
    MLFLOW_S3_ENDPOINT_URL and AWS region, plus each --env NAME. Credentials live on the
    cluster and never travel with a job (the dashboard shows its command and environment): a
    password in MLFLOW_TRACKING_URI is stripped with a warning, and a secret --env, argument
    or recipe is refused (docs/secrets.md). A recipe given as a local YAML file travels with
    the job. With --wait the logs stream here, the command exits with the job's status, and
    Ctrl-C stops the job.

    Example:

    \b
        sonosynth submit --address http://head:8265 --wait -- \\
            train-lora lora_joint_head_cluster
    """
    from sonosynth.launch.cluster import submit as sub

    usage, failed = _submit_errors()
    with exit_status(usage, failed):
        s = sub.submit(list(args), address, package=package, env_names=env or [], token_file=token_file,
                       submission_id=submission_id)
    for w in s.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"submitted job {s.submission_id} to {s.address}", err=True)
    typer.echo(f"  runs:    {s.entrypoint}", err=True)
    typer.echo(f"  package: {s.package}", err=True)
    typer.echo(f"  env:     {', '.join(s.env_names) or '(none)'} (values not shown)", err=True)
    if not wait:
        typer.echo(s.submission_id)
        typer.echo(f"follow it with: sonosynth jobs logs {s.submission_id} --follow", err=True)
        return
    with exit_status(usage, failed):
        code = sub.follow(sub.client(address, token_file), s.submission_id)
    typer.echo(f"job {s.submission_id} ended with exit status {code}", err=True)
    raise typer.Exit(code)


jobs_app = typer.Typer(
    name="jobs", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="The jobs on a Ray cluster: list them, read or follow a job's logs, stop a job.\n\n"
         "Example:\n\n"
         "\b\n"
         "    sonosynth jobs list --address http://head:8265\n"
         "    sonosynth jobs logs raysubmit_XYZ --follow\n"
         "    sonosynth jobs stop raysubmit_XYZ")


@jobs_app.command("list")
def jobs_list(
    address: JobAddress = None,
    token_file: TokenFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON.")] = False,
) -> None:
    """List the cluster's jobs, oldest first: id, status, exit code and command.

    Example:

    \b
        sonosynth jobs list --address http://head:8265
    """
    from sonosynth.launch.cluster import submit as sub

    with exit_status(*_submit_errors()):
        rows = sub.list_jobs(address, token_file)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        code = "" if r["exit_code"] is None else str(r["exit_code"])
        typer.echo(f"{r['id']:<32} {r['status']:<10} {code:>4}  {r['entrypoint']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's submission id.")],
    follow: Annotated[bool, typer.Option(
        "--follow", help="Stream until the job ends, then exit with its status; Ctrl-C stops "
                         "following, not the job.")] = False,
    address: JobAddress = None,
    token_file: TokenFile = None,
) -> None:
    """Print a job's logs, or follow them until it ends.

    Example:

    \b
        sonosynth jobs logs raysubmit_XYZ --follow
    """
    from sonosynth.launch.cluster import submit as sub

    code = 0
    with _job_request(job_id):
        jobs = sub.client(address, token_file)
        if follow:
            code = sub.follow(jobs, job_id, stop_on_interrupt=False)
        else:
            sys.stdout.write(jobs.get_job_logs(job_id))
    raise typer.Exit(code)


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's submission id.")],
    address: JobAddress = None,
    token_file: TokenFile = None,
) -> None:
    """Stop a running job and wait (up to a minute) until it has stopped.

    Example:

    \b
        sonosynth jobs stop raysubmit_XYZ
    """
    from sonosynth.launch.cluster import submit as sub

    with _job_request(job_id):
        jobs = sub.client(address, token_file)
        jobs.stop_job(job_id)
        info = sub.wait_terminal(jobs, job_id, timeout_s=60)
    typer.echo(f"job {job_id}: {getattr(info.status, 'value', info.status)}")


@contextmanager
def _job_request(job_id: str) -> Iterator[None]:
    """A request about one job: the job server's own refusal (e.g. no such job) is a usage error."""
    usage, failed = _submit_errors()
    with exit_status(usage, failed):
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, (*failed, *CONTROL_FLOW)):
                raise
            usage_error(f"job {job_id}: {err}")


# -- k8s ------------------------------------------------------------------------------------

k8s_app = typer.Typer(
    name="k8s", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Kubernetes manifests from recipes: the RayJob (or the nightly RayCronJob) that runs a "
         "stage on the KubeRay cluster of k8s/, with the same recipe as a local run.\n\n"
         "Example:\n\n"
         "\b\n"
         "    sonosynth k8s render lora_joint_head_cluster train-lora \\\n"
         "        | kubectl create -f -")


@k8s_app.command("render")
def k8s_render(
    recipe: Annotated[str, typer.Argument(
        metavar="RECIPE", help="Recipe: a name in configs/ (shipped in the image) or a YAML path.")],
    stage: Annotated[str, typer.Argument(metavar="STAGE", help=f"The stage to run: {', '.join(STAGES)}.")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config field (repeatable); checked here, passed "
                                           "to the job.")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="metadata.name: a DNS-1035 label of at most 47 characters (36 with --schedule, 41 with "
             "--cronjob); default STAGE-RECIPE, shortened to fit.")] = None,
    namespace: Annotated[str, typer.Option(help="Namespace of the stack.")] = "sonosynth",
    cluster: Annotated[str, typer.Option(help="The RayCluster the job runs on.")] = "sonosynth",
    schedule: Annotated[Optional[str], typer.Option(
        help="Cron schedule, e.g. '0 2 * * *': render a RayCronJob instead of a RayJob (it needs KubeRay "
             ">= 1.7.0 started with --feature-gates=RayCronJob=true; else add --cronjob).")] = None,
    time_zone: Annotated[Optional[str], typer.Option(help="Time zone of --schedule, e.g. Europe/Paris.")] = None,
    cronjob: Annotated[bool, typer.Option(
        "--cronjob", help="With --schedule: a plain CronJob that creates the RayJob, for operators "
                          "without RayCronJob.")] = False,
    out: Annotated[Optional[str], typer.Option(help="Write here instead of to stdout.")] = None,
) -> None:
    """Write the RayJob that runs STAGE with RECIPE on the cluster of k8s/.

    The entrypoint is the same CLI verb as a local run (sonosynth STAGE RECIPE --set ...). The
    recipe and the overrides are resolved here first, so a bad key fails now, not on the
    cluster; a recipe file that is not shipped in the image is embedded in the job. Outputs
    and the tracking URI should be shared (s3://, the MLflow service): a warning says when
    they are not.

    Example:

    \b
        sonosynth k8s render generate_cluster generate \\
            --set num_samples=2000 | kubectl create -f -
    """
    from sonosynth.launch.cluster.k8s_render import dump, render

    if cronjob and not schedule:
        usage_error("--cronjob needs --schedule")
    with exit_status():
        docs, warnings = render(recipe, stage, set_ or [], name=name, namespace=namespace, cluster=cluster,
                                schedule=schedule, time_zone=time_zone, cronjob=cronjob)
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    text = dump(docs)
    if out:
        Path(out).write_text(text)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    """Add ``stack``, ``submit``, ``jobs`` and ``k8s`` to the sonosynth CLI."""
    app.add_typer(stack_app, name="stack")
    app.command("submit", context_settings={"allow_interspersed_args": False})(submit)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(k8s_app, name="k8s")
