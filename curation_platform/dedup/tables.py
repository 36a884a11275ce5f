"""The duplicate tables in LanceDB: per-shard pairs, then pool-wide groups and contamination flags.

* ``duplicate_pairs`` (one writer per shard): for each sample of a shard, the pool samples it nearly
  duplicates (``matches_set = "pool"``) and the images of registered evaluation sets it nearly
  copies (``matches_set`` = the set's name). A shard's rows are replaced as a whole on every run.
* ``duplicate_groups`` (pool-wide, rebuilt from the pairs and the exact index without reading any
  embedding): one row per member of every group of two or more: ``kind`` ``image`` (same bytes),
  ``caption`` (same normalised caption) or ``near`` (connected components of the near pairs), the
  ``group_id`` (the shared hash, or the group's smallest uid) and the ``similarity`` that joined the
  member (the highest cosine of its pairs; 1.0 for exact groups).
* ``contamination``: one row per (pool sample, evaluation set) it nearly copies, with the closest
  evaluation image and its cosine.

Groups depend only on the set of pairs, never on the order in which shards arrived. A rebuild whose
rows equal the stored ones writes nothing, so re-running keeps the table version releases pinned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from curation_platform import lance_tables
from curation_platform.dedup.exact import DUPLICATE_KINDS, ExactDuplicateIndex
from curation_platform.dedup.near import FLOAT_TOLERANCE, UnionFind
from curation_platform.storage import S3Settings

PAIRS_TABLE = "duplicate_pairs"
GROUPS_TABLE = "duplicate_groups"
CONTAMINATION_TABLE = "contamination"
POOL_SET = "pool"
GROUP_KINDS = (*DUPLICATE_KINDS, "near")

PAIRS_SCHEMA = pa.schema([
    pa.field("row_key", pa.string(), nullable=False),
    pa.field("teacher_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("uid", pa.string(), nullable=False),
    pa.field("matches_set", pa.string(), nullable=False),
    pa.field("matches_uid", pa.string(), nullable=False),
    pa.field("matches_shard", pa.string()),
    pa.field("similarity", pa.float64(), nullable=False),
    pa.field("eps", pa.float64(), nullable=False),
])
GROUPS_SCHEMA = pa.schema([
    pa.field("row_key", pa.string(), nullable=False),
    pa.field("teacher_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("uid", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("similarity", pa.float64(), nullable=False),
    pa.field("eps", pa.float64()),
])
CONTAMINATION_SCHEMA = pa.schema([
    pa.field("row_key", pa.string(), nullable=False),
    pa.field("teacher_id", pa.string(), nullable=False),
    pa.field("uid", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("eval_uid", pa.string(), nullable=False),
    pa.field("similarity", pa.float64(), nullable=False),
])
GROUP_COLUMNS = ("kind", "group_id", "uid", "shard", "similarity", "eps")
CONTAMINATION_COLUMNS = ("uid", "shard", "eval_set", "eval_uid", "similarity")


def _teacher(teacher_id: str) -> str:
    return f"teacher_id = {lance_tables.sql_string(teacher_id)}"


def write_shard_pairs(lance_uri: str, teacher_id: str, shard: str, near: pl.DataFrame, copies: pl.DataFrame,
                      eps: float, s3: S3Settings | None = None, contamination_eps: float | None = None) -> int:
    """Replace one shard's pairs: ``near`` (uid, matches_uid, matches_shard, similarity) within the pool,
    searched at ``eps``, ``copies`` (uid, eval_set, eval_uid, similarity) of evaluation images, searched at
    ``contamination_eps`` (default ``eps``); returns the table version."""
    contamination_eps = eps if contamination_eps is None else contamination_eps
    frames = [
        near.select("uid", pl.lit(POOL_SET).alias("matches_set"), "matches_uid", "matches_shard", "similarity",
                    pl.lit(float(eps)).alias("eps")),
        copies.select("uid", pl.col("eval_set").alias("matches_set"), pl.col("eval_uid").alias("matches_uid"),
                      pl.lit(None, dtype=pl.String).alias("matches_shard"), "similarity",
                      pl.lit(float(contamination_eps)).alias("eps")),
    ]
    rows = (pl.concat(frames, how="vertical_relaxed")
            .with_columns(pl.lit(teacher_id).alias("teacher_id"), pl.lit(shard).alias("shard"))
            .with_columns(row_key=pl.concat_str("teacher_id", "shard", "matches_set", "uid", "matches_uid",
                                                separator="/"))
            .sort("row_key"))
    data = rows.select(PAIRS_SCHEMA.names).to_arrow().cast(PAIRS_SCHEMA)
    database = lance_tables.connect(lance_uri, s3)
    return lance_tables.replace_partition(
        lambda: lance_tables.open_or_create(database, PAIRS_TABLE, PAIRS_SCHEMA, ["row_key"]), ["row_key"],
        lance_tables.partition_condition(shard, teacher_id),
        lambda: pa.RecordBatchReader.from_batches(PAIRS_SCHEMA, data.to_batches()))


def _read(lance_uri: str, name: str, teacher_id: str, columns: Sequence[str], s3: S3Settings | None,
          version: int | None = None) -> pl.DataFrame | None:
    database = lance_tables.connect(lance_uri, s3)
    if name not in database.list_tables().tables:
        return None
    table = database.open_table(name)
    if version is not None:
        table.checkout(version)
    rows = table.to_lance().to_table(columns=list(columns), filter=_teacher(teacher_id))
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame


def connected_components(edges: pl.DataFrame) -> pl.DataFrame:
    """Connected components of undirected ``(uid, matches_uid, similarity)`` edges: each member with its
    group id (the component's smallest uid) and the highest similarity among its edges."""
    members = pl.concat([edges["uid"], edges["matches_uid"]]).unique().sort()
    code = {uid: index for index, uid in enumerate(members.to_list())}
    union = UnionFind(len(code))  # the root is the smallest code, i.e. the smallest uid
    for left, right in zip(edges["uid"].to_list(), edges["matches_uid"].to_list()):
        union.union(code[left], code[right])
    names = members.to_list()
    roots = [names[union.find(index)] for index in range(len(names))]
    best = (pl.concat([edges.select("uid", "similarity"),
                       edges.select(pl.col("matches_uid").alias("uid"), "similarity")])
            .group_by("uid").agg(pl.col("similarity").max()))
    return pl.DataFrame({"uid": names, "group_id": roots}).join(best, on="uid")


@dataclass(frozen=True)
class DuplicateGroups:
    groups: pl.DataFrame  # GROUP_COLUMNS
    contamination: pl.DataFrame  # CONTAMINATION_COLUMNS

    def summary(self, pool_rows: int) -> dict[str, object]:
        """Counts per kind (groups, members, share of the pool, samples a dedup would drop)."""
        per_kind: dict[str, object] = {}
        for kind in GROUP_KINDS:
            members = self.groups.filter(pl.col("kind") == kind)
            groups = members["group_id"].n_unique()
            per_kind[kind] = {"groups": groups, "members": members.height, "removable": members.height - groups,
                              "pool_share": members.height / pool_rows if pool_rows else 0.0}
        in_any = self.groups["uid"].n_unique()
        sets = self.contamination.group_by("eval_set").len().sort("eval_set")
        return {"pool_rows": pool_rows, "in_any_group": in_any,
                "in_any_group_share": in_any / pool_rows if pool_rows else 0.0, "kinds": per_kind,
                "contaminated": dict(sets.iter_rows())}


def build_groups(exact: ExactDuplicateIndex, lance_uri: str, teacher_id: str, eps: float,
                 s3: S3Settings | None = None, contamination_eps: float | None = None) -> DuplicateGroups:
    """Groups of every kind and contamination flags, from the exact index and the stored pairs at ``eps``
    (``contamination_eps`` for the evaluation copies, default ``eps``; pairs were searched at some eps >=
    these, and a smaller one keeps the closer pairs only)."""
    contamination_eps = eps if contamination_eps is None else contamination_eps
    exact_groups = [exact.groups(kind).with_columns(pl.lit(1.0).alias("similarity"),
                                                    pl.lit(None, dtype=pl.Float64).alias("eps"))
                    for kind in DUPLICATE_KINDS]
    pairs = _read(lance_uri, PAIRS_TABLE, teacher_id, ["uid", "shard", "matches_set", "matches_uid",
                                                       "matches_shard", "similarity", "eps"], s3)
    if pairs is None:
        pairs = pl.DataFrame(schema={"uid": pl.String, "shard": pl.String, "matches_set": pl.String,
                                     "matches_uid": pl.String, "matches_shard": pl.String,
                                     "similarity": pl.Float64, "eps": pl.Float64})
    for name, wanted, rows in (("near duplicates", eps, pairs.filter(pl.col("matches_set") == POOL_SET)),
                               ("evaluation copies", contamination_eps, pairs.filter(pl.col("matches_set") != POOL_SET))):
        searched = rows["eps"].min()
        if searched is not None and wanted > searched + 1e-12:
            raise ValueError(f"{name} were searched at eps {searched}; eps {wanted} needs a new search")
    near = pairs.filter(pl.col("matches_set") == POOL_SET, pl.col("similarity") >= 1.0 - eps - FLOAT_TOLERANCE)
    shards = pl.concat([near.select("uid", "shard"),
                        near.select(pl.col("matches_uid").alias("uid"), pl.col("matches_shard").alias("shard"))]
                       ).drop_nulls().unique("uid", keep="first")
    components = connected_components(near) if near.height else pl.DataFrame(
        schema={"uid": pl.String, "group_id": pl.String, "similarity": pl.Float64})
    near_groups = (components.join(shards, on="uid", how="left")
                   .select(pl.lit("near").alias("kind"), "group_id", "uid", "shard", "similarity",
                           pl.lit(float(eps)).alias("eps")))
    groups = (pl.concat([*(frame.select(GROUP_COLUMNS) for frame in exact_groups), near_groups],
                        how="vertical_relaxed")
              .sort("kind", "group_id", "uid"))
    copies = pairs.filter(pl.col("matches_set") != POOL_SET,
                          pl.col("similarity") >= 1.0 - contamination_eps - FLOAT_TOLERANCE)
    contamination = (copies.sort("similarity", "matches_uid", descending=[True, False])
                     .group_by("uid", "matches_set", maintain_order=True).first()
                     .select("uid", "shard", pl.col("matches_set").alias("eval_set"),
                             pl.col("matches_uid").alias("eval_uid"), "similarity")
                     .sort("eval_set", "uid"))
    return DuplicateGroups(groups, contamination)


def _store(lance_uri: str, name: str, schema: pa.Schema, teacher_id: str, frame: pl.DataFrame,
           columns: Sequence[str], key: Sequence[str], s3: S3Settings | None) -> int:
    """Make the teacher's rows of ``name`` exactly ``frame``; an unchanged frame writes nothing."""
    database = lance_tables.connect(lance_uri, s3)
    stored = _read(lance_uri, name, teacher_id, columns, s3)
    if stored is not None and stored.sort(list(columns)).equals(frame.select(columns).sort(list(columns))):
        return int(database.open_table(name).version)
    rows = (frame.with_columns(pl.lit(teacher_id).alias("teacher_id"))
            .with_columns(row_key=pl.concat_str("teacher_id", *key, separator="/")))
    data = rows.select(schema.names).to_arrow().cast(schema)
    return lance_tables.replace_partition(
        lambda: lance_tables.open_or_create(database, name, schema, ["row_key"]), ["row_key"], _teacher(teacher_id),
        lambda: pa.RecordBatchReader.from_batches(schema, data.to_batches()), update_only_where=None)


def write_groups(lance_uri: str, teacher_id: str, groups: DuplicateGroups, s3: S3Settings | None = None
                 ) -> dict[str, int]:
    """Store both pool-wide tables; returns their versions."""
    return {
        GROUPS_TABLE: _store(lance_uri, GROUPS_TABLE, GROUPS_SCHEMA, teacher_id, groups.groups, GROUP_COLUMNS,
                             ("kind", "uid"), s3),
        CONTAMINATION_TABLE: _store(lance_uri, CONTAMINATION_TABLE, CONTAMINATION_SCHEMA, teacher_id,
                                    groups.contamination, CONTAMINATION_COLUMNS, ("eval_set", "uid"), s3),
    }


def read_groups(lance_uri: str, teacher_id: str, s3: S3Settings | None = None,
                versions: dict[str, int] | None = None) -> DuplicateGroups:
    """The stored tables (at ``versions`` where given); empty frames where a table does not exist."""
    versions = versions or {}
    groups = _read(lance_uri, GROUPS_TABLE, teacher_id, GROUP_COLUMNS, s3, versions.get(GROUPS_TABLE))
    contamination = _read(lance_uri, CONTAMINATION_TABLE, teacher_id, CONTAMINATION_COLUMNS, s3,
                          versions.get(CONTAMINATION_TABLE))
    empty_groups = pl.from_arrow(GROUPS_SCHEMA.empty_table().select(list(GROUP_COLUMNS)))
    empty_contamination = pl.from_arrow(CONTAMINATION_SCHEMA.empty_table().select(list(CONTAMINATION_COLUMNS)))
    return DuplicateGroups(groups if groups is not None else empty_groups,
                           contamination if contamination is not None else empty_contamination)


def selection_columns(groups: DuplicateGroups) -> pl.DataFrame:
    """Per grouped or flagged uid: ``dup_image``, ``dup_caption``, ``dup_near`` (group ids) and
    ``contaminated_by`` (sorted evaluation-set names), for the ``dedup`` and ``decontaminate`` stages."""
    wide = (groups.groups.select("uid", "kind", "group_id")
            .pivot("kind", index="uid", values="group_id", aggregate_function="first"))
    for kind in GROUP_KINDS:
        if kind not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.String).alias(kind))
    wide = wide.select("uid", *[pl.col(kind).alias(f"dup_{kind}") for kind in GROUP_KINDS])
    flags = groups.contamination.group_by("uid").agg(pl.col("eval_set").unique().sort().alias("contaminated_by"))
    return wide.join(flags, on="uid", how="full", coalesce=True).sort("uid")


def evaluation_set_names(lance_uri: str, teacher_id: str, s3: S3Settings | None = None) -> list[str]:
    """The names of the evaluation sets embedded for the teacher (sorted)."""
    from curation_platform.dedup.contamination import EVALUATION_TABLE

    rows = _read(lance_uri, EVALUATION_TABLE, teacher_id, ["description"], s3)
    if rows is None:
        return []
    names = {json.loads(text or "{}").get("name") for text in rows["description"].unique().to_list()}
    return sorted(name for name in names if name)
