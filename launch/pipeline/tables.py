"""Rows of dicts as CSV and Markdown (the pipeline's lineage, the sweep's results), and rows as HTML tables."""

from __future__ import annotations

import csv
import html
import io
from typing import Any, Sequence


def _columns(rows: list[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    return list(columns) if columns is not None else list(dict.fromkeys(c for row in rows for c in row))


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV with a header; ``columns`` (default: every key, in first-seen order) and their order."""
    if not rows and columns is None:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, _columns(rows, columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table; floats to 4 decimals, ``|`` escaped."""
    if not rows and columns is None:
        return ""
    names = _columns(rows, columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_cell(value: Any) -> str:
    """A value as escaped HTML text; floats to 4 decimals, None as nothing."""
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def html_table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table with an id (tests read report tables by it)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
