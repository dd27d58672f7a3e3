"""Champion/challenger promotion in the MLflow model registry, and the operators' overrides.

A new model version gets the alias ``challenger``. It becomes ``champion`` only if it beats
the current champion on a fixed evaluation set: both versions are scored by the same
evaluation stage, on the same datasets and split, with the same seed and box draws, and
``PromoteRules`` compare the figures (segmentation: mean Dice by more than ``margin``, and
no cohort's Dice worse than the champion's by more than ``tolerance``; classification:
macro F1 by more than ``margin`` with the AUC guarded by ``tolerance``). The first version
of a model becomes champion. The decision, with both sets of figures, is written as tags on
the challenger's version (``sonosynth.decision``, ``sonosynth.reason``,
``sonosynth.challenger_<figure>``, ``sonosynth.champion_<figure>``), in the promote stage's
own MLflow run and in ``OUT/decision.json``.

Every change of champion (a promotion, ``sonosynth champion set NAME --version V``) is
appended to the registered model's ``sonosynth.champion_history`` tag and the champion it
replaced keeps the alias ``previous_champion``, so ``sonosynth champion rollback NAME``
restores it (``sonosynth.infra.model_registry.Registry``).

A new champion's lineage follows it: the LoRA version that drew the synthetic data it was
trained on becomes the LoRA's champion too, recorded on both versions, and rolling the model
back rolls that LoRA back (``champions.py``; the trail through lineage.json, the synthetic set's
config and the LoRA's summary.json is ``lineage.py``).

``decision.py`` is the pure decision (rules, comparison, combining datasets, the text);
``stage.py`` the stage that scores both versions with an evaluation stage and records it.
"""

from sonosynth.launch.promote.champions import champion_lineage, crown_lineage, rollback_lineage
from sonosynth.launch.promote.decision import Decision, PromoteRules, combine, compare, render
from sonosynth.launch.promote.stage import PromoteConfig, PromoteEvaluationConfig, promote_candidate, run, stage_scorer

from sonosynth.launch.promote.lineage import Lineage, trace

__all__ = ["Decision", "Lineage", "PromoteConfig", "PromoteEvaluationConfig", "PromoteRules", "champion_lineage",
           "combine", "compare", "crown_lineage", "promote_candidate", "render", "rollback_lineage", "run",
           "stage_scorer", "trace"]
