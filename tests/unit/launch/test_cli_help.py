"""Every verb's --help reads as clean paragraphs at 80 columns, with every option explained."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SONOSYNTH = str(Path(sys.executable).with_name("sonosynth"))
VERBS = ["ingest", "train-lora", "generate", "train-sam", "train-classifier", "evaluate", "sweep", "inspect",
         "demo", "config", "tracking-replay", "pipeline", "promote", "champion", "stack", "submit", "jobs", "k8s"]
SUBCOMMANDS = ["champion set", "champion rollback", "champion show", "k8s render"]


def _help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    res = subprocess.run([SONOSYNTH, *args, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _options(text: str) -> dict[str, str]:
    """{'--out': 'its description'} from the Options/Arguments sections."""
    found: dict[str, str] = {}
    current = None
    for line in text.split("\n"):
        m = re.match(r"^  (-{1,2}[\w-]+|[A-Z\[][A-Z_=\]\[]*)(?:[ ,/]+\S+)*?(?:  +(.*))?$", line)
        if m and not line.startswith("   "):
            current = m.group(1)
            found[current] = (m.group(2) or "").strip()
        elif current and line.startswith("     ") and line.strip():
            found[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return found


def test_top_level_help_lists_every_verb_and_the_exit_codes():
    text = _help()
    assert all(v in text for v in VERBS)
    assert "Exit status: 0 done; 1" in text and "2 a" in text


@pytest.mark.parametrize("verb", VERBS + SUBCOMMANDS)
def test_help_is_clean_at_80_columns_and_every_option_has_a_description(verb):
    text = _help(*verb.split())
    lines = text.split("\n")
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert not any(ch in text for ch in "╭│╰─"), "help must render as plain text, not boxes"
    usage, body = text.split("\n", 1)
    assert usage.startswith(f"Usage: sonosynth {verb}")
    description = body.split("Arguments:")[0].split("Options:")[0]
    paragraphs = [p for p in description.split("\n\n") if p.strip() and not p.strip().startswith("sonosynth ")]
    for p in paragraphs:  # wrapped paragraphs: no line of a paragraph ends far short of the width
        rows = [r for r in p.split("\n") if r.strip()]
        short = [r for r in rows[:-1] if len(r) < 50 and not r.rstrip().endswith(":")]
        assert not short, f"hard line breaks in the help of {verb}: {short}"
    assert "Example" in text, f"{verb} --help has no example"
    options = _options(text.split("Arguments:", 1)[-1] if "Arguments:" in text else text.split("Options:", 1)[1])
    assert "--help" in options
    missing = [name for name, desc in options.items() if not desc]
    assert not missing, f"{verb}: options without a description: {missing}\n{text}"
