"""How every ``sonosynth`` verb ends: one line on stderr and an exit status.

- 2, a usage error: the request cannot run as given (unknown recipe or key, bad value, a
  missing input), with the fix in the message. These are the errors a config's resolution
  raises (``ConfigError``, pydantic's ``ValidationError``, ``CohortError``) and ``UsageError``
  or ``InputNotFound``, which a stage raises on purpose.
- 1, a failure: the stage ran and could not deliver (``StageFailed``, ``report.failed``,
  ``StorageError``).
- 1, a bug: anything else. Its traceback is printed with ``--debug`` (or
  ``$SONOSYNTH_DEBUG=1``), else written to a log file whose path is printed, so it is never lost.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import click
import typer

from sonosynth.infra.secrets import redact

DEBUG_ENV = "SONOSYNTH_DEBUG"
EXIT_CODES = """Exit status: 0 done; 1 the stage ran and could not deliver (training failed, too few
samples passed QC, nothing ingested; what was written is kept and a re-run resumes) or a bug
(the traceback is printed with --debug, else saved to a log file named in the message); 2 a
usage error (unknown recipe or key, bad value, missing input), with the fix in the message."""

CONTROL_FLOW = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)
"""What a verb raises to end itself (its exit status is already decided)."""

_debug = False


def set_debug(on: bool = True) -> None:
    global _debug
    _debug = on


def debugging() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def usage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "fix the request" (exit 2)."""
    from pydantic import ValidationError

    from sonosynth.datasets.cohorts.base import CohortError
    from sonosynth.infra.config import ConfigError
    from sonosynth.infra.stage import InputNotFound, UsageError

    return UsageError, InputNotFound, ConfigError, ValidationError, CohortError


def failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "ran and could not deliver" (exit 1, the message says why)."""
    from sonosynth.infra.stage import StageFailed
    from sonosynth.infra.storage import StorageError

    return StageFailed, StorageError


def usage_error(err: object) -> NoReturn:
    typer.echo(redact(f"error: {err}"), err=True)
    raise typer.Exit(2)


def failure(err: object) -> NoReturn:
    typer.echo(redact(f"error: {err}"), err=True)
    raise typer.Exit(1)


def crash(err: BaseException) -> NoReturn:
    """A bug: one line, and the traceback on stderr (debugging) or in a log file here."""
    text = redact("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    typer.echo(redact(f"error: {type(err).__name__}: {err}"), err=True)
    path = None if debugging() else _write_log(text)
    if path is None:
        typer.echo(text, err=True, nl=False)
    else:
        typer.echo(f"this is a bug, not a usage error; the traceback is in {path} (or run again with --debug)",
                   err=True)
    raise typer.Exit(1)


def _write_log(text: str) -> Path | None:
    """``sonosynth-error-<time>-*.log`` in the temp folder, or None when it cannot be written."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"sonosynth-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(text)
    except OSError:
        return None
    return Path(path)


@contextmanager
def exit_status(usage: tuple[type[BaseException], ...] = (),
                failed: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn what escapes the block into an exit status: usage errors (and ``usage``) 2,
    failures (and ``failed``) 1 with their message, anything else 1 as a bug."""
    try:
        yield
    except CONTROL_FLOW:
        raise
    except (*failed,) as err:
        failure(err)
    except (*usage_errors(), *usage) as err:
        usage_error(err)
    except failures() as err:
        failure(err)
    except Exception as err:  # noqa: BLE001 - a bug: reported with its traceback
        crash(err)
