"""Plane classification metrics (scikit-learn), the confusion-matrix plot, per-centre results,
and FU-LoRA's hard-label AUC, kept only to compare with the paper.

``classification_metrics(y_true, probs, classes)`` scores softmax probabilities ``[N, K]`` (K =
the job's label map, the model's output order) against true class indices (or names):

- accuracy over the whole test set (FU-LoRA averaged running per-batch accuracies instead);
- precision, recall and F1, macro and weighted (``zero_division=0``). Macro averages over the
  classes **present in the test set**: a class the model knows but the test set lacks (the
  African set has no "other") has no recall and would only add a constant 0. Predicting it
  still counts, as a miss of the true class. Per-class figures cover every class (support 0
  for absent ones);
- one-vs-rest ROC AUC from the probabilities, per class present in the test set, macro-averaged
  over those (absent classes excluded: a class without positives has no AUC; None when fewer
  than 2 classes are present);
- the confusion matrix over all K classes (rows true, columns predicted), and its plot;
- the same figures per group (``groups``: one centre per sample, see ``centre_of``).

``paper_compatible=True`` adds ``auc_paper_hard_label``: FU-LoRA's AUC as PAPERS.md records it,
one-hot argmax predictions instead of probabilities, with an "other" prediction counted as a
positive for every class. It is wrong twice over: a hard label gives the ROC curve one point, so
each class's AUC is (1 + TPR - FPR) / 2, a balanced accuracy of the argmax decision, not a
ranking measure (a model whose probabilities rank every sample right still scores below 1 if an
argmax is wrong); and counting "other" as every class turns each "other" prediction, always a
mistake on the African test set, into a hit for the sample's true class, raising TPR.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

OTHER = "other"
CENTRE_NAMES = {"DZA": "Algeria", "EGY": "Egypt", "GHA": "Ghana", "MWI": "Malawi", "UGA": "Uganda"}
_AFRICA_PATIENT = re.compile(r"^africa-([A-Za-z]{3})-")


def centre_of(row: dict[str, Any]) -> str | None:
    """A sample's centre from its meta.json (the African adapter's ``country``, or ``centre``)
    or, in a manifest row (which has no such column), from ``patient_id`` ``africa-EGY-002``."""
    for key in ("country", "centre", "center"):
        if row.get(key):
            return str(row[key])
    m = _AFRICA_PATIENT.match(str(row.get("patient_id") or ""))
    return m.group(1).upper() if m else None


@dataclass
class ClassificationResult:
    classes: list[str]
    """The label map: column order of the probabilities and of the confusion matrix."""
    n: int
    figures: dict[str, float | None]
    """accuracy, {precision,recall,f1}_{macro,weighted}, auc_ovr_macro (+ auc_paper_hard_label)."""
    per_class: dict[str, dict[str, float | int | None]]
    """class -> precision, recall, f1, support, auc (None when absent from the test set)."""
    confusion: np.ndarray
    """[K, K] counts, rows true class, columns predicted class."""
    present: list[str]
    """Classes in the test set: what the macro figures and the AUC average over."""
    per_group: dict[str, "ClassificationResult"] = field(default_factory=dict)
    """Group (centre) -> the same figures on its samples only."""

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` for MLflow (None left out): figures, ``class/<c>/<figure>``,
        ``centre/<g>/<figure>``."""
        out = {f"{prefix}{k}": float(v) for k, v in self.figures.items() if v is not None}
        out[f"{prefix}n"] = float(self.n)
        for c, figs in self.per_class.items():
            out.update({f"{prefix}class/{c}/{k}": float(v) for k, v in figs.items() if v is not None})
        for g, res in self.per_group.items():
            out.update({f"{prefix}centre/{g}/{k}": float(v) for k, v in res.figures.items() if v is not None})
            out[f"{prefix}centre/{g}/n"] = float(res.n)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "n": self.n, "present": self.present, "figures": self.figures,
                "per_class": self.per_class, "confusion": self.confusion.tolist(),
                "per_group": {g: r.to_dict() for g, r in self.per_group.items()}}


