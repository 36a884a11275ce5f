"""Release report: a Markdown page with PNG figures on what a release kept from its pool.

:func:`write_report` writes ``report.md`` and ``figures/*.png``: the selection funnel, score histograms
(pool vs selected, with the recipe's cut-offs), caption n-gram coverage by ``kl_text`` decile, example
grids of the highest and lowest scored pool samples per cut score, and language and caption-length
composition. Figures use matplotlib's object API under a fixed style and are saved without metadata,
so the same inputs give byte-identical files. Only the grid examples' images are loaded.
"""

from __future__ import annotations

import functools
import io
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
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

# the sample columns of a report's pool frame that are not scores (every other float column is one)
REPORT_SAMPLE_COLUMNS = ("uid", "shard", "key", "caption", "language", "caption_words", "caption_chars", "width",
                         "height")
FONT = "DejaVu Sans"
STYLE = {"font.family": [FONT], "font.size": 9.0, "axes.titlesize": 10.0}
DPI = 100
FUNNEL_LABEL_CHARS = 48  # stage labels wrap so the bars keep their width
THUMB = 96
GRID_COLUMNS = 8
CAPTION_WIDTH, CAPTION_LINES = 24, 3
TOP_LANGUAGES = 10
HIST_BINS = 40
POOL_COLOUR, SELECTED_COLOUR = "0.6", "tab:blue"

ImageLoader = Callable[[list[str]], dict[str, bytes]]


def write_report(out: Path, *, title: str, pool: pl.DataFrame, selected_uids: pl.Series, funnel: list[dict],
                 cutoffs: dict[str, float], load_images: ImageLoader, manifest_summary: dict,
                 examples_per_grid: int = 16) -> list[Path]:
    """Write ``out/report.md`` and its figures under ``out/figures``; returns the written paths.

    ``pool`` holds one row per scored pool sample (:data:`REPORT_SAMPLE_COLUMNS` plus float score columns),
    ``selected_uids`` the release's uids, ``funnel`` ``{"stage", "rows_in", "rows_out"}`` dicts in order,
    ``cutoffs`` the effective threshold per cut score (cut-offs on columns missing from the pool are
    listed but not drawn). ``load_images(uids)`` returns encoded images by uid; missing or undecodable
    ones get a placeholder cell.
    """
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    flagged = pool.with_columns(selected=pl.col("uid").is_in(selected_uids.implode()))
    cut = [name for name in cutoffs if name in pool.columns]
    scores = cut + [name for name in _score_columns(pool) if name not in cut]
    written: list[Path] = []
    with style.context(["default", STYLE]):  # independent of the user's matplotlibrc
        sections = [
            _manifest_section(manifest_summary, flagged, selected_uids),
            _funnel_section(funnel, figures, written),
            _scores_section(flagged, scores, cutoffs, figures, written),
            _coverage_section(flagged, figures, written),
            _composition_section(flagged, figures, written),
            _examples_section(flagged, cut, load_images, examples_per_grid, figures, written),
            _duplicates_section(flagged, cutoffs, load_images, figures, written),
        ]
    report = out / "report.md"
    report.write_text("\n\n".join([f"# {title}", *[s for s in sections if s]]) + "\n", encoding="utf-8")
    return [report, *written]


def _score_columns(pool: pl.DataFrame) -> list[str]:
    """Float columns besides the sample columns that hold at least one finite value, in pool order."""
    floats = [name for name, dtype in pool.schema.items() if dtype.is_float() and name not in REPORT_SAMPLE_COLUMNS]
    present = pool.select(pl.col(floats).is_finite().any()).row(0, named=True) if floats else {}
    return [name for name in floats if present[name]]


# -- sections: each returns its Markdown and appends the figures it wrote to ``written`` ----------

def _manifest_section(summary: Mapping[str, Any], flagged: pl.DataFrame, selected_uids: pl.Series) -> str:
    rows = [(_cell(key), _cell(value)) for key, value in _flatten(summary)]
    matched = int(flagged["selected"].sum())
    rows += [("pool rows in the figures", str(flagged.height)),
             ("selected rows found in pool", f"{matched} of {selected_uids.len()}")]
    return "## Release\n\n" + _table(("field", "value"), rows)


def _funnel_section(funnel: Sequence[Mapping[str, Any]], figures: Path, written: list[Path]) -> str:
    first = funnel[0]["rows_in"] if funnel else 0
    rows = [(_cell(s["stage"]), f"{s['rows_in']:,}", f"{s['rows_out']:,}", _percent(s["rows_out"], s["rows_in"]),
             _percent(s["rows_out"], first)) for s in funnel]
    labels = [textwrap.fill(str(s["stage"]), width=FUNNEL_LABEL_CHARS) for s in funnel]
    lines = sum(label.count("\n") + 1 for label in labels)
    figure = Figure(figsize=(10.0, 0.3 * lines + 0.2 * len(funnel) + 1.4), layout="constrained")
    axis = figure.subplots()
    counts = [s["rows_out"] for s in funnel]
    bars = axis.barh(range(len(funnel)), counts, color=SELECTED_COLOUR)
    axis.bar_label(bars, labels=[f"{c:,} ({_percent(c, first)})" for c in counts], padding=3, fontsize=8)
    axis.set_yticks(range(len(funnel)), labels)
    axis.invert_yaxis()
    axis.set(xlabel="rows out", title=f"Selection funnel (input {first:,} rows)")
    axis.margins(x=0.25)
    link = _save(figure, figures / "funnel.png", written)
    table = _table(("stage", "rows in", "rows out", "kept", "of input"), rows)
    return f"## Funnel\n\n{table}\n\n![Selection funnel]({link})"


