"""Release report: every figure written and linked, byte-identical reruns, placeholders, empty selection."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_platform.releases.report import _thumbnail, write_report

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


def _write(out: Path, pool: pl.DataFrame, selected: pl.Series, loader: Loader, per_grid: int = 8,
           cutoffs: dict[str, float] = CUTOFFS) -> list[Path]:
    rows_out = selected.len() - 1
    funnel = [{"stage": "basic_filter", "rows_in": ROWS, "rows_out": 250},
              {"stage": "threshold clip_score >= 0.25", "rows_in": 250, "rows_out": 160},
              {"stage": "threshold | kl_text", "rows_in": 160, "rows_out": max(rows_out, 0)}]
    manifest = {"release_id": "demo-2024", "recipe_sha256": "ab" * 32, "teacher_id": "vit-b-32",
                "counts": {"pool": ROWS, "selected": max(rows_out, 0)}}
    return write_report(out, title="Release demo-2024", pool=pool, selected_uids=selected, funnel=funnel,
                        cutoffs=cutoffs, load_images=loader, manifest_summary=manifest, examples_per_grid=per_grid)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Loader]:
    out = tmp_path_factory.mktemp("report")
    loader = Loader()
    return out, _write(out, _pool(), _selected(_pool()), loader), loader


def _links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_every_figure_is_written_and_linked(report: tuple[Path, list[Path], Loader]) -> None:
    out, written, _ = report
    names = {"funnel.png", "score_histograms.png", "kl_text_decile_ngram_coverage.png", "composition_language.png",
             "composition_caption_length.png", "examples_top_clip_score.png", "examples_bottom_clip_score.png",
             "examples_top_kl_text.png", "examples_bottom_kl_text.png"}
    assert {p.name for p in (out / "figures").iterdir()} == names
    assert sorted(written) == sorted([out / "report.md", *[out / "figures" / n for n in names]])
    markdown = (out / "report.md").read_text(encoding="utf-8")
    links = _links(markdown)
    assert sorted(links) == sorted(f"figures/{n}" for n in names)
    for link in links:
        with Image.open(out / link) as image:
            assert image.format == "PNG" and image.width > 100 and "Software" not in image.info


def test_tables_in_markdown(report: tuple[Path, list[Path], Loader]) -> None:
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


def test_only_grid_examples_are_loaded(report: tuple[Path, list[Path], Loader]) -> None:
    requests = report[2].requests
    assert len(requests) == 4 and all(len(r) == 8 for r in requests)
    pool = _pool()
    top_clip = pool.filter(pl.col("clip_score").is_finite()).sort("clip_score", descending=True)["uid"].head(8)
    assert requests[0] == top_clip.to_list()


def test_rerun_is_byte_identical(report: tuple[Path, list[Path], Loader], tmp_path: Path) -> None:
    out, written, _ = report
    again = _write(tmp_path, _pool(), _selected(_pool()), Loader())
    assert [p.relative_to(tmp_path) for p in again] == [p.relative_to(out) for p in written]
    for first, second in zip(written, again):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_missing_images_render_placeholders(tmp_path: Path) -> None:
    written = _write(tmp_path, _pool(), _selected(_pool()), lambda uids: {}, per_grid=3)
    assert (tmp_path / "figures" / "examples_top_kl_text.png") in written
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
    assert all(p.exists() for p in written) and len(written) == 12
    assert (tmp_path / "figures" / "examples_top_norm_sim_inf.png") in written
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| selected rows found in pool | 0 of 0 |" in markdown
    assert "| norm_sim_inf | nan | 0 | – | 300 | 0 | – | 0 |" in markdown
    assert [len(r) for r in loader.requests] == [2, 2, 2, 2]
