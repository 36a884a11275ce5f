"""DataComp's baselines as DataComp's own code (baselines/apply_filter.py) defines them.

Each rule is checked at its boundary on constructed rows, and against a verbatim transcription of
DataComp's numpy/pandas expressions on random rows.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation_platform import storage, validation
from curation_platform.releases import RecipeError, ReleaseSources, parse_recipe
from curation_platform.releases.inputs import VALIDATED_SAMPLE_COLUMNS, pool_frame, table_versions
from curation_platform.selection import (
    Chain,
    DataCompTopFraction,
    IsIn,
    OriginalSize,
    TopFraction,
    basic_filter,
    datacomp_clip_score_top,
    laion_clip_score,
    run_selection,
)
from curation_platform.validation import (
    ENGLISH_FLOOR,
    ENGLISH_RATIO,
    FASTTEXT_LID_ENV,
    LanguageModelUnavailable,
    ValidationLimits,
    check_content,
    detect_language,
    fasttext_language,
    unsure_english,
)

COLUMNS = ["uid", "language", "caption_words", "caption_chars", "width", "height", "aspect_ratio",
           "original_width", "original_height"]


def _frame(rows: list[tuple]) -> pl.DataFrame:
    """Rows of (uid, language, words, chars, width, height, original_width, original_height); the
    decoded aspect_ratio is ingestion's, from the decoded size."""
    full = [(uid, lang, words, chars, w, h, max(w, h) / min(w, h), ow, oh)
            for uid, lang, words, chars, w, h, ow, oh in rows]
    schema = dict(zip(COLUMNS, [pl.String, pl.String, pl.Int32, pl.Int32, pl.Int32, pl.Int32, pl.Float32,
                                pl.Int32, pl.Int32]))
    return pl.DataFrame(full, schema=schema, orient="row")


def _kept(frame: pl.DataFrame, policies) -> set[str]:
    return set(run_selection(frame, policies).uids.to_pylist())


# -- basic filter -------------------------------------------------------------------------------

def test_caption_rules_at_their_boundaries() -> None:
    frame = _frame([
        ("words-2", "en", 2, 30, 640, 480, 640, 480),
        ("words-3", "en", 3, 30, 640, 480, 640, 480),
        ("chars-5", "en", 3, 5, 640, 480, 640, 480),
        ("chars-6", "en", 3, 6, 640, 480, 640, 480),
        ("german", "de", 5, 30, 640, 480, 640, 480),
    ])
    assert _kept(frame, basic_filter()) == {"words-3", "chars-6"}


def test_image_rules_use_the_original_size_where_the_decoded_one_decides_otherwise() -> None:
    frame = _frame([  # uid, language, words, chars, decoded w, h, original w, h
        ("side-199", "en", 5, 30, 640, 480, 199, 400),      # decoded would keep it
        ("side-200", "en", 5, 30, 150, 100, 200, 400),      # decoded would drop it
        ("height-199", "en", 5, 30, 640, 480, 400, 199),
        ("aspect-3.0", "en", 5, 30, 672, 200, 900, 300),    # decoded 3.36 would drop it
        ("aspect-3.01", "en", 5, 30, 448, 224, 602, 200),   # decoded 2.0 would keep it
        ("aspect-2.6", "en", 5, 30, 582, 199, 1300, 500),   # resized below 200: DataComp keeps it
        ("zero", "en", 5, 30, 640, 480, 0, 0),              # 0 / 0: never kept
    ])
    assert _kept(frame, basic_filter()) == {"side-200", "aspect-3.0", "aspect-2.6"}


def test_null_originals_fall_back_to_the_decoded_size_as_a_pair() -> None:
    frame = _frame([
        ("unknown-keep", "en", 5, 30, 640, 480, None, None),
        ("unknown-small", "en", 5, 30, 199, 480, None, None),
        ("unknown-aspect", "en", 5, 30, 602, 200, None, None),
        ("half-known", "en", 5, 30, 199, 480, None, 480),  # one original alone is not mixed with a decoded side
    ])
    assert _kept(frame, basic_filter()) == {"unknown-keep"}
    without = frame.drop("original_width", "original_height")  # samples validated before originals were kept
    assert _kept(without, basic_filter()) == {"unknown-keep"}


