"""Progress bars: off under ``--quiet`` and whenever stderr is not a terminal (tests, logs)."""

from __future__ import annotations

import io
import sys

import pytest

from mixcache_compile import progress as progress_mod
from mixcache_compile.eval.bench import parse_args
from mixcache_compile.export.cli import parser as export_parser
from mixcache_compile.eval.calibrate import parser as calibrate_parser


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def unquiet():
    yield
    progress_mod.set_quiet(False)


def test_bar_shows_on_a_terminal_and_not_when_quiet(monkeypatch, unquiet):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # here, not in a fixture: pytest swaps stderr between phases
    bar = progress_mod.progress(range(3), desc="work", total=3)
    assert not bar.disable
    assert list(bar) == [0, 1, 2]
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    progress_mod.set_quiet(True)
    before = terminal.getvalue()
    quiet = progress_mod.progress(range(3), desc="hushed", total=3)
    assert quiet.disable and list(quiet) == [0, 1, 2]
    quiet.set_postfix_str("still callable")
    assert terminal.getvalue() == before


def test_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_mod.progress(desc="piped", total=2)
    bar.update(2)
    bar.close()
    assert bar.disable and sys.stderr.getvalue() == ""


def test_every_long_command_takes_quiet():
    assert parse_args(["--quiet"]).quiet and not parse_args([]).quiet
    assert calibrate_parser().parse_args(["-q"]).quiet
    assert export_parser().parse_args(["zoo", "--out", "x", "--quiet"]).quiet
