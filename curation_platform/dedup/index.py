"""Incremental near duplicates: approximate nearest-neighbour queries against LanceDB's vector index.

Same definition as :mod:`curation_platform.dedup.near`: two samples are near duplicates when the
cosine of their image embeddings is at least ``1 - eps``. For a new shard, every one of its rows is
queried against the pool's ``image_embedding`` index (IVF_HNSW_SQ by default, cosine; rows added since the
index was built are searched exactly by LanceDB, so a new shard is found before the index is
extended). The index returns each row's nearest neighbours, of which those within a cosine distance
of ``eps`` plus a margin for its quantisation are candidates; each candidate is then decided on a
float64 dot product of the stored vectors, as SemDeDup decides its pairs. Nothing re-clusters the pool and no old shard is read in full: the work
per shard is one scan of its own rows plus one index query per row (:class:`NearMatches` counts it).

:func:`ensure_vector_index` creates the index once the table is large enough to need one and
afterwards only extends it with unindexed rows (``optimize_indices``: no retraining); called again
with nothing new it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow.compute as pc

from curation_platform import lance_tables
from curation_platform.dedup.near import DEFAULT_EPS, FLOAT_TOLERANCE, unit_rows
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.storage import S3Settings

VECTOR_COLUMN = "image_embedding"
INDEX_NAME = "image_embedding_idx"
PAIRS_SCHEMA = {"uid": pl.String, "matches_uid": pl.String, "matches_shard": pl.String, "similarity": pl.Float64}
IndexAction = Literal["created", "extended", "unchanged", "flat"]
# IVF_PQ: new rows are appended to their partitions in 0.1 s per 10k; the HNSW graphs took 74 s per 10k
# new rows at 100k (BENCHMARKS.md, "Duplicates at scale"), so they suit pools indexed once
IndexType = Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_FLAT"]
INDEX_TYPES: tuple[str, ...] = ("IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_FLAT")


@dataclass(frozen=True)
class NearSearch:
    """How near duplicates are searched for; ``eps`` is the definition, the rest is the index's trade-off.

    ``neighbours`` bounds the matches per query (a query that fills it is asked again with a larger
    limit, up to ``max_neighbours``, and reported as saturated if it fills that too);
    ``nprobes`` IVF partitions are searched; with IVF_PQ, ``refine_factor`` x ``neighbours``
    candidates are re-ranked on the full vectors (the HNSW indexes ignore it). Below ``min_index_rows`` rows no index is built and every query is
    an exact flat search.
    """

    eps: float = DEFAULT_EPS
    neighbours: int = 32
    max_neighbours: int = 4096
    nprobes: int = 20
    refine_factor: int | None = 4
    min_index_rows: int = 5_000
    rows_per_partition: int = 4_096
    # cosine-distance slack for the index's quantisation: with IVF_HNSW_SQ at 0.02 the scored test demo
    # lost 28% of its pairs, at 0.05 0.3%, at 0.1 none (candidates are decided exactly: slack costs time only)
    candidate_margin: float = 0.1
    index_type: IndexType = "IVF_PQ"
    query_batch: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.eps < 2:
            raise ValueError(f"eps must be in [0, 2), got {self.eps}")
        for name in ("neighbours", "max_neighbours", "nprobes", "min_index_rows", "rows_per_partition", "query_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.refine_factor is not None and self.refine_factor < 1:
            raise ValueError(f"refine_factor must be >= 1 or None, got {self.refine_factor}")

    def describe(self) -> dict[str, object]:
        return {"eps": self.eps, "neighbours": self.neighbours, "max_neighbours": self.max_neighbours,
                "nprobes": self.nprobes,
                "refine_factor": self.refine_factor, "min_index_rows": self.min_index_rows,
                "candidate_margin": self.candidate_margin, "index_type": self.index_type, "metric": "cosine"}


@dataclass(frozen=True)
class IndexState:
    action: IndexAction
    indexed_rows: int
    unindexed_rows: int
    partitions: int | None = None


@dataclass(frozen=True)
class NearMatches:
    """A shard's near-duplicate pairs (``uid`` in the shard, ``matches_uid`` anywhere in the pool) and
    the work it took: rows of the shard read, index queries, candidates returned, saturated queries."""

    pairs: pl.DataFrame
    rows_read: int
    queries: int
    candidates: int
    saturated: int


def _embeddings(lance_uri: str, s3: S3Settings | None, table: str = EMBEDDINGS_TABLE):
    return lance_tables.connect(lance_uri, s3).open_table(table)


def _index_of(table) -> str | None:
    for index in table.list_indices():
        if list(index.columns) == [VECTOR_COLUMN]:
            return index.name
    return None


def ensure_vector_index(lance_uri: str, search: NearSearch = NearSearch(), s3: S3Settings | None = None,
                        table_name: str = EMBEDDINGS_TABLE) -> IndexState:
    """Create the cosine vector index on the image embeddings, or extend it with new rows; idempotent.

    IVF_PQ and IVF_HNSW_SQ are trained on the GPU (``accelerator="cuda"``) when torch sees one.
    """
    from lancedb.index import IvfHnswFlat, IvfHnswSq, IvfPq

    table = _embeddings(lance_uri, s3, table_name)
    rows = table.count_rows()
    name = _index_of(table)
    if name is None:
        if rows < search.min_index_rows:
            return IndexState("flat", 0, rows)
        partitions = max(1, rows // search.rows_per_partition)
        config = {
            "IVF_PQ": lambda: IvfPq(distance_type="cosine", num_partitions=partitions, accelerator=_accelerator()),
            "IVF_HNSW_SQ": lambda: IvfHnswSq(distance_type="cosine", num_partitions=partitions,
                                             accelerator=_accelerator()),
            "IVF_HNSW_FLAT": lambda: IvfHnswFlat(distance_type="cosine", num_partitions=partitions),
        }[search.index_type]()
        table.create_index(VECTOR_COLUMN, config=config, name=INDEX_NAME)
        stats = table.index_stats(INDEX_NAME)
        return IndexState("created", stats.num_indexed_rows, stats.num_unindexed_rows, partitions)
    stats = table.index_stats(name)
    if stats.num_unindexed_rows == 0:
        return IndexState("unchanged", stats.num_indexed_rows, 0)
    table.to_lance().optimize.optimize_indices(index_names=[name])
    stats = _embeddings(lance_uri, s3, table_name).index_stats(name)
    return IndexState("extended", stats.num_indexed_rows, stats.num_unindexed_rows)


def _accelerator() -> str | None:
    try:
        import torch
    except ImportError:  # the engine runs without torch only when nothing is embedded here
        return None
    return "cuda" if torch.cuda.is_available() else None


def shard_image_embeddings(lance_uri: str, teacher_id: str, shard: str, s3: S3Settings | None = None,
                           table_name: str = EMBEDDINGS_TABLE) -> tuple[list[str], np.ndarray]:
    """One shard's ``(uids, float32 image embeddings)`` of one teacher, sorted by uid."""
    rows = _embeddings(lance_uri, s3, table_name).to_lance().to_table(
        columns=["uid", VECTOR_COLUMN], filter=lance_tables.partition_condition(shard, teacher_id)).sort_by("uid")
    return [str(uid) for uid in rows.column("uid").to_pylist()], vectors(rows, VECTOR_COLUMN)


