"""Analysis: n-gram coverage by KL decile against hand counts, histograms, correlations, PNG output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation_platform.analysis import (
    kl_decile_ngram_coverage,
    plot_correlations,
    plot_histograms,
    plot_kl_decile_coverage,
    score_correlations,
    score_histograms,
)

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "car", "on", "beach", "in", "snow", "man", "tree"]


def _hand_pool() -> pl.DataFrame:
    """20 rows, 2 per decile: the lowest-KL decile repeats itself, the highest does not."""
    captions = ["A a, A!", "a B"] + [f"filler{i} text" for i in range(16)] + ["x y z", "X w"]
    return pl.DataFrame({"kl_text": np.arange(20.0)[::-1].copy(), "caption": captions[::-1]})


def _coverage(table: pl.DataFrame, decile: int, n: int, k: int) -> float:
    return table.filter(decile=decile, n=n, k=k)["coverage"].item()


def test_coverage_matches_hand_counts() -> None:
    table = kl_decile_ngram_coverage(_hand_pool(), "kl_text", ks=(1, 2, 3), ns=(1, 2, 3))
    assert table["decile"].unique().sort().to_list() == list(range(1, 11))
    # lowest decile: "a a a", "a b" -> unigrams a:4 </s>:2 b:1 (7 occurrences)
    assert [_coverage(table, 1, 1, k) for k in (1, 2, 3)] == pytest.approx([4 / 7, 6 / 7, 1.0])
    # bigrams <s>a:2 aa:2 a</s>:1 ab:1 b</s>:1
    assert [_coverage(table, 1, 2, k) for k in (1, 2, 3)] == pytest.approx([2 / 7, 4 / 7, 5 / 7])
    # trigrams <s><s>a:2 <s>aa:1 aaa:1 aa</s>:1 <s>ab:1 ab</s>:1
    assert [_coverage(table, 1, 3, k) for k in (1, 2, 3)] == pytest.approx([2 / 7, 3 / 7, 4 / 7])
    # highest decile: "x y z", "x w" -> unigrams x:2 </s>:2 y z w:1; bigrams <s>x:2, 5 singletons
    assert [_coverage(table, 10, 1, k) for k in (1, 2, 3)] == pytest.approx([2 / 7, 4 / 7, 5 / 7])
    assert [_coverage(table, 10, 2, k) for k in (1, 2, 3)] == pytest.approx([2 / 7, 3 / 7, 4 / 7])
    lowest = table.filter(decile=1, n=1, k=1).row(0, named=True)
    assert (lowest["rows"], lowest["occurrences"], lowest["distinct"], lowest["kl_min"], lowest["kl_max"]) == (
        2, 7, 3, 0.0, 1.0)


def test_rows_without_kl_or_caption_are_left_out() -> None:
    frame = pl.concat([_hand_pool(), pl.DataFrame({"kl_text": [float("nan"), None, 5.5],
                                                   "caption": ["nan kl", "null kl", None]})])
    assert kl_decile_ngram_coverage(frame, "kl_text", ks=(1,), ns=(1,)).equals(
        kl_decile_ngram_coverage(_hand_pool(), "kl_text", ks=(1,), ns=(1,)))


def test_coverage_properties_and_sampling() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]
    frame = pl.DataFrame({"kl_text": rng.normal(size=n), "caption": captions})
    table = kl_decile_ngram_coverage(frame, "kl_text", ks=(5, 10, 50, 100, 2500))
    assert table.height == 10 * 3 * 5
    assert table["coverage"].is_between(0.0, 1.0).all()
    assert table["rows"].unique().to_list() == [300]
    monotone = table.sort("k").group_by("decile", "n").agg(pl.col("coverage").diff().drop_nulls().min() >= 0)
    assert monotone["coverage"].all()
    assert table.filter(n=1, k=2500)["coverage"].to_list() == [1.0] * 10
    sampled = kl_decile_ngram_coverage(frame, "kl_text", ks=(5,), ns=(2,), max_rows_per_decile=40, seed=1)
    assert sampled["rows"].to_list() == [40] * 10
    assert sampled.equals(kl_decile_ngram_coverage(frame, "kl_text", ks=(5,), ns=(2,), max_rows_per_decile=40, seed=1))


def test_histograms_count_every_present_value() -> None:
    frame = pl.DataFrame({"a": [0.0, 0.5, 1.0, None, float("nan")], "b": [2, 2, 2, 2, 2]})
    table = score_histograms(frame, ["a", "b"], bins=4)
    a = table.filter(column="a")
    assert a["count"].to_list() == [1, 0, 1, 1]
    assert a["lower"].to_list() == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert table.filter(column="b")["count"].sum() == 5


def test_correlations_match_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    frame = pl.DataFrame({"x": x, "y": x + rng.normal(size=500), "z": np.exp(x)})
    result = score_correlations(frame, ["x", "y", "z"])
    values = frame.to_numpy()
    ranks = np.argsort(np.argsort(values, axis=0), axis=0)
    assert result.rows == 500
    assert result.pearson.select("x", "y", "z").to_numpy() == pytest.approx(np.corrcoef(values.T))
    assert result.spearman.select("x", "y", "z").to_numpy() == pytest.approx(np.corrcoef(ranks.T))
    assert result.spearman.filter(column="x")["z"].item() == pytest.approx(1.0)


def test_plots_write_png_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 400
    frame = pl.DataFrame({
        "clip_score": rng.uniform(0.1, 0.4, n), "kl_text": rng.exponential(size=n),
        "caption": [" ".join(rng.choice(WORDS, size=5)) for _ in range(n)],
    })
    paths = [
        plot_histograms(score_histograms(frame, ["clip_score", "kl_text"], bins=20), tmp_path / "hist.png",
                        cutoffs={"clip_score": 0.28}),
        plot_kl_decile_coverage(kl_decile_ngram_coverage(frame, "kl_text", ks=(10, 50)), tmp_path / "plots" / "kl.png"),
        plot_correlations(score_correlations(frame, ["clip_score", "kl_text"]), tmp_path / "corr.png"),
    ]
    for path in paths:
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