def _scores_section(flagged: pl.DataFrame, scores: Sequence[str], cutoffs: Mapping[str, float], figures: Path,
                    written: list[Path]) -> str:
    missing = [name for name in cutoffs if name not in flagged.columns]
    note = f"\n\nCut-offs on columns not in the pool (not drawn): {', '.join(missing)}." if missing else ""
    if not scores:
        return "## Scores\n\nNo score columns in the pool." + note
    histograms = score_histograms(flagged, scores, bins=HIST_BINS)
    selected = flagged.filter("selected")
    figure, axes = panel_grid(len(scores), size=(4.0, 2.8))
    rows = []
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
        rows.append((name, "" if cutoff is None else f"{cutoff:.4g}", *_stats(flagged[name]), *_stats(selected[name])))
    link = _save(figure, figures / "score_histograms.png", written)
    header = ("score", "cut-off", "pool n", "pool median", "pool missing", "selected n", "selected median",
              "selected missing")
    return (f"## Scores\n\n{_table(header, rows)}{note}\n\n![Score histograms, pool vs selected]({link})")


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
    figure, axes = panel_grid(3, size=(4.0, 3.0))
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
            path = figures / f"examples_{side}_{_slug(name)}.png"
            links.append(_example_grid(rows, name, load_images, path, written))
        parts.append(f"### {name}\n\nHighest:\n\n![Highest {name}]({links[0]})\n\n"
                     f"Lowest:\n\n![Lowest {name}]({links[1]})")
    return "\n\n".join(parts)


def _example_grid(rows: pl.DataFrame, score: str, load_images: ImageLoader, path: Path, written: list[Path]) -> str:
    """Thumbnails with the score, selection flag and a wrapped caption under each; placeholders where missing."""
    uids = rows["uid"].to_list()
    images = load_images(uids) if uids else {}
    figure, axes = panel_grid(max(1, rows.height), columns=GRID_COLUMNS, size=(1.55, 2.3))
    for axis, row in zip(axes, rows.iter_rows(named=True)):
        thumbnail = _thumbnail(images.get(row["uid"]))
        if thumbnail is None:
            axis.imshow(np.full((THUMB, THUMB, 3), 225, dtype=np.uint8))
            axis.text(THUMB / 2, THUMB / 2, "no image", ha="center", va="center", color="0.35", fontsize=8)
        else:
            axis.imshow(thumbnail)
        colour = "tab:green" if row["selected"] else "0.75"
        for spine in axis.spines.values():
            spine.set(color=colour, linewidth=3 if row["selected"] else 1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"{'✓ ' if row['selected'] else ''}{score} {row[score]:.4g}", fontsize=7, parse_math=False)
        axis.set_xlabel(_caption(row["caption"]), fontsize=6.5, parse_math=False)
    if rows.is_empty():
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no scored samples", ha="center", va="center")
    return _save(figure, path, written)


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
                     f"first, then the removed copies.\n\n![Removed duplicates]({link})")
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
    """One grid row per ``group`` (at most ``GRID_COLUMNS`` members each), in the order given."""
    groups = rows.partition_by("group", maintain_order=True)
    images = load_images(rows["uid"].to_list())
    figure, axes = panel_grid(len(groups) * GRID_COLUMNS, columns=GRID_COLUMNS, size=(1.55, 2.3))
    for index, group in enumerate(groups):
        cells = axes[index * GRID_COLUMNS:(index + 1) * GRID_COLUMNS]
        for axis, row in zip(cells, group.head(GRID_COLUMNS).iter_rows(named=True)):
            thumbnail = _thumbnail(images.get(row["uid"]))
            axis.imshow(thumbnail if thumbnail is not None else np.full((THUMB, THUMB, 3), 225, dtype=np.uint8))
            colour = "tab:green" if row["selected"] else "tab:red"
            for spine in axis.spines.values():
                spine.set(color=colour, linewidth=3)
            axis.set_xticks([])
            axis.set_yticks([])
            value = row.get(score) if score else None
            title = ("kept" if row["selected"] else "removed") + (
                f" {value:.3g}" if isinstance(value, float) and math.isfinite(value) else "")
            axis.set_title(title, fontsize=7, parse_math=False)
            axis.set_xlabel(_caption(row["caption"]), fontsize=6.5, parse_math=False)
        for axis in cells[group.height:]:
            axis.set_axis_off()
    return _save(figure, path, written)


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


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
