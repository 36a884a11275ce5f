"""Data-quality suites on Great Expectations 1.x for what each pipeline stage writes.

Every suite turns an Arrow table into a pandas frame (GE has no Arrow or polars backend), adds
derived per-row columns where an expectation needs one (pixel count, caption length, embedding
norms, finiteness flags), runs one GE expectation suite, and returns a small, JSON-able
:class:`SuiteResult` that Dagster asset checks and tests can use without knowing GE.

Large tables are sampled: per-row expectations see a seeded sample of at most ``max_rows`` rows
(``rows_validated < rows`` says so). Expectations about the whole table (row count, uid
uniqueness, uid membership) always see every row, on a frame of the key columns alone.

GE is imported lazily (about 3 s) and one ephemeral context is reused per process (about 10 ms
less per validation than a fresh one). A lock serialises validations because the context's
execution engine holds the active batch; it also keeps the last validated frame alive until the
next validation (at most ``MAX_ROWS`` rows of scalar columns).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curation_platform.embedding.sinks import vectors
from curation_platform.ingest import ACCEPTED_SCHEMA, QUARANTINE_SCHEMA, UID_PATTERN
from curation_platform.reasons import Reason

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before any GE import: no network calls offline

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

MAX_ROWS = 200_000
"""Per-row expectations of larger tables run on a seeded sample of this many rows."""
SAMPLE_SEED = 0
NORM_TOLERANCE = 1e-3
"""Embeddings are unit vectors up to this absolute error of their L2 norm."""
COSINE_BOUND = (1 + NORM_TOLERANCE) ** 2
"""Largest |cosine| that vectors passing the norm check can give: bounds clip_score and norm_sim_inf."""
SCORE_TOLERANCE = 1e-6
"""Float64 rounding slack on KL bounds (0 <= D_KL <= log N, D_KLR >= 0)."""
STATISTICS_TOLERANCE = 1e-9
"""Relative slack on min <= mean <= max: the mean of equal values can exceed them by an ulp."""
_FLOAT_MAX = float(np.finfo(np.float64).max)  # between(-max, max) rejects +-inf: a "finite" check
_PARTIAL_VALUES = 5
_TEXT_CHARS = 80
_PIXELS, _CAPTION_LENGTH = "pixels", "caption_length"
_UNACCEPTED_UID = "unaccepted_uid"
_UNEMBEDDED_UID = "member_without_embedding"
_KIND_UID = "kind_and_uid"
_GROUP_SIZE = "group_size"
_VECTOR_CHUNK = 16_384
_SUMMARY_COLUMNS = ("score", "count", "nan_count", "mean", "std", "min", "max")

_Columns = Callable[[pa.Table], pa.Table]


@dataclass(frozen=True)
class ExpectationOutcome:
    """One evaluated expectation, e.g. ``expect_column_values_to_not_be_null(caption)``."""

    expectation: str
    success: bool
    observed: dict[str, Any]


@dataclass(frozen=True)
class SuiteResult:
    """A suite's verdict and what it saw; ``rows_validated < rows`` when per-row checks were sampled."""

    suite: str
    success: bool
    rows: int
    rows_validated: int
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def failed(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.success)

    def to_metadata(self) -> dict[str, Any]:
        """Small JSON-able summary for asset-check metadata: only failed expectations in detail."""
        return {
            "suite": self.suite,
            "success": self.success,
            "rows": self.rows,
            "rows_validated": self.rows_validated,
            "evaluated": len(self.outcomes),
            "failed": [asdict(outcome) for outcome in self.failed],
        }


# -- suites -------------------------------------------------------------------------------------

