"""Release report: a Markdown page, the same page as self-contained HTML, and PNG figures on what a
release kept from its pool.

:func:`write_report` writes ``report.md``, ``report.html`` and ``figures/*.png``: provenance, the
data-quality check results, the ingestion funnel before the pool, the selection funnel, score histograms
(pool vs selected, with the recipe's cut-offs), the samples just either side of each cut-off, a seeded
random sample of the release, caption n-gram coverage by ``kl_text`` decile, example grids of the highest
and lowest scored pool samples per cut score, and language and caption-length composition. Every figure
is at most :data:`MAX_WIDTH_PX` wide so an orchestrator UI can show it as is; :func:`inline_markdown`
packs the funnel, those figures and a preview table into one Markdown string under a byte budget.
Figures use matplotlib's object API (``Figure`` on the Agg canvas, the caller's pyplot backend untouched)
under a fixed style and are saved without metadata, and the random sample is picked by a keyed hash of
the uid, so the same inputs give byte-identical files. Only the grid examples' images are loaded.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import html
import io
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib import style
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageOps

from curation_platform.analysis import _quantile_group, kl_decile_ngram_coverage, panel_grid, score_histograms
from curation_platform.reasons import REASON_DESCRIPTIONS, Reason

# the sample columns of a report's pool frame that are not scores (every other float column is one)
REPORT_SAMPLE_COLUMNS = ("uid", "shard", "key", "caption", "language", "caption_words", "caption_chars", "width",
                         "height")
FONT = "DejaVu Sans"
STYLE = {"font.family": [FONT], "font.size": 9.0, "axes.titlesize": 10.0}
DPI = 100
MAX_WIDTH_PX = 800  # every figure fits an orchestrator's metadata pane without scaling
FUNNEL_LABEL_CHARS = 40  # stage labels wrap so the bars keep their width
THUMB = 96
GRID_COLUMNS = 4
CELL = (1.55, 2.3)  # inches per grid cell: a thumbnail, its title and three caption lines
CAPTION_WIDTH, CAPTION_LINES = 24, 3
TOP_LANGUAGES = 10
HIST_BINS = 40
POOL_COLOUR, SELECTED_COLOUR = "0.6", "tab:blue"
AROUND_CUTOFF = 4  # samples shown on each side of a cut-off: one grid row each
RANDOM_SAMPLE = 12  # a 4 x 3 grid
SAMPLE_KEY = b"release-report-sample-v1"  # keys the uid hash: the same uids are drawn for every release
PREVIEW_ROWS = 10
PREVIEW_SCORES = 4
TABLE_CAPTION_CHARS = 80
PROVENANCE_SHARDS = 5
INLINE_MAX_BYTES = 300_000
INLINE_SCALES = (1.0, 0.8, 0.64, 0.5, 0.4)  # of the figure's width, tried in turn until it fits its share
INLINE_NOTE_BYTES = 160  # reserved per figure for the note naming it when it cannot fit

ImageLoader = Callable[[list[str]], dict[str, bytes]]


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote, and the parts an orchestrator shows inline (:func:`inline_markdown`).

    The paths are where the report was written (for a release, a staging folder that is gone once the
    release is published); ``ui_pngs`` holds the UI figures' bytes, so :meth:`ui_figures` and
    :func:`inline_markdown` work after that."""

    markdown: Path
    html: Path
    figures: tuple[Path, ...]  # every PNG, in report order
    ui_images: tuple[tuple[str, Path], ...]  # (alt text, PNG): funnel, cut score histograms, cut-off and sample grids
    funnel_table: str  # Markdown: the ingestion funnel (when given) and the selection funnel
    preview_table: str  # Markdown: the first rows of the release's random sample with their ranked scores
    ui_pngs: tuple[bytes, ...] = field(default=(), repr=False)  # the bytes of each of ui_images, in its order

    @property
    def paths(self) -> list[Path]:
        return [self.markdown, self.html, *self.figures]

    def ui_figures(self) -> list[tuple[str, Path, bytes]]:
        """(alt text, PNG path, PNG bytes) per UI figure: the bytes kept in memory, else read from the path."""
        if len(self.ui_pngs) == len(self.ui_images):
            return [(alt, path, png) for (alt, path), png in zip(self.ui_images, self.ui_pngs)]
        return [(alt, path, path.read_bytes()) for alt, path in self.ui_images]


