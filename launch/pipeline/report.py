"""What a pipeline leaves for people: the lineage table (CSV, Markdown) and report.html."""

from __future__ import annotations

import base64
import html
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sonosynth.infra.secrets import redact_uri
from sonosynth.launch.pipeline.report_dice import dice_section
from sonosynth.launch.pipeline.report_links import Links, lineage_table, run_link
from sonosynth.launch.pipeline.report_quality import quality_section, read_bytes
from sonosynth.launch.pipeline.report_scale import scale_block
from sonosynth.launch.pipeline.tables import html_cell, html_table
from sonosynth.launch.pipeline.tables import to_csv as table_csv
from sonosynth.launch.pipeline.tables import to_markdown as table_markdown

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.gate import Gate
    from sonosynth.launch.pipeline.plan import Step
    from sonosynth.launch.pipeline.runner import Run


class RunReport:
    """The report half of ``Run`` (``runner.py``)."""

    steps: list[Step]
    gate_results: dict[str, Gate]

    def lineage(self) -> list[dict[str, Any]]:
        rows = []
        for step in self.steps:
            rep = self.reports.get(step.section) or {}
            tr = rep.get("tracking") or {}
            model = f"{tr['registered_model']} v{tr['version']}" if tr.get("registered_model") and tr.get("version") \
                else ""
            rows.append({
                "section": step.section, "stage": step.stage,
                "status": self.status.get(step.section, "not run"), "key": step.key,
                "inputs": "; ".join(f"{k}={v}" for k, v in (self.inputs.get(step.section) or {}).items()),
                "outputs": "; ".join(f"{k}={v}" for k, v in (rep.get("outputs") or {}).items()),
                "source": f"{step.source['digest']} ({step.source['files']} files)" if step.source else "",
                "mlflow_run": tr.get("run_id") or "", "model_version": model,
                "seconds": f"{self.seconds[step.section]:.1f}" if step.section in self.seconds else "",
                "gate": self._gate_cell(step),
            })
        return rows

    def _gate_cell(self, step: Step) -> str:
        """The lineage's gate column: a quality section's decision, or what a failed gate did here."""
        if step.section in self.gate_results:
            return self.gate_results[step.section].headline()
        if step.gated_by:
            return f"gated by {step.gated_by}"
        if step.without:
            return f"without data.sources.{', '.join(step.without)} (gate {step.without_by} failed)"
        return ""

    def gate_summary(self) -> dict[str, dict[str, Any]]:
        """Each gate read: passed, on_fail, the decision, and the sections it gated or trained without."""
        return {name: {"scored": g.scored, "passed": g.passed, "on_fail": g.on_fail, "decision": g.decision,
                       "gated": [s.section for s in self.steps if s.gated_by == name],
                       "without": {s.section: s.without for s in self.steps if s.without_by == name}}
                for name, g in self.gate_results.items()}

    def promotion(self) -> dict[str, Any] | None:
        name = self.cfg.report.promote or next((s.section for s in self.steps if s.stage == "promote"), None)
        rep = self.reports.get(name) if name else None
        return (rep or {}).get("figures") or None

    def summary(self, rows: list[dict[str, Any]], status: str) -> dict[str, Any]:
        return {"name": self.cfg.name, "out": self.root, "status": status, "failed": self.failure,
                "pipeline_key": self.pkey, "tracking": {"uri": redact_uri(self.uri), "experiment": self.experiment,
                                                        "run_id": self.parent.run_id if self.parent else None},
                "stages": rows, "promotion": self.promotion(), "gates": self.gate_summary(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def ui_command(self) -> str:
        uri = redact_uri(self.uri)
        if uri.startswith("sqlite:///"):
            exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
            try:
                exe = str(Path(exe).relative_to(Path.cwd()))
            except ValueError:
                pass
            return f"{exe} ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
        if uri.startswith("http"):
            run_id = self.parent.run_id if self.parent else None
            return f"open {uri.rstrip('/')}" + (f"/#/runs/{run_id}" if run_id else "")
        return f"mlflow ui --backend-store-uri {uri}"



COLUMNS = ("section", "stage", "status", "key", "source", "inputs", "outputs", "mlflow_run", "model_version",
           "seconds", "gate")


def to_csv(rows: list[dict[str, Any]]) -> str:
    return table_csv(rows, COLUMNS)


def to_markdown(rows: list[dict[str, Any]], brief: bool = False) -> str:
    return table_markdown(rows, ("section", "stage", "status", "key", "model_version") if brief else COLUMNS)




def _grid_sections(r: Run) -> list[str]:
    wanted = r.cfg.report.grid
    if wanted:
        return [wanted] if isinstance(wanted, str) else list(wanted)
    return [s.section for s in r.steps if s.stage == "generate"]


def _grid_section(r: Run, links: Links) -> str:
    """Each synthetic pair grid (every generate section's, unless report.grid names them), inlined."""
    parts = []
    for i, name in enumerate(_grid_sections(r)):
        rep = r.reports.get(name)
        grid = (rep or {}).get("outputs", {}).get("grid")
        data = read_bytes(grid) if grid else None
        if not data:
            continue
        figures = rep.get("figures") or {}
        note = (f"{figures.get('accepted', figures.get('num_samples', ''))} samples from section {name}; "
                f"acceptance {html_cell(figures.get('acceptance_rate'))}") if figures else f"section {name}"
        element = "synthetic-grid" if i == 0 else f"synthetic-grid-{name}"
        parts.append(f'<img id="{element}" alt="synthetic image+mask pairs of {html.escape(name)}" '
                     f'src="data:image/png;base64,{base64.b64encode(data).decode()}"><p>{html.escape(note)} '
                     f'({links.path(grid)})</p>')
    return "\n".join(parts) or "<p>No synthetic pair grid: no generate section has finished.</p>"


def _promotion_lineage(d: dict[str, Any], links: Links) -> str:
    """What the promotion did to the LoRA (and synthetic set) the promoted model was trained from."""
    change = d.get("lineage") or {}
    traced = change.get("lineage") or {}
    if not d.get("promoted"):
        text = html.escape(f"No LoRA champion moved: version {d.get('version')} was not promoted "
                           f"({d.get('decision')}), so the LoRA champion stays the one behind the current champion.")
    elif not change:
        text = "The lineage was not followed (the promote section's lineage is off): no LoRA champion moved."
    else:
        sources = ", ".join(f"{html.escape(str(k))}={links.path(str(v))}"
                            for k, v in (traced.get("sources") or {}).items()) or "unknown sources"
        sets = []
        for s in traced.get("synthetic") or []:
            lora = f"{s['lora_model']} version {s['lora_version']}" if s.get("lora_model") else s.get("lora")
            sets.append(f"{links.path(str(s.get('dataset')))} drawn with {html.escape(str(lora or 'no LoRA'))}")
        text = (f"{html.escape(str(d.get('model')))} version {html.escape(str(d.get('version')))} was trained on "
                f"{sources}{'; its synthetic data: ' + '; '.join(sets) if sets else ''}."
                f"{' ' + html.escape(str(change['text'])) + '.' if change.get('text') else ''}")
        moved = change.get("lora") or {}
        if moved.get("champion_after"):
            text += (f" <code>generate --lora models:/{html.escape(str(moved.get('model')))}@champion</code> now "
                     f"draws with the LoRA behind the champion.")
    return f'<p id="promotion-lineage">{text}</p>'


def _promotion_section(r: Run, links: Links) -> str:
    d = r.promotion()
    if not d:
        return "<p>No promotion: the recipe has no promote section, or it has not finished.</p>"
    if d.get("deferred"):
        return f'<p id="promotion-decision">deferred: {html.escape(str(d.get("reason")))}</p>'
    lines = [f'<p id="promotion-decision"><b>{html.escape(str(d.get("decision")))}</b>: '
             f'{html.escape(str(d.get("model")))} version {html.escape(str(d.get("version")))}; champion is now '
             f'version {html.escape(str(d.get("champion_after")))}.</p>',
             f"<p>{html.escape(str(d.get('reason', '')))}</p>"]
    ch, cp = d.get("challenger") or {}, d.get("champion") or {}
    rows = []
    checks = {c["check"]: c for c in d.get("checks") or []}
    for name, value in (ch.get("overall") or {}).items():
        c = checks.get(name, {})
        rows.append([name, value, (cp.get("overall") or {}).get(name), c.get("rule", ""),
                     "" if not c else "yes" if c.get("ok") else "NO"])
    for cohort, values in (ch.get("by_cohort") or {}).items():
        for name, value in values.items():
            c = checks.get(f"{name}/{cohort}", {})
            rows.append([f"{name} ({cohort})", value, ((cp.get("by_cohort") or {}).get(cohort) or {}).get(name),
                         c.get("rule", ""), "" if not c else "yes" if c.get("ok") else "NO"])
    header = ["figure", f"challenger (v{d.get('version')})",
              f"champion (v{d.get('champion_before')})" if d.get("champion_before") else "champion (none)",
              "rule", "passes"]
    lines.append(html_table("promotion-table", header, rows))
    lines.append(_promotion_lineage(d, links))
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td{word-break:break-all}img{max-width:100%}
.FAILED{color:#b00}.FINISHED{color:#070}pre{background:#f6f6f6;padding:.6em}"""


def render_html(r: Run, rows: list[dict[str, Any]], status: str) -> str:
    """report.html: self-contained (every image inlined), plain HTML, no scripts; its links are relative
    to OUT, where it is written."""
    title = html.escape(f"sonosynth pipeline {r.cfg.name or ''}")
    links = Links(r)
    parent = run_link(r.uri, r.parent.run_id) if r.parent and r.parent.run_id else "none"
    failure = f'<p class="FAILED">{html.escape(r.failure)}</p>' if r.failure else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1>
<p>Status: <b class="{status}" id="status">{status}</b>; output {html.escape(r.root)};
MLflow run {parent} at {html.escape(redact_uri(r.uri))};
written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>
{failure}
<h2 id="scale-heading">What ran, and what its figures can say</h2>
{scale_block(r)}
<h2 id="synthetic">Synthetic image+mask pairs</h2>
{_grid_section(r, links)}
<h2 id="quality">Synthetic data quality</h2>
<p>Each figure of the synthetic set against real data beside the same figure of real data against
held-out real data (the baseline at the same size), with bootstrap 95% intervals; the gate's decision
and what the pipeline did about it.</p>
{quality_section(r, links)}
<h2 id="dice">Dice before and after synthetic data</h2>
{dice_section(r)}
<h2 id="promotion">Promotion</h2>
{_promotion_section(r, links)}
<h2 id="lineage">Lineage</h2>
<p>One row per section: its key (a hash of its config, of its inputs' keys and, for an ingest,
of its source listing: the source column), what it read and wrote (paths relative to this report's
folder; files are links), the images, plots and summaries it wrote, its wall time, its MLflow run
(open the store with the command under "Open in MLflow") and the model version it registered.</p>
{lineage_table(r, rows, links)}
<h2 id="open">Open in MLflow</h2>
<pre>{html.escape(r.ui_command())}</pre>
</body></html>
"""
