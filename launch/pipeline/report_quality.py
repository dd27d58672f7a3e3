"""report.html's "Synthetic data quality" block: per quality section, its figures beside the real-vs-real
baseline with their intervals, its gate's decision and what the pipeline did about it, and its t-SNE
and worst label-fidelity images (inlined, like the synthetic pair grid)."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING, Any

from sonosynth.infra.storage import open_storage
from sonosynth.launch.pipeline.tables import html_cell, html_table

if TYPE_CHECKING:
    from sonosynth.launch.pipeline.report_links import Links
    from sonosynth.launch.pipeline.runner import Run

FIGURES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("FID", "fid", ("fid_ci",), ("fid_real_vs_real",), ("fid_real_vs_real_ci",)),
    ("KID (mean ± std over subsets)", "kid_mean", ("kid_ci",), ("kid_real_vs_real_mean",),
     ("kid_real_vs_real_ci",)),
    *((name, name, (f"{name}_ci",), (f"{name}_real_vs_real",), (f"{name}_real_vs_real_ci",))
      for name in ("precision", "recall", "density", "coverage")),
    ("label fidelity Dice (baseline: real pairs)", "label_fidelity_dice_mean", ("label_fidelity_dice_ci",),
     ("label_fidelity_dice_mean_real",),
     ("label_fidelity_dice_real_ci",)),
)
"""(label, value, interval candidates, real-vs-real baseline candidates, baseline interval candidates)."""
HEADER = ["figure", "synthetic vs real", "95% interval", "real vs real (baseline)", "baseline 95% interval"]


def read_bytes(uri: str) -> bytes | None:
    folder, _, name = uri.rstrip("/").rpartition("/")
    try:
        return open_storage(folder or ".").get_bytes(name)
    except Exception:  # noqa: BLE001 - a missing image leaves a note in the report
        return None


def embedded_png(uri: str | None, element_id: str, alt: str, links: Links | None = None) -> str:
    """An <img> with the PNG inlined (the report is one self-contained file), or a note why not;
    the caption links the file (relative to OUT) when ``links`` is given."""
    data = read_bytes(uri) if uri else None
    if not data:
        return f"<p>No {html.escape(alt)}{': ' + html.escape(uri) + ' is missing' if uri else ''}.</p>"
    where = links.path(uri) if links is not None else html.escape(uri)
    return (f'<figure><img id="{element_id}" alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(alt)} ({where})'
            f'</figcaption></figure>')


def _pick(figures: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((figures[n] for n in names if figures.get(n) is not None), None)


def _interval(value: Any) -> str:
    if isinstance(value, dict):
        value = [value.get("low", value.get("lo")), value.get("high", value.get("hi"))]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{html_cell(value[0])}, {html_cell(value[1])}]"
    return html_cell(value)


def _value(figures: dict[str, Any], key: str, spread: str | None = None) -> str:
    value = figures.get(key)
    if value is None:
        return "not measured"
    return html_cell(value) + (f" ± {html_cell(figures[spread])}" if spread and figures.get(spread) is not None
                               else "")


def figure_rows(figures: dict[str, Any]) -> list[list[str]]:
    """The figures table's rows, each cell escaped HTML."""
    rows = []
    for label, key, ci, baseline, baseline_ci in FIGURES:
        kid = key == "kid_mean"
        base_key = next((n for n in baseline if figures.get(n) is not None), None)
        rows.append([label, _value(figures, key, "kid_std" if kid else None), _interval(_pick(figures, ci)),
                     "" if base_key is None else _value(figures, base_key, "kid_real_vs_real_std" if kid else None),
                     _interval(_pick(figures, baseline_ci))])
    rows.append(["FID ratio (FID / real-vs-real FID)", _value(figures, "fid_ratio"), "", "1 (by definition)", ""])
    rows.append(["shape distance (mask shape statistics vs real)", _value(figures, "shape_distance"), "", "", ""])
    return rows


