"""Pool-level analysis of scores: n-gram coverage by KL decile, histograms, correlations, PNG plots.

Computations take the score table as a polars (lazy) frame or an Arrow table and return small polars
frames; the plot functions draw those frames with matplotlib's object API (``Figure``, Agg canvas),
so they never open a window nor change the caller's pyplot backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from curation_platform.selection import FrameLike, as_lazy

TOKEN_PATTERN = r"\w+"
START, END = "<s>", "</s>"
DEFAULT_KS = (50, 100, 500, 1000, 2500)


def _score(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Float64).fill_nan(None)


# -- n-gram coverage by KL decile (SCORES.md section 7) ------------------------------------------

def tokens(caption: pl.Expr) -> pl.Expr:
    """Lower-cased runs of Unicode word characters (``\\w+``): punctuation and whitespace split words."""
    return caption.str.to_lowercase().str.extract_all(TOKEN_PATTERN)


def _ngram_counts(captions: pl.Series, n: int) -> np.ndarray:
    """Occurrence counts of the distinct n-grams of ``captions``, most frequent first.

    Each caption's tokens are padded with ``n - 1`` start tokens and one end token, so a caption of T
    tokens yields T + 1 n-grams for every n; n-gram tokens are joined by a space, which no token contains.
    """
    padded = pl.concat_list(
        pl.lit([START] * (n - 1), dtype=pl.List(pl.String)), tokens(pl.col("caption")),
        pl.lit([END], dtype=pl.List(pl.String)),
    )
    offsets = [f"w{j}" for j in range(n)]
    grams = (
        pl.LazyFrame({"caption": captions})
        .select(*[padded.list.slice(j, padded.list.len() - (n - 1)).alias(name) for j, name in enumerate(offsets)])
        .explode(offsets)
        .group_by(pl.concat_str(offsets, separator=" ").alias("gram"))
        .len()
        .collect()
    )
    return np.sort(grams["len"].to_numpy())[::-1]


def _quantile_group(values: pl.Expr, quantiles: int) -> pl.Expr:
    """1-based equal-count group of each value's ascending rank, in Int64 (``rank * q`` overflows 32 bits)."""
    rank = values.rank("ordinal").cast(pl.Int64) - 1
    return (rank * quantiles // pl.len().cast(pl.Int64) + 1).cast(pl.Int32)


def kl_decile_ngram_coverage(
    frame: FrameLike,
    kl_column: str,
    caption_column: str = "caption",
    ks: Sequence[int] = DEFAULT_KS,
    ns: Sequence[int] = (1, 2, 3),
    quantiles: int = 10,
    max_rows_per_decile: int | None = 100_000,
    seed: int = 0,
) -> pl.DataFrame:
    """Share of n-gram occurrences covered by each KL decile's K most frequent n-grams.

    Rows with a null/NaN KL or a null caption are left out. Deciles are equal-count groups of the KL
    ranking (``decile`` 1 = lowest KL; ties in KL ordered by row position). Captions are lower-cased,
    split into ``\\w+`` tokens and padded with ``n - 1`` start tokens and one end token. Coverage grows
    with the number of captions counted, so each decile counts a seeded uniform sample of at most
    ``max_rows_per_decile`` captions: this bounds memory on big pools and keeps deciles comparable
    (``None`` counts every caption). One row per (decile, n, k) with ``kl_min``/``kl_max`` over the
    whole decile, ``rows`` captions counted, ``occurrences`` and ``distinct`` n-grams among them.
    """
    rows = (
        as_lazy(frame)
        .select(_score(kl_column).alias("kl"), pl.col(caption_column).alias("caption"))
        .drop_nulls()
        .with_columns(decile=_quantile_group(pl.col("kl"), quantiles))
    )
    bounds = rows.group_by("decile").agg(kl_min=pl.col("kl").min(), kl_max=pl.col("kl").max())
    if max_rows_per_decile is not None:
        rows = rows.filter(pl.int_range(pl.len()).shuffle(seed).over("decile") < max_rows_per_decile)
    sample, bounds = pl.collect_all([rows.select("decile", "caption"), bounds.sort("decile")])
    records = []
    for decile, kl_min, kl_max in bounds.iter_rows():
        captions = sample.filter(pl.col("decile") == decile)["caption"]
        for n in ns:
            cumulative = np.cumsum(_ngram_counts(captions, n))
            for k in ks:
                records.append({
                    "decile": decile, "kl_min": kl_min, "kl_max": kl_max, "rows": captions.len(), "n": n, "k": k,
                    "occurrences": int(cumulative[-1]), "distinct": len(cumulative),
                    "coverage": float(cumulative[min(k, len(cumulative)) - 1] / cumulative[-1]),
                })
    return pl.DataFrame(records, schema={
        "decile": pl.Int32, "kl_min": pl.Float64, "kl_max": pl.Float64, "rows": pl.Int64, "n": pl.Int32,
        "k": pl.Int32, "occurrences": pl.Int64, "distinct": pl.Int64, "coverage": pl.Float64,
    })


# -- histograms and correlations ----------------------------------------------------------------

def score_histograms(frame: FrameLike, columns: Sequence[str], bins: int = 50) -> pl.DataFrame:
    """Equal-width histograms over each column's [min, max] (null/NaN skipped), computed by streaming.

    One row per (column, bin) with the bin's ``lower``/``upper`` edge and ``count``; empty bins included.
    """
    lazy = as_lazy(frame)
    ranges = lazy.select(
        *[_score(c).min().alias(f"{c}\0min") for c in columns], *[_score(c).max().alias(f"{c}\0max") for c in columns]
    ).collect().row(0, named=True)
    edges = {c: _edges(ranges[f"{c}\0min"], ranges[f"{c}\0max"]) for c in columns}
    plans = [
        lazy.select(
            ((_score(c) - edges[c][0]) / (edges[c][1] - edges[c][0]) * bins).floor().clip(0, bins - 1)
            .cast(pl.Int64).alias("bin")
        ).drop_nulls().group_by("bin").len()
        for c in columns
    ]
    parts = []
    for column, counted in zip(columns, pl.collect_all(plans)):
        counts = np.zeros(bins, dtype=np.int64)
        counts[counted["bin"].to_numpy()] = counted["len"].to_numpy()
        grid = np.linspace(*edges[column], bins + 1)
        parts.append(pl.DataFrame({
            "column": [column] * bins, "bin": np.arange(bins), "lower": grid[:-1], "upper": grid[1:], "count": counts,
        }))
    return pl.concat(parts)


def _edges(low: float | None, high: float | None) -> tuple[float, float]:
    """The histogram range; a constant (or all-null) column gets a unit-wide range around its value."""
    if low is None or high is None:
        return 0.0, 1.0
    return (low - 0.5, high + 0.5) if low == high else (low, high)


class Correlations(NamedTuple):
    """Square matrices (a ``column`` label column, then one column per score) and the rows used."""

    pearson: pl.DataFrame
    spearman: pl.DataFrame
    rows: int


def score_correlations(frame: FrameLike, columns: Sequence[str]) -> Correlations:
    """Pearson and Spearman correlations over the rows where every column is present.

    Spearman is Pearson on average ranks; ranking needs each column in memory once (pass a sample
    for huge pools).
    """
    names = list(columns)
    complete = as_lazy(frame).select(*[_score(c).alias(c) for c in names]).drop_nulls()
    ranked = complete.select(*[pl.col(c).rank("average").alias(c) for c in names])
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    stats = [plan.select(*[pl.corr(a, b).alias(f"{a}\0{b}") for a, b in pairs], pl.len().alias("\0rows"))
             for plan in (complete, ranked)]
    pearson, spearman = [row.row(0, named=True) for row in pl.collect_all(stats)]
    return Correlations(_matrix(names, pearson), _matrix(names, spearman), pearson["\0rows"])


def _matrix(names: list[str], pairwise: dict[str, float]) -> pl.DataFrame:
    matrix = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            value = pairwise[f"{a}\0{names[j]}"]
            matrix[i, j] = matrix[j, i] = math.nan if value is None else value
    return pl.DataFrame({"column": names, **{name: matrix[:, j] for j, name in enumerate(names)}})


# -- plots --------------------------------------------------------------------------------------

def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def panel_grid(panels: int, columns: int = 3, size: tuple[float, float] = (4.0, 3.0)) -> tuple[Figure, list]:
    """A constrained-layout figure of ``panels`` axes, ``columns`` to a row, each ``size`` inches (width,
    height), the unused cells of the last row hidden: the figure and its ``panels`` axes in row order
    (none, over one hidden cell, for ``panels = 0``). The plots here and the release report share it."""
    cols = min(columns, max(1, panels))
    rows = math.ceil(max(1, panels) / cols)
    figure = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def plot_histograms(histograms: pl.DataFrame, path: str | Path, cutoffs: Mapping[str, float] | None = None) -> Path:
    """One panel per score (output of :func:`score_histograms`), a dashed line at each selection cutoff."""
    columns = histograms["column"].unique(maintain_order=True).to_list()
    figure, axes = panel_grid(len(columns))
    for axis, column in zip(axes, columns):
        part = histograms.filter(pl.col("column") == column).sort("bin")
        edges = np.append(part["lower"].to_numpy(), part["upper"][-1])
        axis.stairs(part["count"].to_numpy(), edges, fill=True, alpha=0.7)
        if cutoffs and column in cutoffs:
            axis.axvline(cutoffs[column], color="tab:red", linestyle="--", label=f"cutoff {cutoffs[column]:.4g}")
            axis.legend(fontsize="small")
        axis.set(title=column, ylabel="samples")
    return _save(figure, path)


def plot_kl_decile_coverage(coverage: pl.DataFrame, path: str | Path) -> Path:
    """Coverage@K against KL decile, one panel per n (output of :func:`kl_decile_ngram_coverage`)."""
    orders = sorted(coverage["n"].unique().to_list())
    figure, axes = panel_grid(len(orders))
    for axis, n in zip(axes, orders):
        part = coverage.filter(pl.col("n") == n)
        for k in sorted(part["k"].unique().to_list()):
            line = part.filter(pl.col("k") == k).sort("decile")
            axis.plot(line["decile"].to_numpy(), line["coverage"].to_numpy(), marker="o", label=f"top {k}")
        axis.set(title=f"{n}-grams", xlabel="KL decile (1 = lowest)", ylabel="coverage", ylim=(0, 1.02),
                 xticks=sorted(part["decile"].unique().to_list()))
        axis.legend(fontsize="small")
    return _save(figure, path)


def plot_correlations(correlations: Correlations, path: str | Path) -> Path:
    """Pearson and Spearman heatmaps side by side, values printed in the cells."""
    side = 0.6 * correlations.pearson.height
    figure, axes = panel_grid(2, size=(side + 3.0, side + 2.5))
    for axis, (title, matrix) in zip(axes, (("Pearson", correlations.pearson), ("Spearman", correlations.spearman))):
        names = matrix["column"].to_list()
        values = matrix.select(names).to_numpy()
        image = axis.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), names)
        for (i, j), value in np.ndenumerate(values):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
        axis.set_title(f"{title} (n = {correlations.rows})")
        figure.colorbar(image, ax=axis, shrink=0.8)
    return _save(figure, path)


