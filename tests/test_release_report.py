"""Release report: every figure written and linked, byte-identical reruns, placeholders, empty selection, the
provenance, check and ingestion sections, samples around the cut-offs, the random sample, the self-contained
HTML page and the inline Markdown for the orchestrator."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_platform.releases.report import (
    ReportResult,
    _random_sample,
    _thumbnail,
    inline_markdown,
    write_report,
)

ROWS = 300
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "car", "on", "beach", "$x$", "猫", "🙂", "snow"]
LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "ja", "zh", "ko", "sv", None]
CUTOFFS = {"clip_score": 0.25, "kl_text": 1.5, "aspect_ratio": 2.0}
FORMATS = ("JPEG", "PNG", "WEBP")


def _pool() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(ROWS)]
    clip = rng.normal(0.25, 0.05, ROWS)
    clip[::13] = np.nan
    return pl.DataFrame({
        "uid": [f"u{i:04d}" for i in range(ROWS)],
        "shard": [f"{i // 100:05d}" for i in range(ROWS)],
        "key": [f"{i:09d}" for i in range(ROWS)],
        "caption": captions,
        "language": [LANGUAGES[i] for i in rng.integers(0, len(LANGUAGES), ROWS)],
        "caption_words": [len(c.split()) for c in captions],
        "caption_chars": [len(c) for c in captions],
        "width": rng.integers(64, 1024, ROWS),
        "height": rng.integers(64, 1024, ROWS),
        "clip_score": clip,
        "neg_clip_loss": rng.normal(0.0, 1.0, ROWS),
        "kl_text": rng.gamma(2.0, 1.0, ROWS),
        "norm_sim_inf": np.full(ROWS, np.nan),
        "iw_a_photo_of_cats": rng.normal(0.0, 0.5, ROWS),
    })


def _selected(pool: pl.DataFrame) -> pl.Series:
    kept = pool.filter((pl.col("clip_score") >= CUTOFFS["clip_score"]) & (pl.col("kl_text") >= CUTOFFS["kl_text"]))
    return pl.concat([kept["uid"], pl.Series(["not-in-pool"])])


def _encoded(index: int) -> bytes:
    """A small image, its format and size varying with the index; every 11th is not an image at all."""
    if index % 11 == 0:
        return b"not an image"
    colour = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (24 + index % 40, 48 - index % 20), colour).save(buffer, format=FORMATS[index % 3])
    return buffer.getvalue()


class Loader:
    """``load_images`` that records each request and leaves out every 7th uid."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    def __call__(self, uids: list[str]) -> dict[str, bytes]:
        self.requests.append(list(uids))
        indices = [int(uid[1:]) for uid in uids]
        return {uid: _encoded(i) for uid, i in zip(uids, indices) if i % 7}


INGESTION = {"shards": 3, "samples": 400, "accepted": 300,
             "quarantined": {"undecodable_image": 30, "not_downloaded": 60, "a_future_code": 10}}
CHECKS = {"pool_validates": "SUCCEEDED", "duplicates_resolved": "FAILED", "scores_complete": "SUCCEEDED"}
PROVENANCE = {"git_commit": "0123abcd" * 5, "created_at": "2024-05-01T12:00:00+00:00", "package_version": "0.3.1",
              "input_shards": [{"shard": f"{i:05d}", "shard_id": f"id{i}", "checksum": f"{i:02d}" * 32,
                                "samples": 100} for i in range(8)]}
SECTIONS = {"ingestion": INGESTION, "checks": CHECKS, "provenance": PROVENANCE}


