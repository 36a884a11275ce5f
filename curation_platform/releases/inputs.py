"""What a release reads, at pinned versions: where from (:class:`ReleaseSources`), which LanceDB table
versions (:func:`table_versions`, pinned with ``release-<name>-<version>`` tags by :func:`_pin` so
version cleanup cannot remove them), the score provenance every score row must share, the pool frame a
recipe selects from (scores joined with the validated sample metadata, :func:`pool_frame`, read one
shard at a time by a release's passes), and the input shards with the checksums they were validated from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds

from curation_platform import lance_tables, storage
from curation_platform.dedup.tables import (
    CONTAMINATION_TABLE,
    GROUPS_TABLE,
    evaluation_set_names,
    read_groups,
    selection_columns,
)
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE
from curation_platform.layout import ShardOutputs
from curation_platform.releases.recipe import Recipe, RecipeError
from curation_platform.scoring.pipeline import (
    PER_PROMPT_PARAMS,
    REFERENCE_TABLE,
    SCORES_TABLE,
    TARGET_TABLE,
    prompt_columns_of,
    score_filter,
)
from curation_platform.storage import S3Settings

# the validated sample metadata (``samples/`` parquet) a pool frame joins onto the score rows; the
# original (pre-resize) sizes feed DataComp's basic filter
VALIDATED_SAMPLE_COLUMNS = ("uid", "key", "shard", "shard_id", "caption", "language", "caption_words",
                            "caption_chars", "width", "height", "aspect_ratio", "original_width", "original_height",
                            "image_offset", "image_bytes")
# columns that samples validated by older ingestions may lack (a frame without them falls back to decoded sizes)
OPTIONAL_SAMPLE_COLUMNS = ("original_width", "original_height")
# every table a release reads
TABLES = (SCORES_TABLE, REFERENCE_TABLE, TARGET_TABLE, EMBEDDINGS_TABLE, GROUPS_TABLE, CONTAMINATION_TABLE)
REPORT_READERS = 32  # concurrent reads of per-shard validation reports
REPORT_MAX_ROWS = 2_000_000  # larger pools are drawn in the report from a uniform uid sample of this size


@dataclass(frozen=True)
class ReleaseSources:
    """Where a release reads from: the score tables of one teacher and the validated samples."""

    lance_uri: str
    validated_uri: str
    teacher_id: str
    pool_uri: str | None = None  # for example images in the report
    s3: S3Settings | None = field(default=None, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"lance_uri": self.lance_uri, "validated_uri": self.validated_uri, "teacher_id": self.teacher_id,
                "pool_uri": self.pool_uri}


# -- pinned table versions ----------------------------------------------------------------------

def table_versions(sources: ReleaseSources) -> dict[str, int]:
    """The current version of every table a release reads (those that exist)."""
    database = lance_tables.connect(sources.lance_uri, sources.s3)
    names = set(database.list_tables().tables)
    return {name: database.open_table(name).version for name in TABLES if name in names}


def _tag(name: str, version: int) -> str:
    return f"release-{name}-{version}"


def _pin(sources: ReleaseSources, versions: dict[str, int], name: str, version: int) -> None:
    """Tag every table version the release read, so version cleanup cannot remove them."""
    database = lance_tables.connect(sources.lance_uri, sources.s3)
    tag = _tag(name, version)
    for table_name, table_version in versions.items():
        tags = database.open_table(table_name).tags
        existing = tags.list().get(tag)
        if existing is not None and existing["version"] != table_version:
            tags.delete(tag)  # left by an attempt that crashed before publishing
        if existing is None or existing["version"] != table_version:
            tags.create(tag, table_version)


def index_shards(sources: ReleaseSources) -> bool:
    """Index the scores table's ``shard`` column (a release loads one shard at a time)."""
    database = lance_tables.connect(sources.lance_uri, sources.s3)
    if SCORES_TABLE not in database.list_tables().tables:
        return False
    return lance_tables.index_column(database.open_table(SCORES_TABLE), "shard")


# -- score provenance ---------------------------------------------------------------------------

SCORE_PROVENANCE = ("score_version", "score_params", "reference_id", "target_id")


def _scores_at(sources: ReleaseSources, versions: dict[str, int]) -> Any:
    table = lance_tables.connect(sources.lance_uri, sources.s3).open_table(SCORES_TABLE)
    table.checkout(versions[SCORES_TABLE])
    return table.to_lance()