def _indices(y_true: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    if len(y_true) and isinstance(y_true[0], str):
        lookup = {c: i for i, c in enumerate(classes)}
        bad = sorted({y for y in y_true if y not in lookup})
        if bad:
            raise ValueError(f"true labels {bad} are not among the classes {list(classes)}")
        return np.array([lookup[y] for y in y_true], dtype=np.int64)
    y = np.asarray(y_true, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"true class indices must be in 0..{len(classes) - 1} (the classes {list(classes)})")
    return y


def ovr_auc(y: np.ndarray, scores: np.ndarray, present: Sequence[int]) -> tuple[float | None, dict[int, float]]:
    """One-vs-rest ROC AUC of each class in ``present`` from ``scores[:, c]``, and their mean
    (None with fewer than 2 classes present: no negatives)."""
    if len(present) < 2:
        return None, {}
    per = {c: float(roc_auc_score(y == c, scores[:, c])) for c in present}
    return float(np.mean(list(per.values()))), per


def paper_hard_label_scores(y_pred: np.ndarray, classes: Sequence[str], other: str = OTHER) -> np.ndarray:
    """FU-LoRA's AUC inputs: one-hot argmax predictions, with a prediction of ``other`` set to 1
    in every class's column. Do not report these as AUC (see the module docstring)."""
    scores = np.eye(len(classes))[y_pred]
    if other in classes:
        scores[y_pred == list(classes).index(other)] = 1.0
    return scores


def classification_metrics(y_true: Sequence[Any], probs: Any, classes: Sequence[str], *,
                           groups: Sequence[str | None] | None = None, paper_compatible: bool = False,
                           other_label: str = OTHER) -> ClassificationResult:
    """Score softmax ``probs`` [N, K] against ``y_true`` (indices into ``classes`` or names).
    ``groups``: one group (centre) per sample for a per-group breakdown (None -> 'unknown')."""
    classes = list(classes)
    p = np.asarray(probs, dtype=np.float64)
    y = _indices(list(y_true), classes)
    if p.ndim != 2 or p.shape != (len(y), len(classes)):
        raise ValueError(f"probs must be [N, K] = [{len(y)}, {len(classes)}] (samples x classes {classes}), "
                         f"got {list(p.shape)}")
    if not len(y):
        raise ValueError("no samples to score")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3) or p.min() < 0:
        raise ValueError("probs rows must be probabilities summing to 1: pass softmax(logits), not logits")
    pred = p.argmax(axis=1)
    k = range(len(classes))
    present = sorted(set(y.tolist()))
    figures: dict[str, float | None] = {"accuracy": float(accuracy_score(y, pred))}
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, pred, labels=present, average=avg, zero_division=0)
        figures.update({f"precision_{avg}": float(pr), f"recall_{avg}": float(rc), f"f1_{avg}": float(f1)})
    figures["auc_ovr_macro"], auc = ovr_auc(y, p, present)
    if paper_compatible:
        figures["auc_paper_hard_label"], _ = ovr_auc(y, paper_hard_label_scores(pred, classes, other_label), present)
    pr, rc, f1, sup = precision_recall_fscore_support(y, pred, labels=list(k), average=None, zero_division=0)
    per_class = {c: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]), "support": int(sup[i]),
                     "auc": auc.get(i)} for i, c in enumerate(classes)}
    result = ClassificationResult(classes, len(y), figures, per_class, confusion_matrix(y, pred, labels=list(k)),
                                  [classes[i] for i in present])
    if groups is not None:
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} samples")
        names = np.array([g if g is not None else "unknown" for g in groups], dtype=object)
        for g in sorted(set(names.tolist())):
            sel = names == g
            result.per_group[g] = classification_metrics(y[sel], p[sel], classes, paper_compatible=paper_compatible,
                                                         other_label=other_label)
    return result


def confusion_figure(result: ClassificationResult, normalize: bool = True, title: str | None = None):
    """A matplotlib Figure (Agg canvas, no pyplot) of the confusion matrix: cells coloured by the
    share of the true class (``normalize``) or by count, each annotated with its count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = result.confusion
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalize else cm
    n = len(result.classes)
    fig = Figure(figsize=(1.2 * n + 2, 1.1 * n + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(cm.max()), 1))
    fig.colorbar(im, ax=ax, label="share of the true class" if normalize else "samples")
    ax.set_xticks(range(n), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    half = shown.max() / 2 if shown.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if shown[i, j] > half else "black")
    acc = result.figures["accuracy"]
    ax.set_title(title or f"n={result.n}, accuracy {acc:.1%}")
    fig.tight_layout()
    return fig


def confusion_png(result: ClassificationResult, normalize: bool = True, title: str | None = None) -> bytes:
    """The confusion-matrix plot as PNG bytes (for MLflow and the report folder)."""
    buf = io.BytesIO()
    confusion_figure(result, normalize, title).savefig(buf, format="png", dpi=100)
    return buf.getvalue()
