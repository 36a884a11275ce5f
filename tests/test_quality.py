"""Great Expectations suites: pass on good synthetic tables, name the right failed expectation on bad ones."""

from __future__ import annotations

import json
import math
from functools import cache

import numpy as np
import pyarrow as pa
import pytest

from curation_platform.embedding.sinks import record_batch
from curation_platform.ingest import ACCEPTED_SCHEMA, QUARANTINE_SCHEMA
from curation_platform.quality import (
    SuiteResult,
    embeddings_suite,
    quarantine_suite,
    scores_suite,
    statistics_suite,
    validated_samples_suite,
)
from curation_platform.reasons import Reason
from curation_platform.scoring.pipeline import (
    SCORE_COLUMNS,
    EmbeddingSet,
    ScoreParams,
    ScoringContext,
    prompt_column,
    score_rows,
)

LIMITS = {"min_image_side": 32, "max_pixels": 40_000_000, "max_caption_chars": 2048}
DIM = 8


def uids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def accepted_table(n: int = 6) -> pa.Table:
    widths = [64 + i for i in range(n)]
    captions = [f"a photo of thing {i}" for i in range(n)]
    columns = {
        "uid": uids(n), "key": [f"{i:09d}" for i in range(n)], "shard": ["00000"] * n, "shard_id": ["s0"] * n,
        "url": [f"http://x/{i}.jpg" for i in range(n)], "caption": captions, "width": widths, "height": [48] * n,
        "aspect_ratio": [w / 48 for w in widths], "original_width": widths, "original_height": [48] * n,
        "image_format": ["JPEG"] * n, "image_member": [f"{i:09d}.jpg" for i in range(n)], "image_offset": [512] * n,
        "image_bytes": [1000] * n, "image_sha256": ["ab" * 32] * n, "exif_transposed": [False] * n,
        "caption_chars": [len(c) for c in captions], "caption_words": [len(c.split()) for c in captions],
        "language": ["en"] * n, "language_score": [0.9] * n,
    }
    return pa.table(columns, schema=ACCEPTED_SCHEMA)


def replace(table: pa.Table, name: str, values: list, kind: pa.DataType | None = None) -> pa.Table:
    """The table with one column replaced (schema relaxed to nullable, as a broken writer might produce)."""
    index = table.schema.get_field_index(name)
    field = pa.field(name, kind or table.schema.field(name).type)
    return table.set_column(index, field, pa.array(values, field.type))


def failed(result: SuiteResult) -> set[str]:
    return {outcome.expectation for outcome in result.failed}


def assert_passes(result: SuiteResult) -> None:
    assert result.success, result.to_metadata()
    assert result.failed == ()
    json.dumps(result.to_metadata())


# -- validated samples --------------------------------------------------------------------------

def test_validated_samples_pass_and_cover_schema_nulls_ranges_and_uids() -> None:
    result = validated_samples_suite(accepted_table(), **LIMITS)
    assert_passes(result)
    assert (result.rows, result.rows_validated) == (6, 6)
    order = [outcome.expectation for outcome in result.outcomes]  # the suite's order, not GE's grouping
    assert order[:3] == ["expect_table_columns_to_match_set", "expect_column_values_to_not_be_null(uid)",
                         "expect_column_values_to_not_be_null(key)"]
    assert order[-1] == "expect_column_values_to_be_unique(uid)"
    names = set(order)
    assert {"expect_table_columns_to_match_set", "expect_column_values_to_not_be_null(caption)",
            "expect_column_values_to_be_between(pixels)", "expect_column_values_to_be_unique(uid)",
            "expect_column_values_to_match_regex(uid)",
            "expect_column_values_to_be_between(language_score)"} <= names


@pytest.mark.parametrize(
    ("column", "value", "expectation"),
    [
        ("caption", None, "expect_column_values_to_not_be_null(caption)"),
        ("width", 16, "expect_column_values_to_be_between(width)"),
        ("uid", "0" * 32, "expect_column_values_to_be_unique(uid)"),
        ("uid", "NOT-A-UID", "expect_column_values_to_match_regex(uid)"),
        ("caption_chars", 5000, "expect_column_values_to_be_between(caption_chars)"),
        ("language_score", 1.5, "expect_column_values_to_be_between(language_score)"),
    ],
)
def test_validated_samples_fail_on_bad_rows(column: str, value: object, expectation: str) -> None:
    table = accepted_table()
    values = table.column(column).to_pylist()
    values[3] = value
    result = validated_samples_suite(replace(table, column, values), **LIMITS)
    assert not result.success
    assert expectation in failed(result)
    outcome = next(o for o in result.failed if o.expectation == expectation)
    assert outcome.observed["unexpected_count"] >= 1
    json.dumps(result.to_metadata())


