"""Keep credentials out of everything sonosynth writes or logs.

Secrets reach sonosynth through the environment (S3 keys, the Ray token, MLflow's
credentials) or inside a URI (``http://user:PASSWORD@host``, ``postgresql://u:PASSWORD@db``).
``redact`` masks both in any text before it is persisted (config files, job records, MLflow
params, tags and artifacts, logs): a URI's password becomes ``***`` and the value of every
secret-named environment variable set in this process becomes ``***<NAME>``.
``strip_uri_credentials`` removes a URI's ``user:password@`` altogether, for a URI that must
still work elsewhere without its password (what ``sonosynth submit`` hands a Ray job: the
cluster brings its own credentials). docs/secrets.md says what is redacted where.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

MASK = "***"
SECRET_ENV_NAMES = re.compile(r"(SECRET|PASSWORD|PASSWD|PASSPHRASE|TOKEN|SESSION_KEY|PRIVATE_KEY|ACCESS_KEY_ID|"
                              r"API_?KEY|CREDENTIAL)", re.IGNORECASE)
"""Environment variables whose values are secrets (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
RAY_AUTH_TOKEN, MLFLOW_TRACKING_PASSWORD/TOKEN, HF_TOKEN, WANDB_API_KEY, ...)."""
NOT_SECRET_ENV = {"AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS"}
"""Secret-sounding names whose values are paths, not secrets (besides the suffixes below)."""
_NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_DIR", "_MODE")
"""RAY_AUTH_TOKEN_PATH, AWS_WEB_IDENTITY_TOKEN_FILE, RAY_AUTH_MODE: where or how, not what."""
MIN_SECRET_LEN = 8
"""Shorter values ("1", "true", moto's "testing") are not masked: they would mask ordinary text."""
_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.-]*://"
# the userinfo runs to the last '@' before the host: a password may hold '@' and ':' (never '/', '?',
# '#', whitespace or quotes, which end it or a URI in text)
_URI_PASSWORD = re.compile(rf"(?P<head>{_SCHEME}[^/?#\s:@'\"]*):(?P<pw>[^/?#\s'\"]*)@")
_URI_USERINFO = re.compile(rf"(?P<head>{_SCHEME})[^/?#\s'\"]*@")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (by its name alone)."""
    upper = name.upper()
    return bool(SECRET_ENV_NAMES.search(upper)) and upper not in NOT_SECRET_ENV \
        and not upper.endswith(_NOT_SECRET_SUFFIXES)


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secret-named environment variables worth masking: ``{value: name}``."""
    env = os.environ if environ is None else environ
    return {v.strip(): k for k, v in _snapshot(env) if is_secret_name(k) and len(v.strip()) >= MIN_SECRET_LEN}


def _snapshot(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The variables as (name, value) pairs. Another thread (MLflow's telemetry) may set or remove one
    while this reads: ``dict(os.environ)`` then raises KeyError (a name listed, then gone) or
    RuntimeError (the mapping changed size), so names are listed first and each read with ``get``."""
    for _ in range(5):
        try:
            names = list(env)
        except RuntimeError:
            continue
        return [(k, v) for k in names if (v := env.get(k)) is not None]
    return []


def has_uri_password(text: str | None) -> bool:
    """Whether ``text`` holds a URI with a password (``scheme://user:PASSWORD@host``)."""
    return bool(text) and bool(_URI_PASSWORD.search(text))


def redact_uri(uri: str | None) -> str | None:
    """``scheme://user:PASSWORD@host/...`` -> ``scheme://user:***@host/...``; others unchanged.
    Works on any text: every URI in it is masked."""
    if not uri or not isinstance(uri, str):
        return uri
    return _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", uri)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URI passwords and the values of secret environment variables masked
    (``environ``: the variables to look at, default this process's)."""
    if not isinstance(text, str) or not text:
        return text
    out = redact_uri(text)
    for value, name in sorted(secret_values(environ).items(), key=lambda kv: -len(kv[0])):
        if value in out:
            out = out.replace(value, f"{MASK}{name}")
    return out


def redact_obj(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``redact`` applied to every string inside dicts, lists and tuples (keys included)."""
    if isinstance(obj, str):
        return redact(obj, environ)
    if isinstance(obj, dict):
        return {redact_obj(k, environ): redact_obj(v, environ) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, environ) for v in obj)
    return obj


def strip_uri_credentials(uri: str) -> tuple[str, bool]:
    """(the URI without its ``user:password@``, whether it had a password). A bare user
    (``ssh://git@host``) is kept: it is no secret, and only a password makes a URI one."""
    if not has_uri_password(uri):
        return uri, False
    return _URI_USERINFO.sub(lambda m: m["head"] if ":" in m[0][len(m["head"]):] else m[0], uri), True


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in a record's message and traceback (``redact``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Mask secrets in everything the handlers of ``logger`` (default: the root logger) write;
    call it after the handlers are set up (``logging.basicConfig``). Idempotent."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