def validated_samples_suite(accepted: pa.Table, min_image_side: int, max_pixels: int, max_caption_chars: int,
                            *, max_rows: int = MAX_ROWS) -> SuiteResult:
    """Accepted samples obey the ingest schema and the quarantine limits they were admitted under."""
    gxe = _expectations()
    required = [field.name for field in ACCEPTED_SCHEMA if not field.nullable]
    checks = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*ACCEPTED_SCHEMA.names, _PIXELS, _CAPTION_LENGTH],
                                         exact_match=True),
        *(gxe.ExpectColumnValuesToNotBeNull(column=name) for name in required),
        gxe.ExpectColumnValuesToMatchRegex(column="uid", regex=UID_PATTERN.pattern),
        gxe.ExpectColumnValuesToMatchRegex(column="image_sha256", regex=r"^[0-9a-f]{64}$"),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=min_image_side),
        gxe.ExpectColumnValuesToBeBetween(column=_PIXELS, min_value=1, max_value=max_pixels),
        gxe.ExpectColumnValuesToBeBetween(column="aspect_ratio", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="caption_chars", min_value=1, max_value=max_caption_chars),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="caption_chars", column_B=_CAPTION_LENGTH),
        gxe.ExpectColumnValuesToBeBetween(column="caption_words", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="language_score", min_value=0, max_value=1),
    ]
    return _validate("validated_samples", accepted, _accepted_columns, checks,
                     _select("uid"), [gxe.ExpectColumnValuesToBeUnique(column="uid")], max_rows)


def quarantine_suite(quarantine: pa.Table, *, max_rows: int = MAX_ROWS) -> SuiteResult:
    """Every quarantined sample is identified and carries a known reason code (codes are a contract)."""
    gxe = _expectations()
    required = [field.name for field in QUARANTINE_SCHEMA if not field.nullable]
    checks = [
        gxe.ExpectTableColumnsToMatchSet(column_set=QUARANTINE_SCHEMA.names, exact_match=True),
        *(gxe.ExpectColumnValuesToNotBeNull(column=name) for name in required),
        gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=[reason.value for reason in Reason]),
        gxe.ExpectColumnValuesToMatchRegex(column="uid", regex=UID_PATTERN.pattern),
    ]
    return _validate("quarantine", quarantine, lambda table: table, checks, max_rows=max_rows)


def embeddings_suite(rows: pa.Table, accepted_uids: list[str], dim: int, *, max_rows: int = MAX_ROWS) -> SuiteResult:
    """One finite unit-norm (image, text) pair of the right dimension per accepted uid, nothing else.

    Uniqueness, membership and row count together make the stored uid set equal to ``accepted_uids``.
    Membership is a derived column (the uid where it is not accepted, else null) rather than
    ``expect_column_values_to_be_in_set``: GE re-serialises a value set about a hundred times per
    validation (about 0.6 s per 10k uids, linear: 10 s for a 200k-uid shard).
    """
    gxe = _expectations()
    checks = [gxe.ExpectColumnValuesToNotBeNull(column="uid")]
    for side in ("image", "text"):
        checks += [
            gxe.ExpectColumnValuesToBeInSet(column=f"{side}_dim", value_set=[dim]),
            gxe.ExpectColumnValuesToBeInSet(column=f"{side}_finite", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column=f"{side}_norm", min_value=1 - NORM_TOLERANCE,
                                              max_value=1 + NORM_TOLERANCE),
        ]
    accepted = pa.array(accepted_uids, pa.string())

    def membership(table: pa.Table) -> pa.Table:
        if "uid" not in table.column_names:
            return table.select([])
        uid = table.column("uid")
        unaccepted = pc.if_else(pc.is_in(uid, value_set=accepted), pa.scalar(None, pa.string()), uid)
        return pa.table({"uid": uid, _UNACCEPTED_UID: unaccepted})

    whole_table = [
        gxe.ExpectColumnValuesToBeUnique(column="uid"),
        gxe.ExpectColumnValuesToBeNull(column=_UNACCEPTED_UID),
        gxe.ExpectTableRowCountToEqual(value=len(accepted_uids)),
    ]
    return _validate("embeddings", rows, _embedding_columns, checks, membership, whole_table, max_rows)


