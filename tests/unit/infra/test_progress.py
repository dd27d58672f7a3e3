"""One bar per stage: live on a terminal, plain lines without carriage returns or colours elsewhere."""

from __future__ import annotations

import io

from sonosynth.infra.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_the_bar_is_plain_lines_at_intervals_and_one_at_the_end(capsys, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_PROGRESS_INTERVAL_S", "0")
    with Progress(4, "train-sam", "step", stream=io.StringIO()) as bar:
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.5")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    assert lines[0].startswith("    train-sam: 1/4 step (25%) after ")
    assert lines[-1].startswith("    train-sam: 4/4 step (100%) in ") and lines[-1].endswith("loss=0.5")
    assert len(lines) == 5


def test_off_a_terminal_a_short_job_prints_one_line(capsys, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_PROGRESS_INTERVAL_S", "30")
    assert list(track(range(7), 7, "evaluate", "image")) == list(range(7))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("    evaluate: 7/7 image (100%) in ")


def test_a_resumed_job_counts_from_where_it_was(capsys, monkeypatch):
    monkeypatch.setenv("SONOSYNTH_PROGRESS_INTERVAL_S", "30")
    with Progress(10, "train-lora", "step", initial=6, stream=io.StringIO()) as bar:
        bar.update(4)
    assert capsys.readouterr().out.startswith("    train-lora: 10/10 step (100%) in ")


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_gone_when_done(capsys):
    term = Terminal()
    with Progress(3, "generate", "sample", stream=term) as bar:
        for _ in range(3):
            bar.update(1)
    drawn = term.getvalue()
    assert "generate" in drawn and "\r" in drawn and "\n" not in drawn
    assert drawn.endswith("\r")  # the line is cleared: the stage's summary takes its place
    assert capsys.readouterr().out == ""


def test_a_disabled_bar_prints_nothing(capsys):
    with Progress(3, "ingest", "img", enabled=False, stream=Terminal()) as bar:
        bar.update(3)
    assert capsys.readouterr() == ("", "")