def near_matches(lance_uri: str, teacher_id: str, shard: str, search: NearSearch = NearSearch(),
                 s3: S3Settings | None = None, table_name: str = EMBEDDINGS_TABLE) -> NearMatches:
    """Every sample of the pool (this shard included) that a sample of ``shard`` nearly duplicates.

    Queries run in batches with ``neighbours`` results each; a query that fills its limit is asked
    again alone with a four times larger one, up to ``max_neighbours``; those still full then are
    reported as saturated (their samples may have more copies than were listed).
    """
    uids, rows = shard_image_embeddings(lance_uri, teacher_id, shard, s3, table_name)
    table = _embeddings(lance_uri, s3, table_name)
    threshold = 1.0 - search.eps - FLOAT_TOLERANCE
    unit = unit_rows(rows).astype(np.float64) if len(uids) else rows
    found: list[tuple[str, str, str, float]] = []
    candidates = queries = saturated = 0

    def query(positions: np.ndarray, limit: int) -> np.ndarray:
        """Run the queries of ``positions``; keep the decided pairs; return the positions that hit ``limit``."""
        nonlocal candidates, queries
        # the nearest ``limit`` neighbours, filtered here: LanceDB's distance_range made queries 13x slower
        # and a teacher prefilter, which scans the table's teacher column per query batch, 5x slower at 100k
        builder = (table.search(list(rows[positions]), vector_column_name=VECTOR_COLUMN).distance_type("cosine")
                   .limit(limit).nprobes(search.nprobes)
                   .select(["uid", "shard", "teacher_id", VECTOR_COLUMN, "_distance"]))
        if search.index_type == "IVF_PQ" and search.refine_factor is not None:
            builder = builder.refine_factor(search.refine_factor)
        elif search.index_type != "IVF_PQ":
            builder = builder.ef(2 * limit)
        result = builder.to_arrow()
        queries += len(positions)
        if not result.num_rows:
            return positions[:0]
        close = result.filter(pc.less_equal(result.column("_distance"), search.eps + search.candidate_margin))
        local_all = (close.column("query_index").to_numpy() if "query_index" in close.column_names
                     else np.zeros(close.num_rows, dtype=np.int64))
        full = positions[np.bincount(local_all, minlength=len(positions)) >= limit]
        result = close.filter(pc.equal(close.column("teacher_id"), teacher_id))
        candidates += result.num_rows
        if not result.num_rows:
            return full
        # a single query comes back without a query_index column
        local = (result.column("query_index").to_numpy() if "query_index" in result.column_names
                 else np.zeros(result.num_rows, dtype=np.int64))
        owners = positions[local]
        cosines = np.einsum("ij,ij->i", unit[owners], unit_rows(vectors(result, VECTOR_COLUMN)).astype(np.float64))
        others = zip(result.column("uid").to_pylist(), result.column("shard").to_pylist())
        for position, (other, other_shard), cosine in zip(owners.tolist(), others, cosines.tolist()):
            if other != uids[position] and cosine >= threshold:
                found.append((uids[position], str(other), str(other_shard), min(cosine, 1.0)))
        return full

    for start in range(0, len(uids), search.query_batch):
        full = query(np.arange(start, min(start + search.query_batch, len(uids))), search.neighbours + 1)
        limit = search.neighbours + 1
        while len(full) and limit < search.max_neighbours:
            limit = min(4 * limit, search.max_neighbours)
            full = np.concatenate([query(np.array([position]), limit) for position in full])
        saturated += len(full)
    pairs = pl.DataFrame(found, schema=PAIRS_SCHEMA, orient="row").unique(["uid", "matches_uid"]).sort(
        "uid", "matches_uid")
    return NearMatches(pairs, rows_read=len(uids), queries=queries, candidates=candidates, saturated=saturated)