def test_basic_filter_equals_datacomps_expressions_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    texts = [" ".join("ab"[: rng.integers(1, 3)] for _ in range(rng.integers(1, 5))) for _ in range(n)]
    width, height = rng.integers(150, 700, n), rng.integers(150, 700, n)
    language = rng.choice(["en", "de"], n, p=[0.8, 0.2])
    # DataComp's load_uids_with_basic_filter_helper, verbatim on the same rows
    words, chars = np.array([len(t.split()) for t in texts]), np.array([len(t) for t in texts])
    low, high = np.minimum(width, height), np.maximum(width, height)
    datacomp = (language == "en") & (words > 2) & (chars > 5) & (low >= 200) & (high / low <= 3.0)
    decoded = np.maximum(32, (width * 0.5).astype(int)), np.maximum(32, (height * 0.5).astype(int))
    frame = pl.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "language": language, "caption_words": words,
                          "caption_chars": chars, "width": decoded[0], "height": decoded[1],
                          "aspect_ratio": np.maximum(*decoded) / np.minimum(*decoded),
                          "original_width": width, "original_height": height})
    assert _kept(frame, basic_filter()) == set(frame.filter(pl.Series(datacomp))["uid"])
    assert 0 < datacomp.sum() < n


def test_original_size_is_a_row_filter_with_a_clear_stage_name() -> None:
    stages = run_selection(_frame([("a", "en", 5, 30, 640, 480, 640, 480)]), basic_filter()).funnel
    assert [stage.stage for stage in stages[-3:]] == [
        "original_size(measure=width, min=200)", "original_size(measure=height, min=200)",
        "original_size(measure=aspect_ratio, max=3.0)"]
    with pytest.raises(ValueError, match="measure"):
        OriginalSize("area", min=1)


# -- DataComp's top fraction --------------------------------------------------------------------

def _scores(values: list[float | None]) -> pl.DataFrame:
    return pl.DataFrame({"uid": [f"{i:032x}" for i in range(len(values))], "clip_score": values},
                        schema={"uid": pl.String, "clip_score": pl.Float64})