def write_report(out: Path, *, title: str, pool: pl.DataFrame, selected_uids: pl.Series, funnel: list[dict],
                 cutoffs: dict[str, float], load_images: ImageLoader, manifest_summary: dict,
                 examples_per_grid: int = 16, ingestion: Mapping[str, Any] | None = None,
                 checks: Mapping[str, str] | None = None, provenance: Mapping[str, Any] | None = None,
                 extra_sections: Sequence[str] = ()) -> ReportResult:
    """Write ``out/report.md``, ``out/report.html`` and the figures under ``out/figures``.

    ``pool`` holds one row per scored pool sample (:data:`REPORT_SAMPLE_COLUMNS` plus float score columns),
    ``selected_uids`` the release's uids, ``funnel`` ``{"stage", "rows_in", "rows_out"}`` dicts in order,
    ``cutoffs`` the effective threshold per cut score (cut-offs on columns missing from the pool are
    listed but not drawn). ``load_images(uids)`` returns encoded images by uid; missing or undecodable
    ones get a placeholder cell. Optional sections: ``ingestion`` ``{"samples", "accepted",
    "quarantined": {reason code: count}}`` (plus ``"shards"`` and ``"shards_without_report"``) summed over
    the pool's shard reports;
    ``checks`` check name -> latest status; ``provenance`` scalar fields (git commit, created-at, ...)
    and ``"input_shards"``, the manifest's list of ``{"shard", "shard_id", "checksum", "samples"}``;
    ``extra_sections`` Markdown (headings, paragraphs, pipe tables) appended to both versions.
    """
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    flagged = pool.with_columns(selected=pl.col("uid").is_in(selected_uids.implode()))
    cut = [name for name in cutoffs if name in pool.columns]
    scores = cut + [name for name in _score_columns(pool) if name not in cut]
    sample = _random_sample(flagged.filter("selected"), RANDOM_SAMPLE)
    written: list[Path] = []
    with style.context(["default", STYLE]):  # independent of the user's matplotlibrc
        sections = [
            _manifest_section(manifest_summary, flagged, selected_uids),
            _provenance_section(provenance),
            _checks_section(checks),
            _ingestion_section(ingestion),
            _funnel_section(funnel, ingestion, figures, written),
            _scores_section(flagged, scores, cut, cutoffs, figures, written),
            _coverage_section(flagged, figures, written),
            _around_cutoffs_section(flagged, cut, cutoffs, load_images, figures, written),
            _random_sample_section(sample, scores, load_images, figures, written),
            _composition_section(flagged, figures, written),
            _examples_section(flagged, cut, load_images, examples_per_grid, figures, written),
            _duplicates_section(flagged, cutoffs, load_images, figures, written),
            *extra_sections,
        ]
    markdown = "\n\n".join([f"# {title}", *[s.strip() for s in sections if s.strip()]]) + "\n"
    report, page = out / "report.md", out / "report.html"
    report.write_text(markdown, encoding="utf-8")
    page.write_text(_html_page(title, markdown, out), encoding="utf-8")
    ui = tuple((path.stem.replace("_", " "), path) for path in written if _shown_inline(path))
    funnel_table = "\n\n".join(t for t in (_ingestion_table(ingestion), _funnel_table(funnel)) if t)
    preview = _sample_table(sample.head(PREVIEW_ROWS), scores[:PREVIEW_SCORES])
    return ReportResult(report, page, tuple(written), ui, funnel_table, preview,
                        ui_pngs=tuple(path.read_bytes() for _, path in ui))


def inline_markdown(result: ReportResult, max_bytes: int = INLINE_MAX_BYTES) -> str:
    """The funnel tables, the UI figures and the preview table as one Markdown string for Dagster's
    ``MetadataValue.md``: its UI renders ``data:image/png;base64`` images (not links relative to a report
    folder it cannot read), so each figure is embedded, re-encoded as a palette PNG and downscaled until
    the whole string is at most ``max_bytes`` (UTF-8); a figure that cannot fit is named instead. Only
    tables longer than ``max_bytes`` on their own exceed it."""
    head = f"### Funnel\n\n{result.funnel_table}" if result.funnel_table else ""
    tail = f"### Preview: random samples of the release\n\n{result.preview_table}"
    shown = result.ui_figures()
    budget = max_bytes - len(f"{head}\n\n{tail}\n".encode()) - INLINE_NOTE_BYTES * len(shown)
    figures = []
    for index, (alt, _, png) in enumerate(shown):
        share = budget // (len(shown) - index)
        uri = _data_uri(png, share - len(alt.encode()) - 8)
        entry = f"![{alt}]({uri})" if uri else f"({alt}: left out to stay under {max_bytes:,} bytes; see report.html)"
        figures.append(entry)
        budget += INLINE_NOTE_BYTES - len(entry.encode()) - 2  # this figure's reserve, freed, less what it took
    return "\n\n".join(part for part in (head, *figures, tail) if part) + "\n"


def _shown_inline(path: Path) -> bool:
    return path.name in ("funnel.png", "score_histograms.png", "random_sample.png") or path.name.startswith(
        "around_cutoff_")


def _score_columns(pool: pl.DataFrame) -> list[str]:
    """Float columns besides the sample columns that hold at least one finite value, in pool order."""
    floats = [name for name, dtype in pool.schema.items() if dtype.is_float() and name not in REPORT_SAMPLE_COLUMNS]
    present = pool.select(pl.col(floats).is_finite().any()).row(0, named=True) if floats else {}
    return [name for name in floats if present[name]]


def _random_sample(rows: pl.DataFrame, size: int) -> pl.DataFrame:
    """The ``size`` rows with the smallest keyed hash of their uid, in that order: uniform, yet the same on
    every run and whatever the row order (no clock, no random state), and the same uids across releases."""
    picked = heapq.nsmallest(size, rows["uid"].to_list(), key=_sample_key)
    order = pl.DataFrame({"uid": picked, "_order": range(len(picked))}, schema={"uid": pl.String,
                                                                               "_order": pl.Int64})
    return rows.join(order, on="uid").sort("_order").drop("_order")


def _sample_key(uid: str) -> tuple[bytes, str]:
    return hashlib.blake2b(uid.encode(), digest_size=8, key=SAMPLE_KEY).digest(), uid


# -- sections: each returns its Markdown and appends the figures it wrote to ``written`` ----------