def _write(out: Path, pool: pl.DataFrame, selected: pl.Series, loader: Loader, per_grid: int = 8,
           cutoffs: dict[str, float] = CUTOFFS, **sections: Any) -> ReportResult:
    rows_out = selected.len() - 1
    funnel = [{"stage": "basic_filter", "rows_in": ROWS, "rows_out": 250},
              {"stage": "threshold clip_score >= 0.25", "rows_in": 250, "rows_out": 160},
              {"stage": "threshold | kl_text", "rows_in": 160, "rows_out": max(rows_out, 0)}]
    manifest = {"release_id": "demo-2024", "recipe_sha256": "ab" * 32, "teacher_id": "vit-b-32",
                "counts": {"pool": ROWS, "selected": max(rows_out, 0)}}
    return write_report(out, title="Release demo-2024", pool=pool, selected_uids=selected, funnel=funnel,
                        cutoffs=cutoffs, load_images=loader, manifest_summary=manifest, examples_per_grid=per_grid,
                        **sections)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportResult, Loader]:
    out = tmp_path_factory.mktemp("report")
    loader = Loader()
    return out, _write(out, _pool(), _selected(_pool()), loader, **SECTIONS), loader


def _links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_every_figure_is_written_and_linked(report: tuple[Path, ReportResult, Loader]) -> None:
    out, result, _ = report
    names = {"funnel.png", "score_histograms.png", "score_histograms_other.png", "kl_text_decile_ngram_coverage.png",
             "around_cutoff_clip_score.png", "around_cutoff_kl_text.png", "random_sample.png",
             "composition_language.png", "composition_caption_length.png", "examples_top_clip_score.png",
             "examples_bottom_clip_score.png", "examples_top_kl_text.png", "examples_bottom_kl_text.png"}
    assert {p.name for p in (out / "figures").iterdir()} == names
    assert sorted(result.paths) == sorted([out / "report.md", out / "report.html", *[out / "figures" / n for n in names]])
    markdown = (out / "report.md").read_text(encoding="utf-8")
    links = _links(markdown)
    assert sorted(links) == sorted(f"figures/{n}" for n in names)
    for link in links:
        with Image.open(out / link) as image:
            assert image.format == "PNG" and image.width > 100 and "Software" not in image.info


def test_tables_in_markdown(report: tuple[Path, ReportResult, Loader]) -> None:
    markdown = (report[0] / "report.md").read_text(encoding="utf-8")
    selected = _selected(_pool()).len() - 1
    assert markdown.startswith("# Release demo-2024\n")
    assert "| recipe_sha256 | " + "ab" * 32 + " |" in markdown
    assert f"| counts.selected | {selected} |" in markdown
    assert f"| selected rows found in pool | {selected} of {selected + 1} |" in markdown
    assert "| threshold clip_score >= 0.25 | 250 | 160 | 64.0% | 53.3% |" in markdown
    assert "| threshold \\| kl_text |" in markdown
    assert "| other |" in markdown and "| unknown |" in markdown
    assert "not drawn): aspect_ratio" in markdown
    assert "| iw_a_photo_of_cats |" in markdown and "norm_sim_inf" not in markdown  # all-NaN scores left out


def test_only_grid_examples_are_loaded(report: tuple[Path, ReportResult, Loader]) -> None:
    requests = report[2].requests  # around the two drawn cut-offs, the random sample, then the example grids
    assert [len(r) for r in requests] == [8, 8, 12, 8, 8, 8, 8]
    pool = _pool()
    top_clip = pool.filter(pl.col("clip_score").is_finite()).sort("clip_score", descending=True)["uid"].head(8)
    assert requests[3] == top_clip.to_list()


def test_rerun_is_byte_identical(report: tuple[Path, ReportResult, Loader], tmp_path: Path) -> None:
    out, result, _ = report
    again = _write(tmp_path, _pool(), _selected(_pool()), Loader(), **SECTIONS)
    assert [p.relative_to(tmp_path) for p in again.paths] == [p.relative_to(out) for p in result.paths]
    assert again.preview_table == result.preview_table  # the random sample too
    for first, second in zip(result.paths, again.paths):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_missing_images_render_placeholders(tmp_path: Path) -> None:
    written = _write(tmp_path, _pool(), _selected(_pool()), lambda uids: {}, per_grid=3)
    assert (tmp_path / "figures" / "examples_top_kl_text.png") in written.figures
    assert _thumbnail(None) is None and _thumbnail(b"\xff\xd8 truncated jpeg") is None


