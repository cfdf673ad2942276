"""Progress bars: drawn with totals and ETA when asked, silent in logs, and results unchanged either way."""
from __future__ import annotations

import numpy as np

from covtoken.eval.bootstrap import draw_cluster_counts
from covtoken.progress import enabled, progress


def test_bar_shows_total_and_eta_when_enabled(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COVTOKEN_PROGRESS", "1")
    assert enabled()
    with progress("tokens tiny-vit", 40, unit="images") as step:
        for _ in range(4):
            step(10)
    err = capsys.readouterr().err
    assert "tokens tiny-vit" in err and "40/40" in err and "ETA" in err


def test_bars_are_off_without_a_terminal_and_change_nothing(monkeypatch, capsys) -> None:
    strata = [np.arange(0, 5), np.arange(5, 12)]
    monkeypatch.setenv("COVTOKEN_PROGRESS", "0")
    quiet = draw_cluster_counts(strata, 12, 300, seed=3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("COVTOKEN_PROGRESS", "1")
    shown = draw_cluster_counts(strata, 12, 300, seed=3)
    assert "bootstrap resamples" in capsys.readouterr().err
    np.testing.assert_array_equal(quiet, shown)