def _score_identity(score_params: str | None) -> str | None:
    """``score_params`` without the prompt-only parameters, which rows scored before prompt columns had
    their own provenance still carry (they change no other score)."""
    if score_params is None:
        return None
    described = json.loads(score_params)
    params = described.get("params")
    if isinstance(params, dict):
        described["params"] = {name: value for name, value in params.items() if name not in PER_PROMPT_PARAMS}
    return json.dumps(described, sort_keys=True)


def score_provenance(sources: ReleaseSources, versions: dict[str, int]) -> dict[str, Any]:
    """The score version, parameters, reference and target that every one of the teacher's score rows
    was computed with, read batch by batch; a table that mixes them cannot be released from. Also each
    prompt column's own provenance recorded for the teacher (``prompt_columns``: prompt, a_w, the
    prompt embedding's sha256), which adding a prompt to a scored pool leaves the rows' unchanged."""
    dataset = _scores_at(sources, versions)
    scanner = dataset.scanner(columns=list(SCORE_PROVENANCE), filter=score_filter(sources.teacher_id))
    identities: dict[str | None, str | None] = {}
    seen: set[tuple] = set()
    for batch in scanner.to_batches():
        distinct = pa.Table.from_batches([batch]).group_by(list(SCORE_PROVENANCE)).aggregate([])
        for row in distinct.to_pylist():
            if row["score_params"] not in identities:
                identities[row["score_params"]] = _score_identity(row["score_params"])
            row["score_params"] = identities[row["score_params"]]
            seen.add(tuple(row[name] for name in SCORE_PROVENANCE))
    if not seen:
        raise RecipeError(f"no scores of teacher {sources.teacher_id} in {sources.lance_uri}")
    if len(seen) > 1:
        mixed = [name for index, name in enumerate(SCORE_PROVENANCE) if len({combo[index] for combo in seen}) > 1]
        raise RecipeError(f"the score rows of teacher {sources.teacher_id} differ in {mixed}: re-score the stale "
                          "shards against the current reference and target before releasing")
    (values,) = seen
    provenance = dict(zip(SCORE_PROVENANCE, values))
    provenance["score_params"] = json.loads(provenance["score_params"])
    provenance["prompt_columns"] = {name: column.describe() for name, column in
                                    prompt_columns_of(dataset.schema, sources.teacher_id).items()}
    return provenance


# -- the pool frame -----------------------------------------------------------------------------

def _frame_of(batches: Any, schema: pa.Schema, columns: list[str]) -> pl.DataFrame:
    """Arrow batches into one polars frame, converting batch by batch so Arrow copies stay one batch large."""
    frames = [pl.from_arrow(batch) for batch in batches if batch.num_rows]
    if not frames:
        return pl.from_arrow(schema.empty_table().select(columns))
    return pl.concat(frames, rechunk=False)


def pool_frame(sources: ReleaseSources, versions: dict[str, int], columns: Sequence[str] | None = None,
               uid_below: str | None = None, shard: str | None = None) -> pl.DataFrame:
    """One row per scored sample of the teacher at the given table versions, joined with its metadata,
    sorted by uid.

    ``columns`` (besides uid, shard, key and shard_id, always read) projects the score and sample
    columns, so a selection holds only what its recipe reads; ``uid_below`` reads a uniform sample
    (:func:`curation_platform.scoring.pipeline.uid_sample_bound`); ``shard`` reads one shard's rows
    (a release's partition). The per-table constants come from :func:`score_provenance`. Memory per
    row: BENCHMARKS.md, "Pool-wide steps".
    """
    dataset = _scores_at(sources, versions)
    score_columns = [name for name in dataset.schema.names
                     if name not in ("row_key", "teacher_id", *SCORE_PROVENANCE)
                     and (columns is None or name in ("uid", "shard", *columns))]
    condition = score_filter(sources.teacher_id, shard=shard, uid_below=uid_below)
    scores = _frame_of(dataset.to_batches(columns=score_columns, filter=condition), dataset.schema,
                       score_columns).sort("uid")
    if scores.height == 0 and uid_below is None and shard is None:
        raise RecipeError(f"no scores of teacher {sources.teacher_id} in {sources.lance_uri}")
    samples_uri = (ShardOutputs.samples_root(sources.validated_uri) if shard is None
                   else ShardOutputs.of(sources.validated_uri, shard).samples)
    filesystem, local = storage.filesystem_for(samples_uri, sources.s3)
    parquet = ds.dataset(local, filesystem=filesystem, format="parquet")
    sample_columns = ["uid", *(name for name in VALIDATED_SAMPLE_COLUMNS if name not in score_columns
                               and (columns is None or name in ("key", "shard_id", *columns))
                               and (name not in OPTIONAL_SAMPLE_COLUMNS or name in parquet.schema.names))]
    samples = _frame_of(parquet.to_batches(columns=sample_columns, filter=None if uid_below is None
                                           else ds.field("uid") < uid_below), parquet.schema, sample_columns)
    frame = scores.join(samples, on="uid", how="inner", maintain_order="left")
    if frame.height != scores.height:
        raise RecipeError(f"{scores.height - frame.height} scored samples have no validated metadata in "
                          f"{sources.validated_uri}: re-ingest or re-score")
    return frame


