"""Connecting to Ray: an existing cluster (``address`` or ``$RAY_ADDRESS``) or a local one."""

from __future__ import annotations

import logging
import os

from sonosynth.infra.config import Config

log = logging.getLogger(__name__)


class RayConfig(Config):
    """Which Ray cluster runs the job."""

    address: str | None = None
    """Cluster to join: 'auto' (this node's cluster), host:6379, or ray://host:10001. Null uses
    $RAY_ADDRESS when set, else starts a local Ray on this machine for the job."""
    num_cpus: int | None = None
    """CPUs of a local Ray (null: all of this machine's). Ignored when joining a cluster."""
    num_gpus: int | None = None
    """GPUs of a local Ray (null: all visible). Ignored when joining a cluster."""


QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
"""Library chatter that says nothing to a sonosynth user (e.g. torchvision fallbacks)."""
WORKER_ENV = {**QUIET_ENV, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
"""Every Ray worker's environment: quiet libraries, and Ray Train workers stay in the job's
folder (a relative --out or dataset path means the same thing on the driver and the workers)."""


def quiet_workers() -> None:
    """Ray worker setup hook: without the dashboard, Ray Train's placement-group cleaner
    warns every few seconds that the state API is unavailable; it is harmless here."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)


def connect(cfg: RayConfig, env_vars: dict[str, str] | None = None) -> str:
    """Join or start Ray once per process; returns a short description for the log."""
    import ray

    from sonosynth.infra import console

    if ray.is_initialized():
        return "the Ray this process already joined"
    console.route_ray_output()
    console.tame_libraries()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # log_to_driver: the workers' output comes here, and console.route_ray_output files it
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                  runtime_env={"env_vars": {**WORKER_ENV, **(env_vars or {})},
                               "worker_process_setup_hook": "sonosynth.infra.cluster.quiet_workers"})
    if address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **kwargs)
    return "a local Ray"


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