def test_thumbnail_is_exif_upright_and_centred() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    thumb = _thumbnail(buffer.getvalue())
    assert thumb is not None and thumb.shape == (96, 96, 3)
    assert thumb[48, 48, 0] > 200 and thumb[48, 48, 1] < 60  # red in the middle
    assert (thumb[48, 5] > 230).all()  # portrait after rotation: background left and right


def test_empty_selection_and_unscored_cut(tmp_path: Path) -> None:
    loader = Loader()
    cutoffs = {**CUTOFFS, "norm_sim_inf": float("nan")}  # a cut on a score the pool has no values of
    written = _write(tmp_path, _pool(), pl.Series("uid", [], dtype=pl.String), loader, per_grid=2, cutoffs=cutoffs)
    assert all(p.exists() for p in written.paths) and len(written.paths) == 16
    assert (tmp_path / "figures" / "examples_top_norm_sim_inf.png") in written.figures
    assert not (tmp_path / "figures" / "random_sample.png").exists()  # nothing to draw from
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| selected rows found in pool | 0 of 0 |" in markdown
    assert "| norm_sim_inf | nan | 0 | – | 300 | 0 | – | 0 |" in markdown
    assert "### norm_sim_inf (cut-off" not in markdown  # no samples around a NaN cut-off
    assert not any(f"## {name}" in markdown for name in ("Provenance", "Data-quality checks", "Ingestion"))
    assert [len(r) for r in loader.requests] == [8, 8, 2, 2, 2, 2]
    assert written.preview_table.count("\n") == 1  # header only