def scores_suite(scores: pa.Table, reference_size: int, with_target: bool, prompt_columns: list[str],
                 *, max_rows: int = MAX_ROWS) -> SuiteResult:
    """Score rows match ``score_schema`` and every score lies in its mathematical range (SCORES.md).

    Without a NormSim target the ``norm_sim_*`` columns must be all NaN (that is what scoring
    writes); every other score and each prompt's log importance weight must be finite.
    """
    from curation_platform.scoring.pipeline import SCORE_COLUMNS, score_schema  # pulls torch: only when needed

    if reference_size < 1:
        raise ValueError(f"reference_size must be positive, got {reference_size}")
    gxe = _expectations()
    log_n = math.log(reference_size)
    ranges = {
        "clip_score": (-COSINE_BOUND, COSINE_BOUND),
        "kl_image": (-SCORE_TOLERANCE, log_n + SCORE_TOLERANCE),
        "kl_text": (-SCORE_TOLERANCE, log_n + SCORE_TOLERANCE),
        "klr_image": (-SCORE_TOLERANCE, _FLOAT_MAX),
        "klr_text": (-SCORE_TOLERANCE, _FLOAT_MAX),
        "norm_sim_2": (0.0, _FLOAT_MAX),
        "norm_sim_inf": (-COSINE_BOUND, COSINE_BOUND),
    }
    names = score_schema([]).names
    version_at = names.index("score_version")
    checks = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*names[:version_at], *prompt_columns, *names[version_at:]],
                                         exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="uid"),
        gxe.ExpectColumnValuesToMatchRegex(column="uid", regex=UID_PATTERN.pattern),
        gxe.ExpectColumnValuesToNotBeNull(column="score_version"),
    ]
    for column in [*SCORE_COLUMNS, *prompt_columns]:
        if column.startswith("norm_sim_") and not with_target:
            checks.append(gxe.ExpectColumnValuesToBeNull(column=column))
            continue
        low, high = ranges.get(column, (-_FLOAT_MAX, _FLOAT_MAX))
        checks += [gxe.ExpectColumnValuesToNotBeNull(column=column),
                   gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high)]
    return _validate("scores", scores, lambda table: table, checks,
                     _select("uid"), [gxe.ExpectColumnValuesToBeUnique(column="uid")], max_rows)


def statistics_suite(summary: pa.Table) -> SuiteResult:
    """A per-score summary (``analysis.score_summary``) is consistent: counts, spreads, min <= mean <= max.

    ``nan_count == 0`` is required for every score present: summarise only scores that should
    be defined (not ``norm_sim_*`` without a target).
    """
    gxe = _expectations()
    checks = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*_SUMMARY_COLUMNS, "mean_above_min", "max_above_mean"],
                                         exact_match=True),
        *(gxe.ExpectColumnValuesToNotBeNull(column=name) for name in _SUMMARY_COLUMNS),
        gxe.ExpectColumnValuesToBeUnique(column="score"),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0, max_value=_FLOAT_MAX),
        gxe.ExpectColumnValuesToBeBetween(column="mean_above_min", min_value=-STATISTICS_TOLERANCE),
        gxe.ExpectColumnValuesToBeBetween(column="max_above_mean", min_value=-STATISTICS_TOLERANCE),
    ]
    return _validate("statistics", summary, _summary_columns, checks)


