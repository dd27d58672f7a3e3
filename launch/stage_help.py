"""The stage verbs' ``--help`` texts: a first line, paragraphs, and ``Example:`` with command lines.

``launch/stages.py`` holds the registry and passes each text to its ``Stage`` entry; they live here so
that the registry reads in one sitting.
"""

INGEST_HELP = """Read a real cohort (or the phantom) into a sonosynth dataset.

OUT gets WebDataset shards, manifest.parquet, quarantine.jsonl, split_report.json and the
resolved config.yaml. Outline masks are filled; unreadable, mismatched or empty inputs go
to quarantine with a reason and the rest are ingested. Re-running into the same OUT
resumes and never duplicates a sample.

Examples:

\b
    sonosynth ingest --cohort phantom --num-samples 64 --out runs/ph
    sonosynth ingest ingest_hc18 --src ~/data/HC18/training_set \\
        --out s3://bucket/hc18
"""

TRAIN_LORA_HELP = """Fine-tune a Stable Diffusion LoRA with DeepSpeed on Ray Train, tracked in MLflow.

Joint mode (paper A) learns image and mask together (RGB = image, image, mask); class
mode (FU-LoRA) learns one caption per plane. Re-running the same command resumes from
the last checkpoint in OUT. The LoRA is written to OUT/model in the diffusers format and
registered in MLflow as sonosynth-lora.

Examples:

\b
    sonosynth train-lora lora_joint_tiny --dataset runs/ph --out runs/lora
    sonosynth train-lora lora_joint_head --dataset runs/hc18 \\
        --set model.pretrained=/models/sd15
"""

TRAIN_CONTROLNET_HELP = """Train a ControlNet that draws a fetal head image for a given head mask.

A diffusers ControlNetModel, initialised from the base UNet (optionally with a trained LoRA
fused in), learns to follow the filled head mask; the base model stays frozen. Training runs
on the shared engine (Ray Train + DeepSpeed), resumes from the last checkpoint in OUT, and
exports OUT/model in the diffusers format (ControlNetModel.from_pretrained and
StableDiffusionControlNetPipeline load it unchanged), registered in MLflow as
sonosynth-controlnet. `sonosynth generate --mode mask` samples with it.

Examples:

\b
    sonosynth train-controlnet controlnet_tiny --dataset runs/ph --out runs/cn
    sonosynth train-controlnet controlnet_head --dataset runs/hc18 \\
        --set model.pretrained=/models/sd15
"""

QUALITY_HELP = """Score a synthetic set against real data before anything trains on it.

Feature-space distances between real and synthetic images (FID, KID, precision/recall,
density/coverage) beside a real-vs-real baseline of the same size, each with a bootstrap
interval; label fidelity of image+mask pairs (a segmenter prompted with the box of each
pair's own mask, Dice against that mask, the same on real pairs as the reference) and the
mask-shape statistics of both sets. OUT gets summary.json, per_image.parquet, a t-SNE plot
of the features and overlays of the worst pairs; a gate in the recipe passes or stops the
synthetic arm of a pipeline.

Examples:

\b
    sonosynth quality quality_tiny --real runs/ph --synthetic runs/syn \\
        --out runs/quality
    sonosynth quality quality_head --real s3://bucket/hc18 \\
        --synthetic s3://bucket/synthetic --segmenter models:/sonosynth-sam@champion
"""

GENERATE_HELP = """Sample synthetic image+mask pairs (or plane images) on Ray into WebDataset shards.

Each sampler actor loads the base model and fuses the LoRA once; shards are published
atomically with a completion record, so re-running the same command after a crash
resumes with no duplicated and no missing sample. Joint-mode masks are extracted from
the blue channel, filled and quality-checked; rejected samples are redrawn with derived
seeds.
In mask mode a ControlNet (`sonosynth train-controlnet`) draws an image for each mask
drawn from a head-shape model fitted on real masks (or from the real masks, augmented),
and the sample's mask is that mask exactly.

Examples:

\b
    sonosynth generate generate_tiny --lora runs/lora/model \\
        --num-samples 32 --out runs/syn
    sonosynth generate generate_joint_head \\
        --lora models:/sonosynth-lora@champion --num-samples 500 \\
        --out s3://bucket/synthetic --address auto
    sonosynth generate generate_mask_tiny --controlnet runs/cn/model \\
        --num-samples 32 --out runs/syn-mask
"""

TRAIN_SAM_HELP = """Fine-tune the Segment Anything Model on real and synthetic image+mask pairs.

Modes: the mask decoder only (paper A), decoder plus LoRA on the image encoder's
attention, or everything. Box prompts come from the mask after the paired augmentation,
jittered; the best checkpoint by validation Dice is exported to OUT/model and registered
in MLflow as sonosynth-sam. Re-running the same command resumes from the last checkpoint.

Examples:

\b
    sonosynth train-sam sam_tiny --dataset runs/hc18 --out runs/sam
    sonosynth train-sam sam_paper_a_synthetic --dataset runs/es \\
        --synthetic runs/syn --set model.checkpoint=/models/sam_vit_b.pth
"""