def _manifest_section(summary: Mapping[str, Any], flagged: pl.DataFrame, selected_uids: pl.Series) -> str:
    rows = [(_cell(key), _cell(value)) for key, value in _flatten(summary)]
    matched = int(flagged["selected"].sum())
    rows += [("pool rows in the figures", str(flagged.height)),
             ("selected rows found in pool", f"{matched} of {selected_uids.len()}")]
    return "## Release\n\n" + _table(("field", "value"), rows)


def _provenance_section(provenance: Mapping[str, Any] | None) -> str:
    """What the release was made from: scalar fields, then the input shard count and the first shards."""
    if provenance is None:
        return ""
    fields = {key: value for key, value in provenance.items() if key != "input_shards"}
    rows = [(_cell(key), _cell("–" if value is None else value)) for key, value in _flatten(fields)]
    parts = ["## Provenance"]
    shards = list(provenance.get("input_shards") or [])
    if "input_shards" in provenance:
        samples = sum(shard.get("samples") or 0 for shard in shards)
        rows.append(("input shards", f"{len(shards):,} ({samples:,} scored samples)"))
    parts.append(_table(("field", "value"), rows))
    if shards:
        shown = [tuple(_cell("–" if shard.get(key) is None else shard[key]) for key in
                       ("shard", "shard_id", "checksum", "samples")) for shard in shards[:PROVENANCE_SHARDS]]
        more = f" (the first {PROVENANCE_SHARDS} of {len(shards):,}; all are listed in manifest.json)" \
            if len(shards) > PROVENANCE_SHARDS else ""
        parts += [f"Input shards{more}:", _table(("shard", "shard id", "checksum", "samples"), shown)]
    return "\n\n".join(parts)


def _checks_section(checks: Mapping[str, str] | None) -> str:
    """The latest status of each data-quality check, as the orchestrator recorded it for this release."""
    if checks is None:
        return ""
    if not checks:
        return "## Data-quality checks\n\nNo check results were recorded."
    counts: dict[str, int] = {}
    for status in checks.values():
        counts[str(status)] = counts.get(str(status), 0) + 1
    summary = ", ".join(f"{count} {_cell(status)}" for status, count in sorted(counts.items()))
    rows = [(_cell(name), _cell(status)) for name, status in sorted(checks.items())]
    return f"## Data-quality checks\n\n{len(checks)} checks: {summary}.\n\n" + _table(("check", "status"), rows)


def _ingestion_section(ingestion: Mapping[str, Any] | None) -> str:
    if ingestion is None:
        return ""
    samples, accepted = int(ingestion["samples"]), int(ingestion["accepted"])
    quarantined = sum(int(n) for n in ingestion.get("quarantined", {}).values())
    note = "" if samples == accepted + quarantined else (
        f"\n\nThe counts do not reconcile: {accepted:,} accepted + {quarantined:,} quarantined ≠ {samples:,}.")
    shards = f" in {int(ingestion['shards']):,} shards" if "shards" in ingestion else ""
    unread = int(ingestion.get("shards_without_report") or 0)
    if unread:
        note += (f"\n\n{unread:,} input shards have no validation report: their samples are not counted "
                 "here.")
    return (f"## Ingestion\n\nEvery sample the shards mention{shards}, before the pool: each is accepted or "
            f"quarantined with one reason code.\n\n{_ingestion_table(ingestion)}{note}")


def _ingestion_table(ingestion: Mapping[str, Any] | None) -> str:
    if ingestion is None:
        return ""
    samples = int(ingestion["samples"])
    rows = [(_cell(label), f"{count:,}", _percent(count, samples), _cell(why))
            for label, count, why in _ingestion_stages(ingestion)]
    return _table(("ingestion", "samples", "of shard samples", "why"), rows)