def duplicate_groups_suite(groups: pa.Table, embedded_uids: pa.Array, *, max_rows: int = MAX_ROWS) -> SuiteResult:
    """Duplicate groups are well formed: every member has an embedding of the teacher, a sample is in at
    most one group of each kind (groups are disjoint), every group has two or more members, and the
    similarity that joined a member is a cosine in [-1, 1] (1 for exact groups)."""
    gxe = _expectations()
    checks = [
        gxe.ExpectColumnValuesToNotBeNull(column="uid"),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["image", "caption", "near"]),
        gxe.ExpectColumnValuesToBeBetween(column="similarity", min_value=-1.0, max_value=1.0),
    ]
    embedded = pa.array(embedded_uids, pa.string())

    def membership(table: pa.Table) -> pa.Table:
        if not {"uid", "kind", "group_id"} <= set(table.column_names):
            return table.select([])
        uid = table.column("uid")
        sizes = pl.from_arrow(table.select(["kind", "group_id"])).select(pl.len().over("kind", "group_id"))
        return pa.table({
            _UNEMBEDDED_UID: pc.if_else(pc.is_in(uid, value_set=embedded), pa.scalar(None, pa.string()), uid),
            _KIND_UID: pc.binary_join_element_wise(table.column("kind"), uid, "/"),
            _GROUP_SIZE: sizes.to_series().to_arrow(),
        })

    whole_table = [
        gxe.ExpectColumnValuesToBeNull(column=_UNEMBEDDED_UID),
        gxe.ExpectColumnValuesToBeUnique(column=_KIND_UID),
        gxe.ExpectColumnValuesToBeBetween(column=_GROUP_SIZE, min_value=2),
    ]
    return _validate("duplicate_groups", groups, _select("uid", "kind", "similarity"), checks, membership,
                     whole_table, max_rows)


# -- derived columns ----------------------------------------------------------------------------

def _select(*names: str) -> _Columns:
    """Those of ``names`` the table has: a missing one fails its expectations instead of raising here."""
    return lambda table: table.select([name for name in names if name in table.column_names])


def _accepted_columns(table: pa.Table) -> pa.Table:
    """The table plus pixel count and measured caption length (absent inputs stay absent)."""
    if {"width", "height"} <= set(table.column_names):
        pixels = pc.multiply(table.column("width").cast(pa.int64()), table.column("height").cast(pa.int64()))
        table = table.append_column(_PIXELS, pixels)
    if "caption" in table.column_names:
        table = table.append_column(_CAPTION_LENGTH, pc.utf8_length(table.column("caption")).cast(pa.int64()))
    return table


def _embedding_columns(table: pa.Table) -> pa.Table:
    """Per-row dimension, L2 norm and all-finite flag of each embedding (the vectors never reach pandas)."""
    derived = table.select([name for name in ("uid",) if name in table.column_names])
    for side in ("image", "text"):
        column = f"{side}_embedding"
        if column not in table.column_names:
            continue
        kind = table.schema.field(column).type
        if not pa.types.is_fixed_size_list(kind):
            raise TypeError(f"{column} must be a fixed-size list, got {kind}")
        finite, norm = np.empty(table.num_rows, dtype=bool), np.empty(table.num_rows)
        for start in range(0, table.num_rows, _VECTOR_CHUNK):  # bounded memory for a 200k x 768 sample
            values = vectors(table.slice(start, _VECTOR_CHUNK), column)
            end = start + len(values)
            finite[start:end] = np.isfinite(values).all(axis=1)
            norm[start:end] = np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))
        derived = derived.append_column(f"{side}_dim", pa.array(np.full(table.num_rows, kind.list_size)))
        derived = derived.append_column(f"{side}_finite", pa.array(finite))
        derived = derived.append_column(f"{side}_norm", pa.array(norm))
    return derived


def _summary_columns(table: pa.Table) -> pa.Table:
    """The summary plus the mean's distance above min and below max, relative to the values' scale."""
    if not {"mean", "min", "max"} <= set(table.column_names):
        return table
    mean, low, high = (table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                       for name in ("mean", "min", "max"))
    with np.errstate(invalid="ignore"):
        scale = np.maximum.reduce([np.ones_like(mean), np.abs(low), np.abs(high)])
        return table.append_column("mean_above_min", pa.array((mean - low) / scale)).append_column(
            "max_above_mean", pa.array((high - mean) / scale))


# -- running GE ---------------------------------------------------------------------------------

_LOCK = threading.Lock()


def _expectations() -> Any:
    import great_expectations.expectations as gxe

    return gxe