def test_provenance_checks_and_ingestion_sections(report: tuple[Path, ReportResult, Loader]) -> None:
    markdown = (report[0] / "report.md").read_text(encoding="utf-8")
    order = [markdown.index(f"## {name}\n") for name in ("Release", "Provenance", "Data-quality checks", "Ingestion",
                                                         "Funnel", "Scores", "Around the cut-offs",
                                                         "Random sample of the release", "Composition", "Examples")]
    assert order == sorted(order)
    assert f"| git_commit | {'0123abcd' * 5} |" in markdown and "| created_at | 2024-05-01T12:00:00+00:00 |" in markdown
    assert "| input shards | 8 (800 scored samples) |" in markdown
    assert f"| 00004 | id4 | {'04' * 32} | 100 |" in markdown and "| 00005 |" not in markdown  # the first five
    assert "3 checks: 1 FAILED, 2 SUCCEEDED." in markdown and "| duplicates_resolved | FAILED |" in markdown
    assert "in 3 shards" in markdown and "do not reconcile" not in markdown
    ingestion = markdown[markdown.index("## Ingestion"):markdown.index("## Funnel")]
    rows = [line.split(" | ")[:3] for line in ingestion.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == [["| samples in the shards", "400", "100.0%"], ["| not downloaded", "60", "15.0%"],
                    ["| quarantined: undecodable_image", "30", "7.5%"], ["| quarantined: a_future_code", "10", "2.5%"],
                    ["| accepted into the pool", "300", "75.0%"]]
    assert "img2dataset could not fetch it" in ingestion
    assert report[1].funnel_table.startswith("| ingestion |") and "| basic_filter | 300 | 250 |" in report[1].funnel_table


def test_figures_fit_the_ui(report: tuple[Path, ReportResult, Loader]) -> None:
    result = report[1]
    assert [alt for alt, _ in result.ui_images] == ["funnel", "score histograms", "around cutoff clip score",
                                                     "around cutoff kl text", "random sample"]
    for path in result.figures:
        with Image.open(path) as image:
            assert image.width <= 800, path.name
    with Image.open(report[0] / "figures" / "random_sample.png") as image:
        assert image.height <= 800  # a 4 x 3 grid


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, split into stripped cells (no escaped pipes here)."""
    section = markdown[markdown.index(heading):]
    lines = section[section.index("\n| "):].strip().split("\n\n")[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_samples_around_cutoffs_lie_on_their_sides(report: tuple[Path, ReportResult, Loader]) -> None:
    markdown = (report[0] / "report.md").read_text(encoding="utf-8")
    pool = _pool()
    for name in ("clip_score", "kl_text"):
        cutoff = CUTOFFS[name]
        rows = _table_rows(markdown, f"### {name} (cut-off {cutoff:.4g})")
        values = dict(zip(pool["uid"], pool[name]))
        below = [uid for uid, side, *_ in rows if side == "below"]
        above = [uid for uid, side, *_ in rows if side == "at or above"]
        assert len(below) == len(above) == 4 and len(rows) == 8
        assert all(values[uid] < cutoff for uid in below) and all(values[uid] >= cutoff for uid in above)
        finite = pool.filter(pl.col(name).is_finite())
        nearest_below = finite.filter(pl.col(name) < cutoff).sort(name, descending=True)["uid"].head(4)
        nearest_above = finite.filter(pl.col(name) >= cutoff).sort(name)["uid"].head(4)
        assert set(below) == set(nearest_below) and set(above) == set(nearest_above)
        selected = set(_selected(pool))
        assert all((mark == "✓") == (uid in selected) for uid, _, mark, *_ in rows)


def test_random_sample_is_deterministic_and_from_the_release(report: tuple[Path, ReportResult, Loader]) -> None:
    pool = _pool().with_columns(selected=pl.lit(True))
    first = _random_sample(pool, 12)["uid"].to_list()
    assert _random_sample(pool.sample(fraction=1.0, shuffle=True, seed=1), 12)["uid"].to_list() == first
    assert len(set(first)) == 12 and sorted(first) != sorted(pool["uid"])[:12]  # not just the smallest uids
    markdown = (report[0] / "report.md").read_text(encoding="utf-8")
    rows = _table_rows(markdown, "## Random sample of the release")
    selected = set(_selected(_pool()))
    assert len(rows) == 12 and all(uid in selected and mark == "✓" for uid, mark, *_ in rows)
    preview = report[1].preview_table.splitlines()
    assert preview[0] == "| uid | in release | caption | clip_score | kl_text | neg_clip_loss | iw_a_photo_of_cats |"
    assert [line.split(" | ")[0][2:] for line in preview[2:]] == [uid for uid, *_ in rows[:10]]


def test_inline_markdown_fits_its_budget(report: tuple[Path, ReportResult, Loader]) -> None:
    result = report[1]
    text = inline_markdown(result)
    assert len(text.encode()) <= 300_000
    uris = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert len(uris) == len(result.ui_images) == 5
    for uri in uris:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as image:
            assert image.format == "PNG" and image.width <= 800
    assert result.funnel_table in text and result.preview_table in text
    tight = inline_markdown(result, max_bytes=30_000)  # downscaled, and what cannot fit is named instead
    assert len(tight.encode()) <= 30_000 and result.preview_table in tight and "see report.html" in tight
    bare = inline_markdown(result, max_bytes=10_000)
    assert len(bare.encode()) <= 10_000 and "data:image" not in bare and bare.count("left out") == 5
    assert inline_markdown(result) == text  # deterministic


HOSTILE = "<script>alert(1)</script> | *b* $x$ &amp; ![p](http://e.x/p) <img src=//e.x>"  # short: tables show it whole


def test_html_is_self_contained_and_captions_escaped(tmp_path: Path) -> None:
    pool = _pool().with_columns(caption=pl.lit(HOSTILE))
    result = _write(tmp_path, pool, _selected(pool), Loader(), per_grid=0, **SECTIONS)
    page = result.html.read_text(encoding="utf-8")
    assert result.html == tmp_path / "report.html"
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; | *b* $x$ &amp;amp;" in page
    assert "<img src=//" not in page and "href=" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    markdown = result.markdown.read_text(encoding="utf-8")
    assert len(sources) == len(_links(markdown)) == len(result.figures)
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    rows = [row for row in page.split("<tr>") if "&lt;script" in row]
    assert len(rows) == 8 + 8 + 12 and all(row.count("<td") in (5, 7) for row in rows)  # the pipe stayed in its cell
    # the Markdown shows the caption literally too: no tag, image, link, entity, emphasis or math survives
    cell = r"\<script\>alert\(1\)\</script\> \| \*b\* \$x\$ \&amp; \!\[p\]\(http://e.x/p\) \<img src=//e.x\>"
    assert markdown.count(cell) == 28 and "<script>" not in markdown and "](http" not in markdown
    assert cell in result.preview_table


def test_ui_figures_outlive_the_report_folder(tmp_path: Path) -> None:
    """A release's report is written in a staging folder removed once published: the result keeps the UI
    figures' bytes, so the orchestrator can still show them (and the inline page) afterwards."""
    import shutil

    result = _write(tmp_path / "staging", _pool(), _selected(_pool()), Loader(), **SECTIONS)
    before = inline_markdown(result)
    expected = [(alt, path, path.read_bytes()) for alt, path in result.ui_images]
    shutil.rmtree(tmp_path / "staging")
    assert result.ui_figures() == expected and inline_markdown(result) == before


def test_report_metadata_uses_the_report_result_or_reads_the_published_one(tmp_path: Path) -> None:
    import shutil

    from curation_platform.releases import Release
    from curation_platform_dagster.defs.releases import report_metadata
    from curation_platform_dagster.defs.resources import PlatformResource

    published = tmp_path / "release"
    published.mkdir()
    pl.DataFrame({"uid": ["u0001", "u0002"], "clip_score": [0.312345678, 0.29], "weight": [1.0, 1.0]}).write_parquet(
        published / "samples.parquet")
    platform = PlatformResource(home_uri=str(tmp_path / "home"))
    result = _write(tmp_path / "staging", _pool(), _selected(_pool()), Loader(), **SECTIONS)
    shutil.rmtree(tmp_path / "staging")
    metadata = report_metadata(Release(str(published), "demo", 1, {}, report=result), platform)
    assert set(metadata) == {"funnel_png", "score_histograms_png", "around_cutoff_clip_score_png",
                             "around_cutoff_kl_text_png", "random_sample_png", "report_markdown", "preview"}
    page = metadata["report_markdown"].value
    assert page == inline_markdown(result) and page.count("](data:image/png;base64,") == 5
    assert "| samples in the shards | 400 |" in page and "0.3123" in metadata["preview"].value

    _write(published / "report", _pool(), _selected(_pool()), Loader(), **SECTIONS)  # as published
    read_back = report_metadata(Release(str(published), "demo", 1, {}), platform)
    assert {"funnel_png", "score_histograms_png", "composition_language_png", "preview"} <= set(read_back)
    assert "report_markdown" not in read_back and sum(key.startswith("examples_") for key in read_back) == 2


def test_ingestion_totals_sum_the_shard_reports(tmp_path: Path) -> None:
    import json

    from curation_platform.layout import ShardOutputs
    from curation_platform.releases import ReleaseSources
    from curation_platform.releases.store import _ingestion_totals

    validated = str(tmp_path / "validated")
    reports = {"00000": {"total": 10, "accepted": 7, "quarantined": 3, "shard_id": "a",
                         "by_reason": {"not_downloaded": 2, "undecodable_image": 1}},
               "00001": {"total": 5, "accepted": 4, "quarantined": 1, "shard_id": "b",
                         "by_reason": {"undecodable_image": 1}}}
    for shard, report in reports.items():
        path = Path(ShardOutputs.of(validated, shard).report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))
    sources = ReleaseSources("unused", validated, "teacher")
    totals = _ingestion_totals({"00000": 7, "00001": 4, "00002": 9}, sources)  # 00002 has no report
    assert totals == {"samples": 15, "accepted": 11, "quarantined": {"not_downloaded": 2, "undecodable_image": 2},
                      "shards": 2, "shards_without_report": 1}
    assert _ingestion_totals({"00002": 9}, sources) is None
    result = _write(tmp_path / "report", _pool(), _selected(_pool()), Loader(), ingestion=totals)
    markdown = result.markdown.read_text(encoding="utf-8")
    assert "in 2 shards" in markdown and "1 input shards have no validation report" in markdown
    assert "do not reconcile" not in markdown