def test_validated_samples_check_pixels_and_schema() -> None:
    table = accepted_table()
    table = replace(table, "width", [5000] * 6)
    assert "expect_column_values_to_be_between(pixels)" in failed(
        validated_samples_suite(table, min_image_side=32, max_pixels=100_000, max_caption_chars=2048))
    missing = validated_samples_suite(accepted_table().drop_columns(["language"]), **LIMITS)
    outcome = next(o for o in missing.failed if o.expectation == "expect_table_columns_to_match_set")
    assert outcome.observed["details"]["mismatched"]["missing"] == ["language"]
    # the expectation on the missing column fails (GE reports a metric error) instead of raising
    assert "exception" in next(o for o in missing.failed
                               if o.expectation == "expect_column_values_to_not_be_null(language)").observed


def test_empty_tables_pass_when_the_schema_is_right() -> None:
    assert_passes(validated_samples_suite(ACCEPTED_SCHEMA.empty_table(), **LIMITS))
    assert_passes(quarantine_suite(QUARANTINE_SCHEMA.empty_table()))
    assert_passes(embeddings_suite(embedding_rows(0), [], DIM))
    assert not embeddings_suite(embedding_rows(0), ["0" * 32], DIM).success
    assert not validated_samples_suite(ACCEPTED_SCHEMA.empty_table().drop_columns(["uid"]), **LIMITS).success
    no_text = embeddings_suite(embedding_rows(3).drop_columns(["text_embedding"]), uids(3), DIM)
    assert "expect_column_values_to_be_between(text_norm)" in failed(no_text)


def test_large_tables_sample_per_row_checks_but_not_uniqueness() -> None:
    table = accepted_table(300)
    result = validated_samples_suite(table, **LIMITS, max_rows=100)
    assert_passes(result)
    assert (result.rows, result.rows_validated) == (300, 100)
    values = table.column("uid").to_pylist()
    values[299] = values[0]  # a duplicate the sample may well miss
    result = validated_samples_suite(replace(table, "uid", values), **LIMITS, max_rows=10)
    assert failed(result) == {"expect_column_values_to_be_unique(uid)"}
    again = validated_samples_suite(replace(table, "uid", values), **LIMITS, max_rows=10)
    assert again.outcomes == result.outcomes  # the sample is seeded


# -- quarantine ---------------------------------------------------------------------------------

def quarantine_table(reasons: list[str]) -> pa.Table:
    n = len(reasons)
    return pa.table({"uid": uids(n), "key": [f"{i:09d}" for i in range(n)], "shard": ["00000"] * n,
                     "shard_id": ["s0"] * n, "reason": reasons, "detail": ["x"] * n, "members": [["a.jpg"]] * n},
                    schema=QUARANTINE_SCHEMA)


def test_quarantine_known_reasons_pass_unknown_fail() -> None:
    assert_passes(quarantine_suite(quarantine_table([reason.value for reason in Reason])))
    result = quarantine_suite(quarantine_table([Reason.IMAGE_TOO_SMALL.value, "image_too_ugly"]))
    assert failed(result) == {"expect_column_values_to_be_in_set(reason)"}
    assert result.failed[0].observed["partial_unexpected"] == ["image_too_ugly"]
    table = quarantine_table([Reason.MISSING_IMAGE.value] * 2)
    assert failed(quarantine_suite(replace(table, "key", ["k", None]))) == {
        "expect_column_values_to_not_be_null(key)"}


# -- embeddings ---------------------------------------------------------------------------------

