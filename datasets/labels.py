"""The plane vocabulary and the cohorts' spellings of it."""

from __future__ import annotations

PLANES = ("abdomen", "brain", "femur", "thorax", "cervix", "other")
"""Canonical plane labels, as stored in meta.json and the manifest."""

# FETAL_PLANES_DB file names carry the plane as Plane{k}.
FPDB_PLANE_CODES = {1: "other", 2: "abdomen", 3: "brain", 4: "cervix", 5: "femur", 6: "thorax"}
# African planes file names carry the plane as plane{k}.
AFRICA_PLANE_CODES = {0: "abdomen", 1: "brain", 2: "femur", 3: "thorax"}

_PREFIXES = ("fetal ", "maternal ", "a photo of fetal ")


def normalize_plane(raw: str | None) -> str | None:
    """'Fetal brain', ' brain ', 'Maternal cervix', 'Other' -> canonical label, else None."""
    if raw is None:
        return None
    text = " ".join(str(raw).strip().lower().split())
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text if text in PLANES else None
