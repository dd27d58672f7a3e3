"""What every stage returns: where its outputs are, its figures and its tracking run.

A stage is one config class and one ``run(cfg) -> Report`` (``sonosynth.launch.stages``
lists them). The CLI, ``sonosynth demo`` and the pipeline read the same report: ``text``
for people, ``figures`` and ``outputs`` for programs, ``failed`` for the exit status.
``UsageError`` (exit 2) and ``StageFailed`` (exit 1) are the errors a stage raises on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sonosynth.infra.secrets import redact_uri


class StageFailed(RuntimeError):
    """A stage ran but could not deliver; the message names what is missing and the fix (exit 1)."""


class UsageError(ValueError):
    """The request cannot be run as given (a missing input, a bad combination of fields); the
    message names the fix (exit 2). Raise it on purpose: any other exception escaping a stage is
    a bug and exits 1 with its traceback."""


class InputNotFound(FileNotFoundError):
    """An input the request names does not exist (a source folder, a model URI); the message
    names it and the fix (exit 2, like ``UsageError``; still a ``FileNotFoundError`` to callers)."""


@dataclass
class Report:
    stage: str
    """The stage's name, e.g. ``generate``."""
    out: str
    """The stage's output folder or s3:// prefix."""
    text: str = ""
    """A few lines for people: what was done, and anything to look at."""
    figures: dict[str, Any] = field(default_factory=dict)
    """The numbers (counts, rates, metrics), as in the stage's summary.json."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Named paths or URIs of what was written (dataset, grid, model, ...)."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """MLflow: uri, run_id, and registered_model/version where a model was registered."""
    failed: str | None = None
    """Why the stage did not deliver (the outputs so far are kept); None when it did."""

    def render(self) -> str:
        lines = [self.text] if self.text else []
        width = max((len(k) for k in self.outputs), default=0)
        lines += [f"{name + ':':<{width + 1}} {where}" for name, where in self.outputs.items()]
        t = self.tracking
        if t.get("run_id"):
            lines.append(f"mlflow: run {t['run_id']} at {redact_uri(t.get('uri'))}")
        if t.get("version"):
            lines.append(f"registered: {t['registered_model']} version {t['version']}")
        return "\n".join(lines)
