"""What a night costs: the tiny nightly (nightly_heads_tiny) three times into one output. Prints JSON.

(a) the first night: every section runs (ingest, LoRA, generate, SAM twice, evaluate, promote);
(b) a night with nothing new in the labelled source: every section is skipped (the target:
    seconds, so `noop_over_first` is a few percent);
(c) a night after new labelled images landed in the source: ingest and every section after it
    run again, the held-out set's ingest is skipped.

Each night is a `sonosynth pipeline` process, as the CronJob runs it (the interpreter's start,
imports and the MLflow store included). The source is a local copy of the HC18 sample (24
images, then 8 more); the held-out set is the Spanish head sample.

    .venv/bin/python bench/nightly_rerun.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SONOSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


def publish(names: list[str], dest: Path) -> None:
    for sub in ("image", "mask"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(SHARED / "hc18_sample" / "image" / name, dest / "image" / name)
        mask = name.replace(".png", "_Annotation.png")
        shutil.copy2(SHARED / "hc18_sample" / "mask" / mask, dest / "mask" / mask)


def night(work: Path, source: Path) -> dict:
    cmd = [str(Path(sys.executable).with_name("sonosynth")), "pipeline", "nightly_heads_tiny",
           "--out", str(work / "nightly"), "--no-progress", "--set", f"real.cohort.src={source}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the nightly failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "nightly" / "pipeline.json").read_text())
    ran = [row["section"] for row in summary["stages"] if row["status"] == "ran"]
    return {"seconds": round(seconds, 2), "ran": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="Run in this folder and keep it (default: a temporary folder).")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"the real samples are not at {SHARED}; set SONOSYNTH_SHARED_DATA")
    work = Path(args.keep or tempfile.mkdtemp(prefix="sonosynth-nightly-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    heads = sorted(p.name for p in (SHARED / "hc18_sample" / "image").glob("*.png"))
    source = work / "source"
    publish(heads[:24], source)
    first = night(work, source)
    print(json.dumps({"night": "first", **first}), flush=True)
    quiet = night(work, source)
    print(json.dumps({"night": "nothing new", **quiet}), flush=True)
    publish(heads[24:32], source)
    grown = night(work, source)
    print(json.dumps({"night": "new labelled images", **grown}), flush=True)
    print(json.dumps({
        "first_s": first["seconds"], "noop_s": quiet["seconds"], "new_data_s": grown["seconds"],
        "noop_over_first": round(quiet["seconds"] / first["seconds"], 4),
        "noop_sections_run": len(quiet["ran"]), "new_data_sections_run": len(grown["ran"]),
        "first_sections_run": len(first["ran"]),
    }))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