def available_columns(sources: ReleaseSources, versions: dict[str, int]) -> list[str]:
    """Every score column of the table version and every sample column a recipe may name."""
    return [*_scores_at(sources, versions).schema.names, *VALIDATED_SAMPLE_COLUMNS]


def shard_rows(sources: ReleaseSources, versions: dict[str, int]) -> dict[str, int]:
    """Scored rows of the teacher per shard, counted batch by batch from the shard column alone."""
    counts: dict[str, int] = {}
    scanner = _scores_at(sources, versions).scanner(columns=["shard"], filter=score_filter(sources.teacher_id))
    for batch in scanner.to_batches():
        for row in pa.Table.from_batches([batch]).group_by("shard").aggregate([("shard", "count")]).to_pylist():
            counts[row["shard"]] = counts.get(row["shard"], 0) + row["shard_count"]
    if not counts:
        raise RecipeError(f"no scores of teacher {sources.teacher_id} in {sources.lance_uri}")
    return dict(sorted(counts.items()))


def duplicate_columns(recipe: Recipe, sources: ReleaseSources, versions: dict[str, int]) -> pl.DataFrame:
    """The duplicate-group ids and contamination flags of the pinned duplicate tables, per grouped or
    flagged uid (the rows ``dedup`` and ``decontaminate`` read), after checking the recipe can use them."""
    check_duplicate_inputs(recipe, sources, versions)
    return read_duplicate_columns(sources, versions)


def check_duplicate_inputs(recipe: Recipe, sources: ReleaseSources, versions: dict[str, int]) -> None:
    """Refuse a dedup or decontaminate recipe without duplicate groups or with unregistered evaluation sets."""
    if GROUPS_TABLE not in versions:
        raise RecipeError(f"recipe {recipe.name!r} has a dedup or decontaminate stage but {sources.lance_uri} has no "
                          "duplicate groups: materialise duplicate_groups (or run the main job) first")
    registered = evaluation_set_names(sources.lance_uri, sources.teacher_id, sources.s3)
    for stage in recipe.stages:
        unknown = sorted(set(stage.get("sets", [])) - set(registered)) if stage["type"] == "decontaminate" else []
        if unknown:
            raise RecipeError(f"recipe {recipe.name!r} decontaminates against {unknown}, not registered evaluation "
                              f"sets (registered: {registered})")


def read_duplicate_columns(sources: ReleaseSources, versions: dict[str, int]) -> pl.DataFrame:
    return selection_columns(read_groups(sources.lance_uri, sources.teacher_id, sources.s3, versions))


def _input_shards(rows: dict[str, int], sources: ReleaseSources) -> list[dict[str, Any]]:
    """Each input shard with its scored rows and the id and content checksum it was validated with
    (reports read concurrently: one object-store round trip each, 128,000 of them at 1.28B samples)."""
    def identity(shard: str) -> dict[str, Any]:
        report_uri = ShardOutputs.of(sources.validated_uri, shard).report
        if not storage.exists(report_uri, sources.s3):
            return {}
        return json.loads(storage.read_bytes(report_uri, sources.s3))

    with ThreadPoolExecutor(max_workers=REPORT_READERS) as pool:
        reports = list(pool.map(identity, rows))
    return [{"shard": shard, "shard_id": report.get("shard_id"), "checksum": report.get("checksum"),
             "samples": samples} for (shard, samples), report in zip(rows.items(), reports, strict=True)]
