"""A job's output folder: one job per folder, its resolved config beside its outputs.

Every stage claims its output (a folder or an ``s3://`` prefix) before writing anything:
``claim_output`` refuses a folder that holds another stage's or another job's output (and
names the keys that differ), records the job's identity in ``job.json`` and writes the
resolved ``config.yaml``. Re-running the same job into the same folder is a resume.
Both files go through ``infra/secrets.redact`` first: a URI's password or the value of a
secret environment variable never lands in an output folder (docs/secrets.md).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from sonosynth.infra.config import ConfigError
from sonosynth.infra.secrets import redact, redact_obj
from sonosynth.infra.storage import Storage

JOB_RECORD = "job.json"
CONFIG_FILE = "config.yaml"


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if _norm(old.get(k)) != _norm(new.get(k)))


def claim_output(storage: Storage, *, stage: str, identity: dict[str, Any], config_yaml: str,
                 overwrite: bool | None = None, foreign_marker: str | None = None) -> bool:
    """Claim ``storage`` for one job; True when it already holds this job (a resume).

    ``identity`` holds the fields that define the job (anything else, e.g. worker counts or
    tracking, may change between a run and its resume). ``foreign_marker`` is a path whose
    presence without a job record means someone else's data is there (e.g. ``shards/``).
    With ``overwrite`` a different job's record is replaced instead of refused; a stage that
    has no such switch passes None. What is written is redacted (``infra/secrets``), and
    identities are compared redacted: a changed password is not another job.
    """
    fix = "write to another --out, or delete that folder to start over"
    if overwrite is not None:
        fix += ", or pass --set overwrite=true to replace it"
    where = storage.url("")
    resuming = False
    shown_identity = redact_obj(identity)
    if storage.exists(JOB_RECORD):
        old = json.loads(storage.get_text(JOB_RECORD))
        changed = _differences(redact_obj(old.get("identity", {})), shown_identity)
        if old.get("stage") != stage and not overwrite:
            raise ConfigError(f"{where} holds the output of `sonosynth {old.get('stage')}`, not {stage}; "
                              f"{fix}")
        if changed and not overwrite:
            was = redact_obj(old.get("identity", {}))
            shown = "; ".join(f"{k}: {was.get(k)!r} there, {shown_identity.get(k)!r} now" for k in changed[:4])
            raise ConfigError(f"{where} holds a different {stage} job ({shown}"
                              f"{' ...' if len(changed) > 4 else ''}); {fix}")
        resuming = old.get("stage") == stage and not changed
    elif foreign_marker and storage.list(foreign_marker) and not overwrite:
        raise ConfigError(f"{where} already holds data that no sonosynth {stage} job wrote; {fix}")
    storage.put_text(JOB_RECORD, json.dumps({"stage": stage, "identity": shown_identity,
                                             "fingerprint": fingerprint(identity)}, default=str, indent=1))
    storage.put_text(CONFIG_FILE, redact(config_yaml))
    return resuming


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable hash of a job identity. URI passwords are masked first: a password is not
    what a job is, and a hash of one beside the redacted config would let it be guessed."""
    return hashlib.sha256(json.dumps(redact_obj(identity, environ={}), sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def offline_dir_for(out: str) -> Path:
    """Where a job keeps tracking records MLflow could not take: beside a local output, or a
    per-output temp folder when the output is remote (object stores take no appends)."""
    if out and "://" not in out:
        return Path(out) / "tracking-offline"
    return Path(tempfile.gettempdir()) / "sonosynth-tracking" / hashlib.sha1(out.encode()).hexdigest()[:12]