def embedding_rows(n: int, dim: int = DIM, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(2, n, dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return pa.Table.from_batches([record_batch(uids(n), "t", "00000", image, text)])


def with_vector(rows: pa.Table, column: str, row: int, vector: np.ndarray) -> pa.Table:
    values = np.stack([np.asarray(v, dtype=np.float32) for v in rows.column(column).to_pylist()])
    values[row] = vector
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    return rows.set_column(rows.schema.get_field_index(column), rows.schema.field(column), array)


def test_embeddings_pass_when_one_unit_vector_per_accepted_uid() -> None:
    rows = embedding_rows(10)
    result = embeddings_suite(rows, uids(10)[::-1], DIM)
    assert_passes(result)
    assert {"expect_column_values_to_be_between(image_norm)", "expect_column_values_to_be_in_set(text_finite)",
            "expect_table_row_count_to_equal", "expect_column_values_to_be_null(unaccepted_uid)"} <= {
        outcome.expectation for outcome in result.outcomes}


def test_embeddings_fail_on_norm_nan_duplicates_membership_and_dimension() -> None:
    rows = embedding_rows(10)
    accepted = uids(10)
    assert failed(embeddings_suite(with_vector(rows, "image_embedding", 2, np.full(DIM, 0.5)), accepted, DIM)) == {
        "expect_column_values_to_be_between(image_norm)"}
    nan = np.zeros(DIM)
    nan[0] = np.nan
    assert failed(embeddings_suite(with_vector(rows, "text_embedding", 4, nan), accepted, DIM)) == {
        "expect_column_values_to_be_in_set(text_finite)"}
    duplicated = pa.concat_tables([rows.slice(0, 9), rows.slice(0, 1)])
    assert failed(embeddings_suite(duplicated, accepted, DIM)) == {"expect_column_values_to_be_unique(uid)"}
    missing = embeddings_suite(rows.slice(0, 9), accepted, DIM)
    assert failed(missing) == {"expect_table_row_count_to_equal"}
    assert missing.failed[0].observed["observed_value"] == 9
    stranger = embeddings_suite(rows, [*accepted[:9], "f" * 32], DIM)
    assert failed(stranger) == {"expect_column_values_to_be_null(unaccepted_uid)"}
    assert stranger.failed[0].observed["partial_unexpected"] == [accepted[9]]
    assert failed(embeddings_suite(rows, accepted, 16)) == {
        "expect_column_values_to_be_in_set(image_dim)", "expect_column_values_to_be_in_set(text_dim)"}


def test_embedding_norms_are_computed_past_the_first_chunk() -> None:
    rows = embedding_rows(20_000)
    assert_passes(embeddings_suite(rows, uids(20_000), DIM))
    assert failed(embeddings_suite(with_vector(rows, "text_embedding", 19_999, np.full(DIM, 2.0)), uids(20_000),
                                   DIM)) == {"expect_column_values_to_be_between(text_norm)"}


def test_embeddings_membership_sees_every_row_of_a_sampled_table() -> None:
    rows = embedding_rows(50)
    result = embeddings_suite(rows, uids(50)[:-1] + ["f" * 32], DIM, max_rows=5)
    assert result.rows_validated == 5
    assert failed(result) == {"expect_column_values_to_be_null(unaccepted_uid)"}


# -- scores -------------------------------------------------------------------------------------

PROMPTS = ["a photo of flowers"]


@cache
def real_scores(with_target: bool, n: int = 40, reference: int = 30) -> pa.Table:
    """score_rows' own output on random unit vectors: the suite must accept what scoring writes."""
    rng = np.random.default_rng(1)

    def unit(rows: int) -> np.ndarray:
        x = rng.normal(size=(rows, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ref = EmbeddingSet("ref", "t", uids(reference), unit(reference), unit(reference))
    target = EmbeddingSet("target", "t", uids(5), unit(5)) if with_target else None
    context = ScoringContext("t", 100.0, ScoreParams(reference_size=reference, neg_clip_batch_size=16,
                                                     neg_clip_repeats=2, prompts=tuple(PROMPTS)),
                             ref, target, {PROMPTS[0]: unit(1)[0]})
    return score_rows(embedding_rows(n), context)


@pytest.mark.parametrize("with_target", [True, False])
def test_scores_written_by_scoring_pass(with_target: bool) -> None:
    result = scores_suite(real_scores(with_target), 30, with_target, [prompt_column(PROMPTS[0])])
    assert_passes(result)


def set_value(table: pa.Table, column: str, row: int, value: float | None) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return replace(table, column, values)


BAD_SCORES = [  # (column, bad value, the expectation that must catch it)
    ("kl_text", math.log(30) + 1e-3, "expect_column_values_to_be_between(kl_text)"),
    ("kl_image", -1e-3, "expect_column_values_to_be_between(kl_image)"),
    ("neg_clip_loss", float("nan"), "expect_column_values_to_not_be_null(neg_clip_loss)"),
    ("whitened_kl", float("inf"), "expect_column_values_to_be_between(whitened_kl)"),
    ("clip_score", 1.5, "expect_column_values_to_be_between(clip_score)"),
    ("klr_image", -0.5, "expect_column_values_to_be_between(klr_image)"),
    ("norm_sim_2", -0.5, "expect_column_values_to_be_between(norm_sim_2)"),
    ("norm_sim_inf", None, "expect_column_values_to_not_be_null(norm_sim_inf)"),
    ("iw_a_photo_of_flowers", float("-inf"), "expect_column_values_to_be_between(iw_a_photo_of_flowers)"),
    ("score_version", None, "expect_column_values_to_not_be_null(score_version)"),
]


def test_scores_fail_on_out_of_range_or_missing_values() -> None:
    table = real_scores(True)
    for row, (column, value, _) in enumerate(BAD_SCORES):  # one bad value per row, each its own expectation
        table = set_value(table, column, row, value)
    result = scores_suite(table, 30, True, [prompt_column(PROMPTS[0])])
    assert failed(result) == {expectation for _, _, expectation in BAD_SCORES}
    assert all(outcome.observed["unexpected_count"] == 1 for outcome in result.failed)
    json.dumps(result.to_metadata())


def test_scores_norm_sim_is_nan_exactly_without_target_and_uids_are_unique() -> None:
    prompts = [prompt_column(PROMPTS[0])]
    without = real_scores(False)
    assert failed(scores_suite(without, 30, True, prompts)) == {
        "expect_column_values_to_not_be_null(norm_sim_2)", "expect_column_values_to_not_be_null(norm_sim_inf)"}
    assert failed(scores_suite(real_scores(True), 30, False, prompts)) == {
        "expect_column_values_to_be_null(norm_sim_2)", "expect_column_values_to_be_null(norm_sim_inf)"}
    duplicated = pa.concat_tables([without, without.slice(0, 1)])
    assert failed(scores_suite(duplicated, 30, False, prompts)) == {"expect_column_values_to_be_unique(uid)"}
    assert failed(scores_suite(without, 30, False, [])) == {"expect_table_columns_to_match_set"}


# -- statistics ---------------------------------------------------------------------------------

def summarise(table: pa.Table, columns: list[str]) -> pa.Table:
    """What analysis.score_summary writes: one row per score over its non-NaN values."""
    rows = []
    for name in columns:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        kept = values[~np.isnan(values)]
        defined = len(kept) > 0
        rows.append({"score": name, "count": len(kept), "nan_count": len(values) - len(kept),
                     "mean": float(kept.mean()) if defined else None,
                     "std": float(kept.std(ddof=1)) if len(kept) > 1 else 0.0,
                     "min": float(kept.min()) if defined else None, "max": float(kept.max()) if defined else None})
    schema = pa.schema([("score", pa.string()), ("count", pa.uint32()), ("nan_count", pa.uint32()),
                        *((name, pa.float64()) for name in ("mean", "std", "min", "max"))])
    return pa.Table.from_pylist(rows, schema=schema)


def test_statistics_of_a_score_summary_pass_and_min_above_mean_fails() -> None:
    summary = summarise(real_scores(True), list(SCORE_COLUMNS))
    assert_passes(statistics_suite(summary))
    constant = pa.table({"s": [0.1] * 3})  # numpy's mean is 0.1000...02 > max 0.1: within tolerance
    assert_passes(statistics_suite(summarise(constant, ["s"])))

    bad = summary.to_pylist()
    bad[0]["min"] = bad[0]["mean"] + 1.0
    result = statistics_suite(pa.Table.from_pylist(bad, schema=summary.schema))
    assert failed(result) == {"expect_column_values_to_be_between(mean_above_min)"}
    without_target = summarise(real_scores(False), list(SCORE_COLUMNS))
    assert {"expect_column_values_to_be_between(nan_count)", "expect_column_values_to_be_between(count)",
            "expect_column_values_to_not_be_null(mean)"} <= failed(statistics_suite(without_target))
