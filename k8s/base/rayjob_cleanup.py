"""Delete the finished RayJobs of this namespace once they are old enough.

KubeRay never cleans up a RayJob that ran on an existing RayCluster (clusterSelector): in the
terminal states its controller returns before any deletion logic, so deletionStrategy,
shutdownAfterJobFinishes and ttlSecondsAfterFinished do nothing in that mode (KubeRay 1.7.0,
ray-operator/controllers/ray/rayjob_controller.go, Reconcile). The CronJob of
rayjob-cleanup.yaml runs this every day with a service account that may list and delete
RayJobs in its namespace, nothing else.

A RayJob whose Ray job succeeded goes KEEP_SUCCEEDED_DAYS (default 7) after it ended; a failed
one, or one the operator refused (ValidationFailed), after KEEP_FAILED_DAYS (default 30), to
leave time to read why. RayJobs still running, suspended or retrying are never touched. Only
the standard library: it runs with the image's Python and the pod's service-account token.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
FINISHED = ("Complete", "Failed", "ValidationFailed")
"""The RayJob's status.jobDeploymentStatus values it never leaves."""


def ended(job: dict[str, Any]) -> datetime:
    """status.endTime, or the creation time for a job refused before it ran."""
    stamp = (job.get("status") or {}).get("endTime") or job["metadata"]["creationTimestamp"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def due(job: dict[str, Any], now: datetime, keep_succeeded: timedelta, keep_failed: timedelta) -> bool:
    status = job.get("status") or {}
    if status.get("jobDeploymentStatus") not in FINISHED or job["metadata"].get("deletionTimestamp"):
        return False
    keep = keep_succeeded if status.get("jobStatus") == "SUCCEEDED" else keep_failed
    return now - ended(job) >= keep


class Api:
    """The few Kubernetes API calls this needs, with the pod's service account."""

    def __init__(self, host: str, token: str, context: ssl.SSLContext):
        self.host, self.token, self.context = host, token, context

    @classmethod
    def in_cluster(cls) -> "Api":
        address = os.environ["KUBERNETES_SERVICE_HOST"]
        address = f"[{address}]" if ":" in address else address  # IPv6
        host = f"https://{address}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        with open(f"{ACCOUNT}/token") as f:
            token = f.read().strip()
        return cls(host, token, ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt"))

    def call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.host + path, method=method,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
            return json.load(response)


def rayjobs(api: Any, namespace: str) -> list[dict[str, Any]]:
    path, items, token = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs", [], ""
    while True:
        page = api.call("GET", path + "?limit=200" + (f"&continue={urllib.parse.quote(token)}" if token else ""))
        items += page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


def main(api: Any = None, namespace: str | None = None, now: datetime | None = None) -> int:
    api = api or Api.in_cluster()
    if namespace is None:
        with open(f"{ACCOUNT}/namespace") as f:
            namespace = f.read().strip()
    now = now or datetime.now(timezone.utc)
    keep_succeeded = timedelta(days=float(os.environ.get("KEEP_SUCCEEDED_DAYS", "7")))
    keep_failed = timedelta(days=float(os.environ.get("KEEP_FAILED_DAYS", "30")))
    jobs = rayjobs(api, namespace)
    deleted = 0
    for job in jobs:
        if due(job, now, keep_succeeded, keep_failed):
            name, status = job["metadata"]["name"], job.get("status") or {}
            api.call("DELETE", f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{urllib.parse.quote(name)}")
            print(f"deleted RayJob {name}: {status.get('jobDeploymentStatus')} {status.get('jobStatus', '')}, "
                  f"ended {ended(job).isoformat()}")
            deleted += 1
    print(f"{deleted} of {len(jobs)} RayJobs in {namespace} deleted (succeeded after {keep_succeeded.days} days, "
          f"others after {keep_failed.days})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