# -- pool summary and the standard set of outputs -----------------------------------------------

def score_summary(frame: FrameLike, columns: Sequence[str]) -> pl.DataFrame:
    """One row per score: count of finite values, NaN/null count, mean, std, min, max (streamed)."""
    lazy = as_lazy(frame)
    plans = [
        lazy.select(
            pl.lit(column).alias("score"),
            _score(column).count().alias("count"),
            (pl.len() - _score(column).count()).alias("nan_count"),
            _score(column).mean().alias("mean"),
            _score(column).std().fill_null(0.0).alias("std"),
            _score(column).min().cast(pl.Float64).alias("min"),
            _score(column).max().cast(pl.Float64).alias("max"),
        )
        for column in columns
    ]
    return pl.concat(pl.collect_all(plans), how="vertical_relaxed")


def write_pool_analysis(frame: FrameLike, columns: Sequence[str], out: str | Path,
                        captions: FrameLike | None = None) -> dict[str, Path]:
    """Summary, histograms, correlations and (given uid + caption) KL-decile n-gram coverage under ``out``.

    Every table is written as parquet next to its PNG; returns the written paths by name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lazy = as_lazy(frame)
    written: dict[str, Path] = {}
    summary = score_summary(lazy, columns)
    summary.write_parquet(written.setdefault("summary", out / "summary.parquet"))
    histograms = score_histograms(lazy, columns, bins=40)
    histograms.write_parquet(written.setdefault("histograms", out / "histograms.parquet"))
    written["score_histograms_png"] = plot_histograms(histograms, out / "score_histograms.png")
    correlations = score_correlations(lazy, columns)
    correlations.spearman.write_parquet(written.setdefault("spearman", out / "spearman.parquet"))
    written["score_correlations_png"] = plot_correlations(correlations, out / "score_correlations.png")
    if captions is not None:
        with_captions = lazy.join(as_lazy(captions).select("uid", "caption"), on="uid")
        for side in ("kl_text", "kl_image"):
            if side not in columns:
                continue
            coverage = kl_decile_ngram_coverage(with_captions, side)
            coverage.write_parquet(written.setdefault(f"{side}_coverage", out / f"{side}_decile_ngram_coverage.parquet"))
            written[f"{side}_coverage_png"] = plot_kl_decile_coverage(coverage, out / f"{side}_decile_ngram_coverage.png")
    return written