def test_datacomp_threshold_keeps_n_plus_one_rows_and_ties() -> None:
    frame = _scores([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    kept = run_selection(frame, DataCompTopFraction("clip_score", 0.3))  # n = 3: threshold = 4th best
    assert len(kept.uids) == 4 and len(run_selection(frame, TopFraction("clip_score", 0.3)).uids) == 3
    tied = _scores([0.9, 0.8, 0.6, 0.6, 0.6, 0.6, 0.3, 0.2, 0.1, 0.05])
    assert _kept(tied, DataCompTopFraction("clip_score", 0.3)) == {f"{i:032x}" for i in range(6)}
    assert len(run_selection(tied, TopFraction("clip_score", 0.3)).uids) == 3  # uid tie-break


def test_datacomp_threshold_counts_with_truncation_and_null_rows() -> None:
    frame = _scores([float(100 - i) for i in range(100)])
    assert len(run_selection(frame, DataCompTopFraction("clip_score", 0.29)).uids) == 29  # int(28.999...) + 1
    with_nulls = _scores([0.9, None, float("nan"), 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert _kept(with_nulls, DataCompTopFraction("clip_score", 0.2)) == {f"{i:032x}" for i in (0, 3, 4)}
    assert len(run_selection(with_nulls, DataCompTopFraction("clip_score", 1.0)).uids) == 8  # every scored row


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("distinct", [None, 7])
def test_datacomp_threshold_equals_get_threshold_on_random_scores(fraction: float, distinct: int | None) -> None:
    rng = np.random.default_rng(int(fraction * 100))
    values = rng.integers(0, distinct, 997).astype(float) if distinct else rng.normal(size=997)
    threshold = -np.sort(-values)[int(len(values) * fraction)]  # DataComp's get_threshold, verbatim
    expected = {f"{i:032x}" for i in np.flatnonzero(values >= threshold)}
    assert _kept(_scores(values.tolist()), datacomp_clip_score_top(fraction)) == expected
    lowest = np.sort(values)[int(len(values) * fraction)]
    ascending = DataCompTopFraction("clip_score", fraction, descending=False)
    assert _kept(_scores(values.tolist()), ascending) == {f"{i:032x}" for i in np.flatnonzero(values <= lowest)}


def test_datacomp_threshold_after_a_filter_counts_against_the_pool_or_the_survivors() -> None:
    frame = _scores([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]).with_columns(
        keep=pl.Series([True, False] * 5))
    survivors = Chain(IsIn("keep", (True,)), DataCompTopFraction("clip_score", 0.2))
    assert len(run_selection(frame, survivors).uids) == 3  # n = int(0.2 * 10) = 2 of the pool
    current = Chain(IsIn("keep", (True,)), DataCompTopFraction("clip_score", 0.2, of="current"))
    assert len(run_selection(frame, current).uids) == 2  # n = int(0.2 * 5) = 1 of the survivors


def test_laion_filter_is_an_inclusive_threshold_at_0_28() -> None:
    frame = _scores([0.2799, 0.28, 0.3, None])
    assert _kept(frame, laion_clip_score()) == {f"{i:032x}" for i in (1, 2)}


# -- recipes ------------------------------------------------------------------------------------

DATACOMP_RECIPE = """
name = "datacomp-clip-score-top30"
[[stage]]
type = "datacomp_top_fraction"
score = "clip_score"
fraction = 0.30
"""


def test_recipes_name_the_datacomp_stage_and_validate_it() -> None:
    recipe = parse_recipe(DATACOMP_RECIPE)
    assert recipe.policies() == [DataCompTopFraction("clip_score", 0.3)] and recipe.scores_used() == ["clip_score"]
    for bad, message in [("fraction = 0.30", "fraction = 1.5"), ("fraction = 0.30", "fraction = 0.3\nties = 'uid'"),
                         ('score = "clip_score"', 'score = "clip"')]:
        with pytest.raises(RecipeError, match="datacomp_top_fraction"):
            parse_recipe(DATACOMP_RECIPE.replace(bad, message))
    basic = parse_recipe("name = 'b'\n[[stage]]\ntype = 'basic_filter'")
    assert {"original_width", "original_height"} <= set(basic.scores_used()) <= set(VALIDATED_SAMPLE_COLUMNS)


def test_a_release_frame_carries_the_original_sizes(scored_demo: dict, demo_pool_dir: Path) -> None:
    sources = ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    frame = pool_frame(sources, table_versions(sources))
    assert frame["original_width"].null_count() < frame.height
    recipe = parse_recipe(DATACOMP_RECIPE.replace('type = "datacomp_top_fraction"', 'type = "basic_filter"\n'
                                                  '[[stage]]\ntype = "datacomp_top_fraction"'))
    result = run_selection(frame, recipe.policies())
    assert [stage.rows for stage in result.funnel][-1] == len(result.uids) > 0


# -- language -----------------------------------------------------------------------------------

def _language_frame(captions: list[str]) -> pl.DataFrame:
    detected = [detect_language(caption) for caption in captions]
    return pl.DataFrame({"uid": captions, "language": [language for language, _ in detected]})


def test_short_english_captions_pass_and_foreign_ones_do_not() -> None:
    english, foreign = ["picture", "image", "a photo of a dog"], ["ein Hund auf der Wiese", "un chat noir"]
    frame = _language_frame(english + foreign)
    assert _kept(frame, basic_filter().policies[:1]) == set(english)


def test_the_english_rule_boundaries() -> None:
    assert unsure_english(ENGLISH_FLOOR - 1e-6, ENGLISH_RATIO * (ENGLISH_FLOOR - 1e-6))
    assert not unsure_english(ENGLISH_FLOOR, ENGLISH_FLOOR)  # a confident top language stays
    assert not unsure_english(0.3, 0.3 * ENGLISH_RATIO - 1e-6)


class FakeFastText:
    """Like fasttext's model: refuses newlines, answers ``__label__xx`` labels with probabilities."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def predict(self, text: str, k: int = 1) -> tuple[tuple[str, ...], np.ndarray]:
        if "\n" in text:
            raise ValueError("predict processes one line at a time (remove '\\n')")
        self.seen.append(text)
        return ("__label__en",) if "dog" in text or text == "picture" else ("__label__de",), np.array([0.61])


@pytest.fixture()
def fake_fasttext(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeFastText]:
    model, loaded = FakeFastText(), []
    model_file = tmp_path / "lid.176.bin"
    model_file.write_bytes(b"not really a model")
    module = types.SimpleNamespace(load_model=lambda path: loaded.append(path) or model)
    monkeypatch.setitem(sys.modules, "fasttext", module)
    monkeypatch.setenv(FASTTEXT_LID_ENV, str(model_file))
    validation.fasttext_model.cache_clear()
    model.loaded = loaded
    yield model
    validation.fasttext_model.cache_clear()


def test_a_configured_fasttext_model_decides_as_datacomp_does(fake_fasttext: FakeFastText, tmp_path: Path) -> None:
    assert detect_language("picture") == ("en", pytest.approx(0.61))
    frame = _language_frame(["a photo of a dog", "un chat noir"])
    assert _kept(frame, basic_filter().policies[:1]) == {"a photo of a dog"}
    assert fake_fasttext.loaded == [str(tmp_path / "lid.176.bin")]  # loaded once per process
    assert validation.language_model() == f"fasttext:{tmp_path / 'lid.176.bin'}"


def test_fasttext_reads_the_caption_as_decoded_with_newlines_as_spaces(fake_fasttext: FakeFastText) -> None:
    from io import BytesIO

    from PIL import Image

    image = BytesIO()
    Image.new("RGB", (64, 64)).save(image, "PNG")
    result = check_content(image.getvalue(), b" a brown\ndog ", ValidationLimits())
    assert (result.language, result.caption) == ("en", "a brown\ndog")
    assert fake_fasttext.seen == [" a brown dog "]
    assert fasttext_language("x\ny", fake_fasttext) == ("de", pytest.approx(0.61))
    sure = types.SimpleNamespace(predict=lambda text, k=1: (("__label__en",), np.array([1.0000100135803223])))
    assert fasttext_language("a dog", sure) == ("en", 1.0)  # fasttext's exp(log(p + 1e-5)) can pass 1


def test_a_configured_but_missing_model_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    validation.fasttext_model.cache_clear()
    monkeypatch.setenv(FASTTEXT_LID_ENV, str(tmp_path / "absent.bin"))
    monkeypatch.setitem(sys.modules, "fasttext", None)  # not installed
    with pytest.raises(LanguageModelUnavailable, match="pip install fasttext-numpy2-wheel"):
        detect_language("picture")
    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: FakeFastText()))
    with pytest.raises(LanguageModelUnavailable, match="no such file"):
        detect_language("picture")
    validation.fasttext_model.cache_clear()


def test_an_s3_model_is_copied_to_a_local_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      fake_fasttext: FakeFastText) -> None:
    reads: list[str] = []
    monkeypatch.setenv(FASTTEXT_LID_ENV, "s3://models/lid.176.bin")
    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: True)
    monkeypatch.setattr(storage, "read_bytes", lambda uri, s3=None: reads.append(uri) or b"model bytes")
    monkeypatch.setattr(validation.tempfile, "gettempdir", lambda: str(tmp_path))
    assert detect_language("a dog")[0] == "en"
    validation.fasttext_model.cache_clear()
    assert detect_language("a dog")[0] == "en"  # a new process finds the cached copy
    (cached,) = fake_fasttext.loaded[-1:]
    assert reads == ["s3://models/lid.176.bin"] and Path(cached).read_bytes() == b"model bytes"