def table_of_text(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    """Like html_table, for cells already escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def gate_effect(r: Run, section: str) -> str:
    """What the pipeline did after a failed gate: the sections it gated, those it trained without."""
    gated = [s.section for s in r.steps if s.gated_by == section]
    without = [f"{s.section} (without data.sources.{', '.join(s.without)})" for s in r.steps
               if s.without_by == section]
    parts = ([f"not run (gated): {', '.join(gated)}"] if gated else []) + \
        ([f"trained without the synthetic source: {', '.join(without)}"] if without else [])
    return "; ".join(parts)


def _one(r: Run, section: str, links: Links | None) -> str:
    rep = r.reports[section]
    figures = rep.get("figures") or {}
    step = r.by_name[section]
    lines = [f'<h3 id="quality-{section}">{html.escape(section)}: {html.escape(step.scores or "a synthetic set")}'
             f' against real data</h3>']
    gate = r.gate_results.get(section)
    if gate is not None:
        effect = gate_effect(r, section)
        lines.append(f'<p id="gate-{section}" class="{"FINISHED" if gate.passed else "FAILED"}"><b>'
                     f'{"gate passed" if gate.passed else "gate failed"}</b>: {html.escape(gate.decision)}'
                     f'{" (on_fail: " + gate.on_fail + ")" if not gate.passed else ""}'
                     f'{"; " + html.escape(effect) if effect else ""}</p>')
        checks = (figures.get("gate") or {}).get("checks") or []
        if checks:
            lines.append(html_table(f"gate-checks-{section}", ["check", "value", "limit", "passes"],
                                    [[c.get("name"), c.get("value"), c.get("limit"),
                                      "yes" if c.get("passed") else "NO"] for c in checks]))
    counts = ", ".join(f"{k.removeprefix('n_')} {figures[k]}" for k in ("n_real", "n_synthetic", "n_compared")
                       if figures.get(k) is not None)
    if counts:
        lines.append(f"<p>Images: {html.escape(counts)}.</p>")
    lines.append(table_of_text(f"quality-table-{section}", HEADER, figure_rows(figures)))
    warnings = figures.get("warnings") or figures.get("warning")
    for warning in [warnings] if isinstance(warnings, str) else warnings or []:
        lines.append(f'<p class="FAILED">{html.escape(str(warning))}</p>')
    outputs, out = rep.get("outputs") or {}, (rep.get("out") or "").rstrip("/")
    lines.append(embedded_png(outputs.get("tsne") or (out and f"{out}/features_tsne.png"), f"tsne-{section}",
                              "t-SNE of real and synthetic features", links))
    lines.append(embedded_png(outputs.get("worst") or (out and f"{out}/worst_fidelity.png"), f"worst-{section}",
                              "the worst label-fidelity pairs", links))
    return "\n".join(lines)


def is_quality(r: Run, section: str) -> bool:
    figures = (r.reports.get(section) or {}).get("figures") or {}
    return r.by_name[section].stage == "quality" or isinstance(figures.get("gate"), dict)


SIDE_BY_SIDE = (("FID ratio (FID / real-vs-real FID)", "fid_ratio", None), ("FID", "fid", "fid_ci"),
                ("KID mean", "kid_mean", "kid_ci"), ("precision", "precision", "precision_ci"),
                ("recall", "recall", "recall_ci"), ("density", "density", "density_ci"),
                ("coverage", "coverage", "coverage_ci"),
                ("label fidelity Dice", "label_fidelity_dice_mean", "label_fidelity_dice_ci"),
                ("shape distance", "shape_distance", None))


def side_by_side(r: Run, sections: list[str]) -> str:
    """The synthetic sets of several quality sections in one table (one column each, value and
    interval), with the real pairs' label fidelity as the reference: how the generation modes compare."""
    figures = {s: (r.reports[s].get("figures") or {}) for s in sections}
    header = ["figure"] + [f"{s}: {r.by_name[s].scores or 'synthetic'}" for s in sections]
    rows = []
    for label, key, ci in SIDE_BY_SIDE:
        cells = []
        for s in sections:
            cell = _value(figures[s], key)
            if ci and figures[s].get(ci) is not None:
                cell += " " + _interval(figures[s][ci])
            cells.append(cell)
        rows.append([html.escape(label)] + cells)
    rows.append(["label fidelity Dice of the real pairs (reference)"]
                + [_value(figures[s], "label_fidelity_dice_mean_real") for s in sections])
    return ("<p>The synthetic sets side by side (each against the same real images; lower FID ratio, KID and "
            "shape distance and higher precision, recall, coverage and label fidelity are better):</p>"
            + table_of_text("quality-side-by-side", header, rows))


def quality_section(r: Run, links: Links | None = None) -> str:
    """One block per quality section of the recipe (a note for those that did not run), after a
    side-by-side table when several sections scored a synthetic set; ``links``: image captions link
    their files."""
    done = [s.section for s in r.steps if s.section in r.reports and is_quality(r, s.section)]
    blocks = [side_by_side(r, done)] if len(done) > 1 else []
    for step in r.steps:
        if step.section in r.reports and is_quality(r, step.section):
            blocks.append(_one(r, step.section, links))
        elif step.stage == "quality":
            blocks.append(f'<p id="quality-{step.section}">{html.escape(step.section)}: '
                          f'{html.escape(r.status.get(step.section, "not run"))}.</p>')
    return "\n".join(blocks) or "<p>No quality section: the recipe scores no synthetic set (stage: quality).</p>"
