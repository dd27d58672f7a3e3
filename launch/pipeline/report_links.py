"""report.html's lineage table: paths relative to OUT (the report is OUT/report.html, so a relative link
is right for a local folder, a folder served over HTTP and an s3:// prefix browsed as a whole), links to
the images, plots and summaries each section wrote and to its logs (found by listing its folders through
the run's storage), each section's wall time and its MLflow run."""

from __future__ import annotations

import html
import os
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sonosynth.infra.secrets import redact_uri
from sonosynth.launch.pipeline.config import DONE
from sonosynth.launch.pipeline.report_quality import table_of_text

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.plan import Step
    from sonosynth.launch.pipeline.runner import Run

LINKED = frozenset({".png", ".jpg", ".jpeg", ".svg", ".json", ".jsonl", ".csv", ".md", ".parquet", ".yaml", ".txt",
                    ".html"})
"""What a reader opens: images, plots, tables, summaries, configs."""
NOT_LINKED = frozenset({"checkpoints", "shards", "model", "best", "_done", "_replaced", "logs", "tracking-offline"})
"""Folders of weights, data shards and bookkeeping: their files are not listed one by one."""
BOOKKEEPING = frozenset({"job.json", "tracking.json", DONE})
MAX_FILES = 30
"""Files linked per section (images first); the cell says how many more there are."""
HEADER = ["section", "stage", "status", "key", "source", "inputs", "outputs", "files", "wall time", "MLflow run",
          "model version", "gate"]


class Links:
    """One run's paths relative to its OUT, and the files each section folder holds (listed once)."""

    def __init__(self, r: Run):
        self.r = r
        roots = [r.root.rstrip("/"), r.storage.uri.rstrip("/")]
        if "://" not in r.root:
            roots.append(os.path.realpath(r.root))
        self.roots = list(dict.fromkeys(roots))
        self._listed: dict[str, set[str]] = {}

    def relative(self, uri: str) -> str | None:
        """``uri`` relative to OUT ("" for OUT itself), or None when it lies elsewhere."""
        text = str(uri).removeprefix("file://").rstrip("/")
        candidates = [text] + ([os.path.realpath(text)] if text.startswith("/") else [])
        for candidate in candidates:
            for root in self.roots:
                if candidate == root:
                    return ""
                if candidate.startswith(root + "/"):
                    return candidate[len(root) + 1:]
        return None

    def listed(self, folder: str) -> set[str]:
        """Every key under ``folder`` (relative to OUT); empty when it cannot be listed."""
        if folder not in self._listed:
            try:
                self._listed[folder] = set(self.r.storage.list(folder.rstrip("/") + "/"))
            except Exception:  # noqa: BLE001 - an unlistable folder only loses its links
                self._listed[folder] = set()
        return self._listed[folder]

    def is_file(self, rel: str) -> bool:
        parts = rel.split("/")
        if len(parts) >= 3:  # SECTION/KEY/...: one listing per section folder
            return rel in self.listed("/".join(parts[:2]))
        try:
            return bool(rel) and self.r.storage.exists(rel)
        except Exception:  # noqa: BLE001
            return False

    def files(self, step: Step) -> list[str]:
        """The section's images, plots, tables and summaries (relative to OUT), images first."""
        folder = f"{step.section}/{step.key}"
        found = []
        for key in self.listed(folder):
            path = PurePosixPath(key[len(folder) + 1:])
            if (path.suffix.lower() in LINKED and path.name not in BOOKKEEPING
                    and not NOT_LINKED.intersection(path.parts[:-1])):
                found.append(key)
        return sorted(found, key=lambda k: (not k.lower().endswith(".png"), k))

    def path(self, uri: str) -> str:
        """A path as HTML: relative to OUT, a link when it is a file; elsewhere: as given."""
        rel = self.relative(uri)
        if rel is None:
            return html.escape(redact_uri(str(uri)))
        if self.is_file(rel):
            return link(rel, rel)
        return html.escape(rel or ".")

    def value(self, value: Any) -> str:
        if isinstance(value, str):
            return self.path(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(self.value(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{html.escape(str(k))}: {self.value(v)}" for k, v in value.items()) + "}"
        return html.escape(str(value))


def link(rel: str, text: str) -> str:
    return f'<a href="{html.escape(quote(rel, safe="/"))}">{html.escape(text)}</a>'


def wall_time(r: Run, step: Step) -> str:
    """This invocation's seconds, or for a section done earlier the seconds its marker keeps (HTML)."""
    if step.section in r.seconds:
        return f"{r.seconds[step.section]:.1f} s"
    if r.status.get(step.section) != "skipped (done)":
        return ""
    try:
        done = r._done(step) or {}
    except Exception:  # noqa: BLE001 - an unreadable marker only loses the figure
        return ""
    if done.get("seconds") is None:
        return ""
    finished = f' title="finished {html.escape(str(done["finished"]))}"' if done.get("finished") else ""
    return f"<span{finished}>{float(done['seconds']):.1f} s (earlier run)</span>"


def mlflow_run(r: Run, section: str) -> str:
    """The section's MLflow run id; a link into the MLflow UI when the store is an http(s) server
    (the UI's /#/runs/ID opens the run in its experiment; a sqlite or file store: `mlflow ui`)."""
    tracking = (r.reports.get(section) or {}).get("tracking") or {}
    if not tracking.get("run_id"):
        return "offline (replayed on the next run)" if tracking.get("offline") else ""
    return run_link(str(tracking.get("uri") or r.uri), str(tracking["run_id"]))


def run_link(uri: str, run_id: str) -> str:
    """An MLflow run id as HTML: a link to the run in the UI of an http(s) store, else the id."""
    uri = redact_uri(uri).rstrip("/")
    if uri.startswith(("http://", "https://")):
        return f'<a href="{html.escape(uri)}/#/runs/{html.escape(quote(run_id))}">{html.escape(run_id)}</a>'
    return html.escape(run_id)


def lineage_table(r: Run, rows: list[dict[str, Any]], links: Links) -> str:
    """The lineage as HTML: one row per section, paths relative to OUT, files linked (the files column:
    those its outputs do not name)."""
    body = []
    for step, row in zip(r.steps, rows):
        outputs = (r.reports.get(step.section) or {}).get("outputs") or {}
        inputs = r.inputs.get(step.section) or {}
        linked = {links.relative(str(v)) for v in outputs.values() if isinstance(v, str)}
        files = [f for f in links.files(step) if f not in linked] if step.key else []
        shown = [link(f, f[len(step.section) + len(step.key) + 2:]) for f in files[:MAX_FILES]]
        if len(files) > MAX_FILES:
            shown.append(f"and {len(files) - MAX_FILES} more in {html.escape(step.section + '/' + step.key)}")
        logs = sorted(links.listed(f"{step.section}/logs"))  # what Ray, DeepSpeed and the workers printed
        shown += [link(f, f[len(step.section) + 1:]) for f in logs[:MAX_FILES]]
        body.append([html.escape(str(row[c])) for c in ("section", "stage", "status", "key", "source")] + [
            "; ".join(f"{html.escape(str(k))}={links.value(v)}" for k, v in inputs.items()),
            "; ".join(f"{html.escape(str(k))}={links.value(v)}" for k, v in outputs.items()),
            "<br>".join(shown), wall_time(r, step), mlflow_run(r, step.section),
            html.escape(str(row["model_version"])), html.escape(str(row["gate"]))])
    return table_of_text("lineage-table", HEADER, body)
