"""Classification metrics on crafted predictions (hand-computed values), a test set missing a
class, FU-LoRA's hard-label AUC, and the per-centre breakdown on the real African sample."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from sonosynth.trainers.evaluation.classification import (
    CENTRE_NAMES, centre_of, classification_metrics, confusion_figure, confusion_png, paper_hard_label_scores,
)

ABC = ["a", "b", "c"]
FIVE = ["abdomen", "brain", "femur", "other", "thorax"]
Y6 = [0, 0, 1, 1, 2, 2]
P6 = [[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]


def test_hand_computed_figures():
    r = classification_metrics(Y6, P6, ABC)  # predictions a b b b c a
    f = r.figures
    assert f["accuracy"] == pytest.approx(4 / 6)
    # a: P 1/2 R 1/2; b: P 2/3 R 1; c: P 1 R 1/2
    assert f["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert f["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert f["f1_macro"] == pytest.approx((1 / 2 + 0.8 + 2 / 3) / 3)
    assert f["f1_weighted"] == pytest.approx(f["f1_macro"])  # equal supports
    # AUC a: positives 0.7, 0.4 vs negatives 0.1 0.3 0.1 0.5 -> 7 of 8 pairs; b and c: 1
    assert r.per_class["a"]["auc"] == pytest.approx(7 / 8) and r.per_class["b"]["auc"] == 1.0
    assert f["auc_ovr_macro"] == pytest.approx((7 / 8 + 2) / 3)
    assert f["auc_ovr_macro"] == pytest.approx(roc_auc_score(Y6, P6, multi_class="ovr", average="macro"))
    assert r.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r.per_class["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                "support": 2, "auc": 1.0}
    assert "auc_paper_hard_label" not in f
    assert classification_metrics(["a", "a", "b", "b", "c", "c"], P6, ABC).figures == f  # names work too


# 8 African-like samples, the model knows "other": probabilities rank every sample right, but two
# argmaxes are "other" (abdomen #1 and femur #0).
Y8 = ["abdomen", "abdomen", "brain", "brain", "femur", "femur", "thorax", "thorax"]
SAID_OTHER = {1, 4}


def _probs8() -> np.ndarray:
    p = np.full((8, 5), 0.05)
    for i, y in enumerate(Y8):
        t = FIVE.index(y)
        if i in SAID_OTHER:
            p[i, t], p[i, 3] = 0.4, 0.45
        else:
            p[i, t] = 0.8
    return p


def test_a_class_missing_from_the_test_set():
    r = classification_metrics(Y8, _probs8(), FIVE)
    f = r.figures
    assert r.present == ["abdomen", "brain", "femur", "thorax"]
    assert f["accuracy"] == 0.75
    assert f["auc_ovr_macro"] == 1.0 and r.per_class["other"]["auc"] is None
    # macro over the 4 present classes: abdomen and femur P 1 R 1/2, brain and thorax 1 1
    assert f["precision_macro"] == 1.0 and f["recall_macro"] == 0.75
    assert f["f1_macro"] == pytest.approx((2 / 3 + 1 + 2 / 3 + 1) / 4)
    # sklearn's default (labels = true and predicted) would average in "other" at 0
    pred = _probs8().argmax(1)
    y = [FIVE.index(v) for v in Y8]
    assert precision_recall_fscore_support(y, pred, average="macro", zero_division=0)[2] == pytest.approx(2 / 3)
    assert r.per_class["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "auc": None}
    assert r.confusion[:, 3].tolist() == [1, 0, 1, 0, 0] and r.confusion[3].sum() == 0


def test_paper_compatible_auc_is_the_hard_label_one():
    r = classification_metrics(Y8, _probs8(), FIVE, paper_compatible=True)
    scores = paper_hard_label_scores(_probs8().argmax(1), FIVE)
    assert scores[1].tolist() == [1, 1, 1, 1, 1]  # an "other" prediction is a positive for every class
    # per class (1 + TPR - FPR) / 2 with "other" counted as a hit: every TPR is 1;
    # abdomen and femur: 1 of 6 negatives said "other" -> 11/12; brain and thorax: 2 of 6 -> 5/6
    assert r.figures["auc_paper_hard_label"] == pytest.approx((11 / 12 + 5 / 6 + 11 / 12 + 5 / 6) / 4)
    assert r.figures["auc_ovr_macro"] == 1.0  # the probabilities rank every sample right
    # hard labels: one ROC point, so even a perfect ranking scores below 1 when an argmax is wrong
    clean = classification_metrics(Y6, P6, ABC, paper_compatible=True).figures
    tpr_fpr = [(1 / 2, 1 / 4), (1, 1 / 4), (1 / 2, 0)]
    assert clean["auc_paper_hard_label"] == pytest.approx(np.mean([(1 + t - f) / 2 for t, f in tpr_fpr]))
    assert clean["auc_paper_hard_label"] < clean["auc_ovr_macro"]


def test_bad_inputs_and_degenerate_sets():
    with pytest.raises(ValueError, match="pass softmax"):
        classification_metrics(Y6, np.log(P6), ABC)
    with pytest.raises(ValueError, match=r"probs must be \[N, K\] = \[6, 3\]"):
        classification_metrics(Y6, np.ones((6, 2)) / 2, ABC)
    with pytest.raises(ValueError, match=r"true labels \['cervix'\] are not among"):
        classification_metrics(["cervix"] * 6, P6, ABC)
    one = classification_metrics([1, 1], [[0.1, 0.9, 0.0], [0.6, 0.4, 0.0]], ABC)
    assert one.figures["auc_ovr_macro"] is None and one.figures["accuracy"] == 0.5


def test_groups_metrics_names_and_plot():
    r = classification_metrics(Y6, P6, ABC, groups=["X", "X", "X", "Y", "Y", None])
    assert set(r.per_group) == {"X", "Y", "unknown"}
    assert r.per_group["X"].n == 3 and r.per_group["X"].figures["accuracy"] == pytest.approx(2 / 3)
    m = r.metrics("test/")
    assert m["test/accuracy"] == pytest.approx(4 / 6) and m["test/class/b/recall"] == 1.0
    assert m["test/centre/Y/n"] == 2 and "test/centre/unknown/auc_ovr_macro" not in m  # one class: no AUC
    assert r.to_dict()["confusion"] == r.confusion.tolist()
    png = confusion_png(r)
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    fig = confusion_figure(r, normalize=False, title="counts")
    assert fig.axes[0].get_title() == "counts" and len(fig.axes[0].texts) == 9


def test_centre_of():
    assert centre_of({"country": "EGY", "patient_id": "africa-GHA-001"}) == "EGY"  # meta.json wins
    assert centre_of({"patient_id": "africa-MWI-012"}) == "MWI"  # manifest row
    assert centre_of({"patient_id": "fpdb-00012"}) is None and centre_of({}) is None


@pytest.fixture(scope="module")
def africa(shared_data, tmp_path_factory):
    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.infra.config import build

    src = shared_data / "africa_planes_train"
    out = tmp_path_factory.mktemp("africa") / "ds"
    run_ingest(build(IngestConfig, {"cohort": {"name": "africa", "src": str(src),
                                               "index": str(src / "African_train.csv")}, "out": str(out)}),
               progress=False)
    return out


def test_per_centre_breakdown_on_the_african_sample(africa):
    from sonosynth.datasets.indexed import ShardDataset
    from sonosynth.datasets.manifest import read_manifest
    from sonosynth.infra.storage import open_storage

    rows = sorted(read_manifest(open_storage(str(africa))).to_pylist(), key=lambda r: r["key"])
    metas = {item["key"]: item["meta"] for item in (ShardDataset(str(africa))[i] for i in range(len(rows)))}
    assert all(centre_of(metas[r["key"]]) == centre_of(r) for r in rows)  # meta's country = manifest's patient
    centres = [centre_of(r) for r in rows]
    per = Counter(centres)
    assert set(per) == set(CENTRE_NAMES) and len(rows) >= 216
    # crafted predictions: Ghana all "other"; Egypt wrong on every second image; the rest right
    probs, seen, wrong = np.zeros((len(rows), 5)), Counter(), Counter()
    for i, (r, c) in enumerate(zip(rows, centres)):
        t = FIVE.index(r["plane"])
        bad = c == "GHA" or (c == "EGY" and seen[c] % 2 == 0)
        probs[i, 3 if bad else t] = 1.0
        seen[c] += 1
        wrong[c] += bad
    res = classification_metrics([r["plane"] for r in rows], probs, FIVE, groups=centres, paper_compatible=True)
    for c in CENTRE_NAMES:
        assert res.per_group[c].figures["accuracy"] == pytest.approx(1 - wrong[c] / per[c])
    assert res.per_group["GHA"].figures["accuracy"] == 0 and res.per_group["MWI"].figures["accuracy"] == 1
    assert res.per_group["EGY"].figures["accuracy"] == pytest.approx((per["EGY"] // 2) / per["EGY"])
    assert res.figures["accuracy"] == pytest.approx(1 - sum(wrong.values()) / len(rows))
    assert res.present == ["abdomen", "brain", "femur", "thorax"] and res.per_class["other"]["support"] == 0
    # Ghana said "other" every time: recall 0; the paper's AUC counts each as a hit (TPR 1) and a false alarm (FPR 1)
    gha = res.per_group["GHA"].figures
    assert gha["recall_macro"] == 0 and gha["auc_paper_hard_label"] == 0.5 and gha["auc_ovr_macro"] == 0.5
    assert res.per_group["MWI"].figures["auc_paper_hard_label"] == 1.0