def _ingestion_stages(ingestion: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """Shard samples, the not-downloaded ones, the other quarantine reasons (largest first), accepted."""
    reasons = {str(reason): int(count) for reason, count in ingestion.get("quarantined", {}).items()}
    not_downloaded = reasons.pop(Reason.NOT_DOWNLOADED.value, 0)
    stages = [("samples in the shards", int(ingestion["samples"]), ""),
              ("not downloaded", not_downloaded, REASON_DESCRIPTIONS[Reason.NOT_DOWNLOADED])]
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        stages.append((f"quarantined: {reason}", count, _reason_description(reason)))
    stages.append(("accepted into the pool", int(ingestion["accepted"]), ""))
    return stages


def _reason_description(reason: str) -> str:
    """The code's description; none for a code this version does not know (reports of newer ingests)."""
    try:
        return REASON_DESCRIPTIONS.get(Reason(reason), "")
    except ValueError:
        return ""


def _funnel_table(funnel: Sequence[Mapping[str, Any]]) -> str:
    first = funnel[0]["rows_in"] if funnel else 0
    rows = [(_cell(s["stage"]), f"{s['rows_in']:,}", f"{s['rows_out']:,}", _percent(s["rows_out"], s["rows_in"]),
             _percent(s["rows_out"], first)) for s in funnel]
    return _table(("stage", "rows in", "rows out", "kept", "of input"), rows)


def _funnel_section(funnel: Sequence[Mapping[str, Any]], ingestion: Mapping[str, Any] | None, figures: Path,
                    written: list[Path]) -> str:
    """The selection funnel's table and bars; with ``ingestion``, the bars start at the shards' samples."""
    bars = [(str(s["stage"]), int(s["rows_out"])) for s in funnel]
    first = funnel[0]["rows_in"] if funnel else 0
    heading = f"Selection funnel (input {first:,} rows)"
    if ingestion is not None:
        stages = _ingestion_stages(ingestion)
        samples, not_downloaded = stages[0][1], stages[1][1]
        bars = [("samples in the shards", samples), ("downloaded", samples - not_downloaded),
                ("accepted into the pool", int(ingestion["accepted"]))] + bars
        first, heading = samples, f"Funnel from the shards ({samples:,} samples)"
    labels = [textwrap.fill(label, width=FUNNEL_LABEL_CHARS) for label, _ in bars]
    lines = sum(label.count("\n") + 1 for label in labels)
    figure = Figure(figsize=(MAX_WIDTH_PX / DPI, 0.3 * lines + 0.2 * len(bars) + 1.4), layout="constrained")
    axis = figure.subplots()
    counts = [count for _, count in bars]
    drawn = axis.barh(range(len(bars)), counts, color=SELECTED_COLOUR)
    axis.bar_label(drawn, labels=[f"{c:,} ({_percent(c, first)})" for c in counts], padding=3, fontsize=8)
    axis.set_yticks(range(len(bars)), labels)
    axis.invert_yaxis()
    axis.set(xlabel="rows out", title=heading)
    axis.margins(x=0.3)
    link = _save(figure, figures / "funnel.png", written)
    return f"## Funnel\n\n{_funnel_table(funnel)}\n\n![Selection funnel]({link})"


def _scores_section(flagged: pl.DataFrame, scores: Sequence[str], cut: Sequence[str], cutoffs: Mapping[str, float],
                    figures: Path, written: list[Path]) -> str:
    """The stats table of every score; histograms of the cut scores (all scores without any), then the rest."""
    missing = [name for name in cutoffs if name not in flagged.columns]
    note = f"\n\nCut-offs on columns not in the pool (not drawn): {', '.join(missing)}." if missing else ""
    if not scores:
        return "## Scores\n\nNo score columns in the pool." + note
    selected = flagged.filter("selected")
    rows = [(name, "" if cutoffs.get(name) is None else f"{cutoffs[name]:.4g}", *_stats(flagged[name]),
             *_stats(selected[name])) for name in scores]
    header = ("score", "cut-off", "pool n", "pool median", "pool missing", "selected n", "selected median",
              "selected missing")
    drawn = list(cut) or list(scores)
    rest = [name for name in scores if name not in drawn]
    links = [_histograms(flagged, drawn, cutoffs, figures / "score_histograms.png", written)]
    if rest:
        links.append(_histograms(flagged, rest, cutoffs, figures / "score_histograms_other.png", written))
    images = "\n\n".join(f"![Score histograms, pool vs selected]({link})" for link in links)
    return f"## Scores\n\n{_table(header, rows)}{note}\n\n{images}"


def _histograms(flagged: pl.DataFrame, scores: Sequence[str], cutoffs: Mapping[str, float], path: Path,
                written: list[Path]) -> str:
    histograms = score_histograms(flagged, scores, bins=HIST_BINS)
    selected = flagged.filter("selected")
    figure, axes = panel_grid(len(scores), columns=2, size=(3.9, 2.6))
    for axis, name in zip(axes, scores):
        part = histograms.filter(pl.col("column") == name).sort("bin")
        edges = np.append(part["lower"].to_numpy(), part["upper"][-1])
        chosen, _ = np.histogram(_finite(selected[name]), bins=edges)
        axis.stairs(part["count"].to_numpy(), edges, fill=True, color=POOL_COLOUR, alpha=0.6, label="pool")
        axis.stairs(chosen, edges, fill=True, color=SELECTED_COLOUR, alpha=0.7, label="selected")
        cutoff = cutoffs.get(name)
        if cutoff is not None and math.isfinite(cutoff):
            axis.axvline(cutoff, color="tab:red", linestyle="--", label=f"cut-off {cutoff:.4g}")
        axis.set(title=name, ylabel="samples")
        axis.legend(fontsize="x-small")
    return _save(figure, path, written)


def _around_cutoffs_section(flagged: pl.DataFrame, cut: Sequence[str], cutoffs: Mapping[str, float],
                            load_images: ImageLoader, figures: Path, written: list[Path]) -> str:
    """Per finite cut-off, the pool samples just below and at or above it: what the threshold decides on."""
    drawn = [name for name in cut if math.isfinite(cutoffs[name])]
    if not drawn:
        return ""
    parts = [("## Around the cut-offs\n\nThe pool samples closest to each cut-off: the grid's top row lies just "
              "below it, the bottom row at or above it; a green frame and a ✓ mark the selected ones.")]
    for name in drawn:
        below, above = _around(flagged, name, cutoffs[name], AROUND_CUTOFF)
        cells = [None] * (AROUND_CUTOFF - below.height) + list(below.iter_rows(named=True))
        cells += list(above.iter_rows(named=True)) + [None] * (AROUND_CUTOFF - above.height)
        titles = [_cell_title(row, name) for row in cells]
        link = _grid(cells, titles, load_images, figures / f"around_cutoff_{_slug(name)}.png", written,
                     heading=f"{name}: cut-off {cutoffs[name]:.4g} (top: below, bottom: at or above)")
        table = _sample_table(pl.concat([below, above]), [name], side=cutoffs[name])
        parts.append(f"### {name} (cut-off {cutoffs[name]:.4g})\n\n![Around the {name} cut-off]({link})\n\n{table}")
    return "\n\n".join(parts)


def _around(flagged: pl.DataFrame, score: str, cutoff: float, count: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``count`` largest values below ``cutoff`` and the ``count`` smallest at or above it, ascending."""
    scored = flagged.filter(pl.col(score).is_finite())
    below = scored.filter(pl.col(score) < cutoff).top_k(count, by=[score, "uid"], reverse=[False, True])
    above = scored.filter(pl.col(score) >= cutoff).bottom_k(count, by=[score, "uid"])
    return below.sort([score, "uid"]), above.sort([score, "uid"])


def _random_sample_section(sample: pl.DataFrame, scores: Sequence[str], load_images: ImageLoader, figures: Path,
                           written: list[Path]) -> str:
    if sample.is_empty():
        return ""
    score = scores[0] if scores else None
    cells = list(sample.iter_rows(named=True))
    link = _grid(cells, [_cell_title(row, score) for row in cells], load_images, figures / "random_sample.png",
                 written, heading=f"{sample.height} random samples of the release")
    return (f"## Random sample of the release\n\n{sample.height} selected samples picked by a keyed hash of their "
            f"uid (the same on every run).\n\n![Random sample]({link})\n\n"
            + _sample_table(sample, scores[:PREVIEW_SCORES]))


def _sample_table(rows: pl.DataFrame, scores: Sequence[str], side: float | None = None) -> str:
    """uid, caption (escaped: it is untrusted text) and scores per row; with ``side``, which side of that
    cut-off the first score lies on."""
    header = ["uid", *(["side"] if side is not None else []), "in release", "caption", *scores]
    body = []
    for row in rows.iter_rows(named=True):
        values = [row.get(name) for name in scores]
        where = ["at or above" if values[0] >= side else "below"] if side is not None else []
        body.append((_cell(row["uid"]), *where, "✓" if row["selected"] else "–",
                     _md_text(row.get("caption"), TABLE_CAPTION_CHARS), *(_number(v) for v in values)))
    return _table(header, body)


def _coverage_section(flagged: pl.DataFrame, figures: Path, written: list[Path]) -> str:
    """Pool caption n-gram coverage per ``kl_text`` decile beside the share of each decile selected."""
    if "kl_text" not in flagged.columns:
        return ""
    coverage = kl_decile_ngram_coverage(flagged, "kl_text", ns=(1, 2))
    if coverage.is_empty():
        return ""
    # the same rows and decile assignment as kl_decile_ngram_coverage
    shares = (
        flagged.lazy()
        .select(pl.col("kl_text").cast(pl.Float64).fill_nan(None).alias("kl"), "caption", "selected")
        .drop_nulls(["kl", "caption"])
        .with_columns(decile=_quantile_group(pl.col("kl"), 10))
        .group_by("decile").agg(pl.col("selected").mean().alias("share"))
        .sort("decile").collect()
    )
    figure, axes = panel_grid(3, size=(2.6, 2.8))
    for axis, n in zip(axes, (1, 2)):
        part = coverage.filter(pl.col("n") == n)
        for k in part["k"].unique().sort().to_list():
            line = part.filter(pl.col("k") == k).sort("decile")
            axis.plot(line["decile"].to_numpy(), line["coverage"].to_numpy(), marker="o", markersize=3, label=f"top {k}")
        axis.set(title=f"pool {n}-gram coverage", xlabel="kl_text decile (1 = lowest)", ylabel="coverage",
                 ylim=(0, 1.02))
        axis.legend(fontsize="x-small")
    axes[2].bar(shares["decile"].to_numpy(), shares["share"].to_numpy(), color=SELECTED_COLOUR)
    axes[2].set(title="share of decile selected", xlabel="kl_text decile (1 = lowest)", ylabel="selected",
                ylim=(0, 1.02))
    for axis in axes:
        axis.set_xticks(shares["decile"].to_list())
    link = _save(figure, figures / "kl_text_decile_ngram_coverage.png", written)
    return ("### Caption n-gram coverage by kl_text decile\n\nHigh coverage by the top-K n-grams marks repetitive, "
            "generic captions; the right panel shows how much of each decile the release kept.\n\n"
            f"![kl_text decile n-gram coverage]({link})")


def _composition_section(flagged: pl.DataFrame, figures: Path, written: list[Path]) -> str:
    languages = _language_shares(flagged)
    figure = Figure(figsize=(7.0, 0.3 * languages.height + 1.5), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(languages.height)
    axis.barh(positions - 0.2, languages["pool_share"].to_numpy(), height=0.4, color=POOL_COLOUR, label="pool")
    axis.barh(positions + 0.2, languages["selected_share"].to_numpy(), height=0.4, color=SELECTED_COLOUR,
              label="selected")
    axis.set_yticks(positions, languages["language"].to_list())
    axis.invert_yaxis()
    axis.set(xlabel="share of rows", title="Language")
    axis.legend(fontsize="small")
    language_link = _save(figure, figures / "composition_language.png", written)

    pool_words, selected_words = _finite(flagged["caption_words"]), _finite(flagged.filter("selected")["caption_words"])
    top = max(1, math.ceil(np.quantile(pool_words, 0.99))) if pool_words.size else 1
    step = max(1, math.ceil(top / HIST_BINS))
    edges = np.arange(0, top + step + 1, step) - 0.5
    figure = Figure(figsize=(7.0, 3.0), layout="constrained")
    axis = figure.subplots()
    for values, fill, colour, label in ((pool_words, True, POOL_COLOUR, "pool"),
                                        (selected_words, False, SELECTED_COLOUR, "selected")):
        counts, _ = np.histogram(np.minimum(values, top + step - 1), bins=edges)
        axis.stairs(counts / max(1, values.size), edges, fill=fill, color=colour, linewidth=1.5, label=label)
    axis.set(xlabel=f"caption words (last bin: {top + step - 1} or more)", ylabel="share of rows",
             title="Caption length")
    axis.legend(fontsize="small")
    length_link = _save(figure, figures / "composition_caption_length.png", written)

    language_rows = [(_cell(r["language"]), f"{r['pool']:,}", f"{r['pool_share']:.1%}", f"{r['selected']:,}",
                      f"{r['selected_share']:.1%}") for r in languages.iter_rows(named=True)]
    length_rows = [(label, *_stats(flagged[column]), *_stats(flagged.filter("selected")[column]))
                   for label, column in (("caption words", "caption_words"), ("caption chars", "caption_chars"))]
    return ("## Composition\n\n"
            + _table(("language", "pool", "pool share", "selected", "selected share"), language_rows)
            + f"\n\n![Language composition]({language_link})\n\n"
            + _table(("caption length", "pool n", "pool median", "pool missing", "selected n", "selected median",
                      "selected missing"), length_rows)
            + f"\n\n![Caption length]({length_link})")


def _language_shares(flagged: pl.DataFrame) -> pl.DataFrame:
    """Rows and shares per language, pool vs selected: the top languages of the pool, then ``other``."""
    counts = (
        flagged.group_by(pl.col("language").fill_null("unknown"))
        .agg(pool=pl.len(), selected=pl.col("selected").sum())
        .sort(["pool", "language"], descending=[True, False])
    )
    head, tail = counts.head(TOP_LANGUAGES), counts.slice(TOP_LANGUAGES)
    if not tail.is_empty():
        head = pl.concat([head, pl.DataFrame({"language": ["other"], "pool": [tail["pool"].sum()],
                                              "selected": [tail["selected"].sum()]}, schema=head.schema)])
    return head.with_columns(pool_share=pl.col("pool") / pl.max_horizontal(pl.col("pool").sum(), 1),
                             selected_share=pl.col("selected") / pl.max_horizontal(pl.col("selected").sum(), 1))


def _examples_section(flagged: pl.DataFrame, cut: Sequence[str], load_images: ImageLoader, per_grid: int,
                      figures: Path, written: list[Path]) -> str:
    if not cut or per_grid <= 0:
        return ""
    parts = [("## Examples\n\nPool samples with the highest and lowest values of each cut score; a green frame "
              "and a ✓ mark the selected ones.")]
    for name in cut:
        scored = flagged.filter(pl.col(name).is_finite())
        top = scored.top_k(per_grid, by=[name, "uid"], reverse=[False, True])
        top = top.sort([name, "uid"], descending=[True, False])
        bottom = scored.bottom_k(per_grid, by=[name, "uid"]).sort([name, "uid"])
        links = []
        for side, rows in (("top", top), ("bottom", bottom)):
            cells = list(rows.iter_rows(named=True))
            path = figures / f"examples_{side}_{_slug(name)}.png"
            links.append(_grid(cells, [_cell_title(row, name) for row in cells], load_images, path, written))
        parts.append(f"### {name}\n\nHighest:\n\n![Highest {name}]({links[0]})\n\n"
                     f"Lowest:\n\n![Lowest {name}]({links[1]})")
    return "\n\n".join(parts)


DUPLICATE_GROUPS_SHOWN = 6


def _duplicates_section(flagged: pl.DataFrame, cutoffs: Mapping[str, float], load_images: ImageLoader,
                        figures: Path, written: list[Path]) -> str:
    """Groups and contamination flags in the pool and in the release; the largest groups that lost members,
    the kept representative first; the contaminated pool samples."""
    kinds = [name for name in ("dup_image", "dup_caption", "dup_near") if name in flagged.columns]
    if not kinds:
        return ""
    rows = []
    for column in kinds:
        members = flagged.filter(pl.col(column).is_not_null())
        kept = members.filter("selected")
        rows.append((column.removeprefix("dup_"), f"{members[column].n_unique():,}", f"{members.height:,}",
                     f"{kept.height:,}", f"{kept.height - kept[column].n_unique():,}"))
    table = _table(("kind", "groups in pool", "members in pool", "members in release",
                    "duplicates left in release"), rows)
    parts = [f"## Duplicates and contamination\n\n{table}"]
    score = next(iter(cutoffs), None)
    component = pl.coalesce([pl.col(name) for name in kinds])
    grouped = flagged.filter(component.is_not_null()).with_columns(group=component)
    shown = (grouped.group_by("group").agg(pl.len().alias("members"), pl.col("selected").sum().alias("kept"))
             .filter(pl.col("kept") >= 1, pl.col("members") > pl.col("kept"))
             .sort("members", "group", descending=[True, False]).head(DUPLICATE_GROUPS_SHOWN))
    if shown.height:
        ordered = (grouped.join(shown.select("group", "members"), on="group")
                   .sort(pl.col("members"), "group", pl.col("selected"), "uid", descending=[True, False, True, False]))
        path = figures / "duplicates_removed.png"
        link = _group_grid(ordered, score, load_images, path, written)
        parts.append(f"The largest groups that lost members, one per row: the kept representative (green frame) "
                     f"first, then up to {GRID_COLUMNS - 1} removed copies.\n\n![Removed duplicates]({link})")
    if "contaminated_by" in flagged.columns:
        dirty = flagged.filter(pl.col("contaminated_by").list.len() > 0)
        parts.append(f"Evaluation-set near copies: {dirty.height:,} in the pool, "
                     f"{int(dirty['selected'].sum()):,} in the release.")
        if dirty.height:
            path = figures / "contaminated.png"
            sample = dirty.sort("uid").head(GRID_COLUMNS * 2).with_columns(
                group=pl.col("contaminated_by").list.join(","))
            parts.append(f"![Contaminated pool samples]({_group_grid(sample, score, load_images, path, written)})")
    return "\n\n".join(parts)


def _group_grid(rows: pl.DataFrame, score: str | None, load_images: ImageLoader, path: Path,
                written: list[Path]) -> str:
    """One grid row per ``group`` (at most ``GRID_COLUMNS`` members each), in the order given; a red frame
    marks the removed members."""
    cells: list[dict[str, Any] | None] = []
    for group in rows.partition_by("group", maintain_order=True):
        members = list(group.head(GRID_COLUMNS).iter_rows(named=True))
        cells += members + [None] * (GRID_COLUMNS - len(members))
    titles = []
    for row in cells:
        value = row.get(score) if row is not None and score else None
        titles.append("" if row is None else ("kept" if row["selected"] else "removed") + (
            f" {value:.3g}" if isinstance(value, float) and math.isfinite(value) else ""))
    return _grid(cells, titles, load_images, path, written, unselected=("tab:red", 3.0))


def _grid(cells: Sequence[Mapping[str, Any] | None], titles: Sequence[str], load_images: ImageLoader, path: Path,
          written: list[Path], *, heading: str | None = None, unselected: tuple[str, float] = ("0.75", 1.0)) -> str:
    """Thumbnails ``GRID_COLUMNS`` to a row (:data:`MAX_WIDTH_PX` wide at most), each with its title, a
    wrapped caption and a green frame when selected; ``None`` cells stay blank, missing images get a
    placeholder. Loads the images of these cells only."""
    uids = [cell["uid"] for cell in cells if cell is not None]
    images = load_images(uids) if uids else {}
    figure, axes = panel_grid(max(1, len(cells)), columns=GRID_COLUMNS, size=CELL)
    if heading:
        figure.suptitle(heading, fontsize=9, parse_math=False)
    for axis, cell, title in zip(axes, cells, titles):
        if cell is None:
            axis.set_axis_off()
            continue
        thumbnail = _thumbnail(images.get(cell["uid"]))
        if thumbnail is None:
            axis.imshow(np.full((THUMB, THUMB, 3), 225, dtype=np.uint8))
            axis.text(THUMB / 2, THUMB / 2, "no image", ha="center", va="center", color="0.35", fontsize=8)
        else:
            axis.imshow(thumbnail)
        colour, width = ("tab:green", 3.0) if cell["selected"] else unselected
        for spine in axis.spines.values():
            spine.set(color=colour, linewidth=width)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(title, fontsize=7, parse_math=False)
        axis.set_xlabel(_caption(cell["caption"]), fontsize=6.5, parse_math=False)
    if not cells:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no scored samples", ha="center", va="center")
    return _save(figure, path, written)


def _cell_title(row: Mapping[str, Any] | None, score: str | None) -> str:
    """``✓`` when selected, then the score and its value."""
    if row is None:
        return ""
    mark = "✓ " if row["selected"] else ""
    return f"{mark}{score} {_number(row.get(score))}" if score else mark.strip()


# -- the HTML page: the Markdown this module writes, rendered with every image embedded -------------

PAGE_STYLE = ("body{font-family:'DejaVu Sans',Arial,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;"
              "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;"
              "padding:2px 6px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;height:auto}"
              "td{overflow-wrap:anywhere}.num{text-align:right}")
# no script, no network: the page works offline and a caption that slipped through could not load anything
PAGE_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
IMAGE_BLOCK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
SEPARATOR_ROW = re.compile(r"\|(\s*:?-+:?\s*\|)+")
ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")


def _html_page(title: str, markdown: str, folder: Path) -> str:
    """A self-contained page of ``markdown`` (the subset written here: headings, paragraphs, pipe tables and
    lone images of files under ``folder``, which are embedded as ``data:`` URIs); all text is escaped."""
    body = "\n".join(_html_blocks(markdown, folder))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{PAGE_POLICY}">\n'
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n"
            f"</body>\n</html>\n")


def _html_blocks(markdown: str, folder: Path) -> Iterator[str]:
    for block in markdown.split("\n\n"):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        while lines and lines[0].startswith("#"):
            level = min(len(lines[0]) - len(lines[0].lstrip("#")), 6)
            yield f"<h{level}>{_html_text(lines.pop(0)[level:].strip())}</h{level}>"
        if not lines:
            continue
        image = IMAGE_BLOCK.fullmatch(lines[0]) if len(lines) == 1 else None
        if image is not None and _is_figure(folder, image[2]):
            alt = html.escape(ESCAPED.sub(r"\1", image[1]))
            uri = "data:image/png;base64," + base64.b64encode((folder / image[2]).read_bytes()).decode("ascii")
            yield f'<p><img alt="{alt}" src="{uri}"></p>'
        elif len(lines) >= 2 and all(line.startswith("|") for line in lines) and SEPARATOR_ROW.fullmatch(lines[1]):
            yield _html_table(lines)
        else:
            yield "<p>" + "<br>\n".join(_html_text(line) for line in lines) + "</p>"


def _is_figure(folder: Path, link: str) -> bool:
    """A PNG this report wrote (nothing outside ``folder`` is read into the page)."""
    path = (folder / link).resolve()
    return path.suffix == ".png" and path.is_file() and path.is_relative_to(folder.resolve())


def _html_table(lines: Sequence[str]) -> str:
    right = [cell.endswith(":") for cell in _row_cells(lines[1])]

    def row(line: str, tag: str) -> str:
        cells = _row_cells(line)
        opens = [f'<{tag} class="num">' if i < len(right) and right[i] else f"<{tag}>" for i in range(len(cells))]
        return "<tr>" + "".join(f"{o}{_html_text(cell)}</{tag}>" for o, cell in zip(opens, cells)) + "</tr>"

    body = "\n".join(row(line, "td") for line in lines[2:])
    return f"<table>\n<thead>{row(lines[0], 'th')}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _row_cells(line: str) -> list[str]:
    """The cells of a pipe-table row; a backslash-escaped pipe stays in its cell."""
    cells, current, characters = [], [], iter(line.strip().removeprefix("|"))
    for character in characters:
        if character == "\\":
            current.append(character + next(characters, ""))
        elif character == "|":
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(character)
    if "".join(current).strip():
        cells.append("".join(current).strip())
    return cells


def _html_text(text: str) -> str:
    """Markdown text as HTML text: backslash escapes resolved, then everything escaped (nothing is markup)."""
    return html.escape(ESCAPED.sub(r"\1", text))


# -- inline images ---------------------------------------------------------------------------------

def _data_uri(png: bytes, limit: int) -> str | None:
    """The PNG ``png`` as a palette PNG ``data:`` URI of at most ``limit`` characters, at the largest of
    :data:`INLINE_SCALES` that fits; None when even the smallest does not."""
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    for scale in INLINE_SCALES:
        width = max(1, round(min(rgb.width, MAX_WIDTH_PX) * scale))
        height = max(1, round(rgb.height * width / rgb.width))
        small = rgb.resize((width, height), Image.Resampling.LANCZOS) if width != rgb.width else rgb
        buffer = io.BytesIO()
        small.quantize(256, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        if len(uri) <= limit:
            return uri
    return None


# -- helpers ------------------------------------------------------------------------------------

def _thumbnail(data: bytes | None) -> np.ndarray | None:
    """A ``THUMB`` px square RGB array with the EXIF-upright image centred on it; None if not decodable."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMB, THUMB))
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    upright.thumbnail((THUMB, THUMB))
    canvas = Image.new("RGB", (THUMB, THUMB), (245, 245, 245))
    canvas.paste(upright, ((THUMB - upright.width) // 2, (THUMB - upright.height) // 2))
    return np.asarray(canvas)


def _caption(caption: str | None) -> str:
    """At most ``CAPTION_LINES`` wrapped lines, glyphs the font lacks shown as ``?``."""
    text = " ".join((caption or "").split())
    lines = textwrap.wrap(_printable(text), CAPTION_WIDTH, max_lines=CAPTION_LINES, placeholder=" …")
    return "\n".join(lines) or "(no caption)"


@functools.cache
def _font() -> FT2Font:
    return FT2Font(findfont(FontProperties(family=FONT), fallback_to_default=False))


def _printable(text: str) -> str:
    font = _font()
    return "".join(c if font.get_char_index(ord(c)) else "?" for c in text)


def _finite(values: pl.Series) -> np.ndarray:
    return values.cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()


def _stats(values: pl.Series) -> tuple[str, str, str]:
    """Count of finite values, their median and the count of null/NaN values, formatted."""
    finite = _finite(values)
    median = f"{float(np.median(finite)):.4g}" if finite.size else "–"
    return f"{finite.size:,}", median, f"{values.len() - finite.size:,}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _save(figure: Figure, path: Path, written: list[Path]) -> str:
    """Save without metadata (byte-identical reruns); returns the link relative to the report."""
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    written.append(path)
    return f"{path.parent.name}/{path.name}"


def _flatten(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, line breaks flattened."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _md_text(text: str | None, limit: int) -> str:
    """Untrusted text (a caption) as one Markdown table cell that renders literally: whitespace flattened,
    cut to ``limit`` characters, and every character Markdown or HTML could read as markup (links, images,
    tags, entities, emphasis, math, pipes) backslash-escaped."""
    flat = " ".join((text or "").split())
    if len(flat) > limit:
        flat = flat[:limit - 1] + "…"
    return re.sub(r"([\\`*_\[\]<>!|&~#()$])", r"\\\1", flat) or "(no caption)"


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