TRAIN_CLASSIFIER_HELP = """Train a fetal plane classifier on real and synthetic planes (FU-LoRA, corrected).

Backbones from transformers (ResNet-18, MobileNetV2, EfficientNet-B0, ViT-B/16) or
MONAI (DenseNet); one label map for the job; the paper's augmentation as a preset; the
best checkpoint on the validation split is exported to OUT/model and registered in
MLflow as sonosynth-classifier.

Examples:

\b
    sonosynth train-classifier classifier_tiny --dataset runs/africa \\
        --out runs/classifier
    sonosynth train-classifier classifier_hb --dataset runs/fpdb \\
        --synthetic runs/syn-planes --set model.backbone=resnet18
"""

EVALUATE_HELP = """Score segmentation masks (or plane predictions) per image and per cohort.

For every image with a ground-truth mask: Dice, IoU, HD95 (pixels, and mm when the
pixel size is known) and the head-circumference error of the fitted ellipse, at native
resolution and at 256 px, over K jittered box prompts. The box baseline (the ellipse
inscribed in the prompt box) is scored the same way, so the figures show what a model
learned beyond its prompt. OUT gets per_image.parquet and .csv, summary.json (dice_mean,
box_baseline_dice_mean, ...), a Dice distribution plot and overlays of the worst cases.
A classifier (--model models:/sonosynth-classifier@champion, or --set
predictions_csv=FILE) is scored with accuracy, macro and weighted P/R/F1, one-vs-rest
AUC, the confusion matrix and a per-centre breakdown.

Examples:

\b
    sonosynth evaluate --dataset runs/hc18 --predictions runs/preds \\
        --out runs/eval
    sonosynth evaluate --dataset runs/hc18 \\
        --model models:/sonosynth-sam@champion --out runs/eval-sam
"""

PROMOTE_HELP = """Score a new model version against the champion; promote it if it wins.

The version gets the alias challenger. It and the champion are scored by the same
evaluation stage on the recipe's fixed evaluation set (same datasets, split, seed and box
draws), and the recipe's rules decide: the challenger becomes champion only if it beats
the champion, and the first version of a model becomes champion. The decision and both
sets of figures are written as tags on the version, in the promote run in MLflow and in
OUT/decision.json. `sonosynth champion` sets, shows or rolls back the champion by hand.

Example:

\b
    sonosynth promote promote_sam.yaml --model sonosynth-sam --version 7 \\
        --tracking-uri http://mlflow:5000
"""

PIPELINE_HELP = """Run the stages of a pipeline recipe in order, skipping those already done.

Each section of the recipe runs one stage (`sonosynth config` lists them) and writes to
OUT/SECTION/KEY, where the key hashes the stage's config and its inputs' keys. A section whose output is
finished is skipped, so a killed or failed pipeline resumes where it stopped, and
changing one section re-runs it and what depends on it. One MLflow run holds a nested
run per stage. OUT gets report.html (synthetic pairs, Dice before/after synthetic data,
the promotion decision, the lineage), lineage.csv and lineage.md, and pipeline.json.

Examples:

\b
    sonosynth pipeline demo --out runs/demo
    sonosynth pipeline demo --out runs/demo --from sam_synthetic
    sonosynth pipeline demo --set lora.engine.max_steps=20
"""

SWEEP_HELP = """Run one stage over a grid of overrides and seeds; tables with 95% intervals from MLflow.

The sweep recipe names the stage, its base recipe, the grid (each axis maps labels to
overrides) and the seeds: every cell runs once per seed, each run in its own folder under
OUT, run by the stage itself, so finished runs are skipped and a killed sweep resumes. For
one seed every arm draws the same real subset, and a smaller count's subset is inside a
larger one's. An optional prepare pipeline runs first (e.g. ingest, LoRA, generate); an
evaluate section scores every run on one fixed held-out set.

OUT gets, read back from the MLflow runs: runs.csv (one row per run), results.csv and
results.md (per cell: the mean over seeds with its 95% Student t interval), differences.csv
(each arm minus the baseline arm, paired by seed) and a plot of the first metric against the
numeric axis with interval bands. --parallel N runs N at once as Ray tasks on the cluster
(--address), auto as many as its CPUs and GPUs hold.

Examples:

\b
    sonosynth sweep value_tiny       # CPU: under 30 minutes on 2 cores
    sonosynth sweep sam_paper_a_sweep --parallel auto --address auto
"""