@cache
def _batch_definition() -> Any:
    """One ephemeral context per process: a fresh one costs about 10 ms more per validation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # not one INFO line per context

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars would flood logs
    asset = context.data_sources.add_pandas("quality").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole")


def _validate(suite: str, table: pa.Table, columns: _Columns, checks: Sequence[Expectation],
              whole_columns: _Columns | None = None, whole_checks: Sequence[Expectation] = (),
              max_rows: int = MAX_ROWS) -> SuiteResult:
    """Run per-row checks on (a sample of) ``columns(table)`` and whole-table checks on every row."""
    sample = _sample(table, max_rows)
    if sample is table:
        frame = columns(table)
        if whole_columns is not None:
            extra = whole_columns(table)
            for name in extra.column_names:
                if name not in frame.column_names:
                    frame = frame.append_column(name, extra.column(name))
        runs = [(frame, [*checks, *whole_checks])]
    else:
        runs = [(columns(sample), list(checks))]
        if whole_columns is not None:
            runs.append((whole_columns(table), list(whole_checks)))
    outcomes = [outcome for frame, expectations in runs for outcome in _run(suite, frame, expectations)]
    return SuiteResult(suite, all(outcome.success for outcome in outcomes), table.num_rows, sample.num_rows,
                       tuple(outcomes))


def _sample(table: pa.Table, max_rows: int) -> pa.Table:
    """The table itself, or ``max_rows`` of its rows drawn without replacement (seeded, in table order)."""
    if table.num_rows <= max_rows:
        return table
    rows = np.random.default_rng(SAMPLE_SEED).choice(table.num_rows, size=max_rows, replace=False)
    return table.take(pa.array(np.sort(rows)))


def _run(suite: str, frame: pa.Table, expectations: list[Expectation]) -> list[ExpectationOutcome]:
    """Validate one frame; outcomes in the order given (GE returns them grouped by column)."""
    import great_expectations as gx

    for order, expectation in enumerate(expectations):
        expectation.meta = {"order": order}
    data = frame.to_pandas()
    result_format = {"result_format": "BASIC", "partial_unexpected_count": _PARTIAL_VALUES}
    with _LOCK:
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": data})
        result = batch.validate(gx.ExpectationSuite(name=suite, expectations=expectations),
                                result_format=result_format)
    ordered = sorted(result.results, key=lambda item: item.expectation_config.meta["order"])
    return [_outcome(item) for item in ordered]


def _outcome(item: Any) -> ExpectationOutcome:
    config = item.expectation_config
    columns = [str(config.kwargs[key]) for key in ("column", "column_A", "column_B") if key in config.kwargs]
    name = f"{config.type}({', '.join(columns)})" if columns else config.type
    details = dict(item.result or {})
    observed = {key: _jsonable(details[key]) for key in
                ("observed_value", "element_count", "unexpected_count", "unexpected_percent", "missing_count")
                if key in details}
    if details.get("partial_unexpected_list"):
        observed["partial_unexpected"] = _jsonable(details["partial_unexpected_list"][:_PARTIAL_VALUES])
    if "details" in details:
        observed["details"] = _jsonable(details["details"])
    error = _exception_message(item.exception_info)
    if error:
        observed["exception"] = error[:200]
    return ExpectationOutcome(name, bool(item.success), observed)


def _exception_message(info: Any) -> str | None:
    """GE reports a failed metric as {metric id: {...}} or a single {...}; either way, the message."""
    if not isinstance(info, dict):
        return None
    entries = [info] if "raised_exception" in info else [value for value in info.values() if isinstance(value, dict)]
    for entry in entries:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _jsonable(value: Any) -> Any:
    """numpy scalars to Python, non-finite floats and long strings to short strings, tuples to lists."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(item) for item in value]
    text = str(value)
    return text if len(text) <= _TEXT_CHARS else text[:_TEXT_CHARS] + "..."
