"""Applying a recipe to the pool shard by shard, so no process holds the pool.

Pass 1 and the global step (:class:`~curation_platform.partitioned_selection.PartitionedPool`): the
recipe's leading row filters, top fractions and dedup stages are resolved into exact per-row cuts from
small per-shard summaries; truly global stages (``rank_sum``, NormSim-D, DataComp's value threshold)
run on the rows that survive that prefix; the size bound (``max_size`` by ``rank_by``) is one more cut.
Pass 2: each shard applies the cuts and writes its selected rows, sorted by uid, into a scratch folder.
The release step (:func:`write_samples`) merges those sorted files in bounded memory into
``samples.parquet`` (with the recipe's weights) and DataComp's ``subset.npy``.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation_platform import lance_tables
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.partitioned_selection import Membership, PartitionedPool, TopCount, split_partitionable
from curation_platform.releases.artefacts import subset_array
from curation_platform.releases.inputs import ReleaseSources, release_partitions, shard_rows
from curation_platform.releases.recipe import Recipe, RecipeError
from curation_platform.scoring.pipeline import SCORE_COLUMNS
from curation_platform.scoring.scores import normalise_log_weights
from curation_platform.selection import FunnelStage, SelectionResult, label, run_selection

SIZE_BOUNDS = "size bounds and exclusions"
ROW_GROUP_ROWS = 1 << 20  # samples.parquet row groups (pyarrow's default, so small releases keep their bytes)
MERGE_BATCH_ROWS = 1 << 16  # rows read at a time from each sorted run
MERGE_FAN_IN = 256  # sorted runs merged at once; more are merged in levels through scratch files


@dataclass(frozen=True)
class ShardSelection:
    """What pass 2 reports of one shard: rows written, and the weakest value of each used score."""

    rows: int
    weakest: dict[str, float | None]


@dataclass(frozen=True)
class Selected:
    """A recipe's selection on the pool: the funnel, the per-shard sorted files of the selected rows,
    the cut-off each score ended at, and the scored rows per input shard."""

    selection: SelectionResult  # funnel and policies; its uids stay in the files
    funnel: list[dict[str, Any]]
    files: list[Path]
    count: int
    cutoffs: dict[str, float]
    shard_rows: dict[str, int]

    @property
    def pool_rows(self) -> int:
        return self.selection.pool_rows


def release_columns(recipe: Recipe) -> list[str]:
    """The score columns ``samples.parquet`` carries (besides uid, shard, key and the weight)."""
    return [name for name in recipe.scores_used() if name in SCORE_COLUMNS or name.startswith("iw_")]


@dataclass(frozen=True)
class _WriteSelectedRows:
    """Pass 2 in the worker: one shard's selected rows (sorted by uid) into ``folder`` (picklable)."""

    folder: str
    columns: tuple[str, ...]

    def __call__(self, index: int, rows: pl.DataFrame) -> ShardSelection:
        weakest = {name: rows[name].fill_nan(None).min() for name in self.columns[3:]}
        if rows.height or index == 0:  # the first shard's file always exists: it carries the schema
            pq.write_table(rows.select(self.columns).to_arrow(), Path(self.folder) / f"{index:08d}.parquet")
        return ShardSelection(rows.height, weakest)


def select(recipe: Recipe, sources: ReleaseSources, versions: dict[str, int], provenance: dict[str, Any],
           scratch: Path, exclude: Sequence[str] = (), executor: Executor | None = None) -> Selected:
    """Run the recipe on the pinned tables, shard by shard (``executor`` runs the per-shard passes);
    the selected rows land in ``scratch`` and the result says what was kept where."""
    if recipe.needs_target() and provenance["target_id"] is None:
        raise RecipeError(f"recipe {recipe.name!r} uses NormSim but the scores have no NormSim target: "
                          "score with a target first")
    rows = shard_rows(sources, versions)
    pool_size = sum(rows.values())
    pool = PartitionedPool(release_partitions(recipe, sources, versions, list(rows)), executor)
    stages = recipe.policies(_embedding_fetcher(sources, versions.get(EMBEDDINGS_TABLE)))
    prefix, rest = split_partitionable(stages)
    resolved = pool.resolve(prefix, pool_size)
    funnel = [FunnelStage("pool", pool_size)]
    if rest:
        survivors = pl.concat([frame for _, frame in pool.apply(resolved, write=_rows)], how="vertical_relaxed")
        tail = run_selection(survivors.sort("uid"), rest, pool_size)
        resolved.append(Membership(pl.Series("uid", tail.uids, dtype=pl.String), keep=True))
        del survivors
    bounded = len(resolved)
    if recipe.max_size is not None:
        resolved = pool.resolve([TopCount(recipe.rank_by, recipe.max_size)], pool_size, resolved)
        bounded += 1
    if exclude:
        resolved.append(Membership(pl.Series("uid", sorted(exclude), dtype=pl.String), keep=False))
    columns = ("uid", "shard", "key", *release_columns(recipe))
    counts = np.zeros(len(resolved), dtype=np.int64)
    shards: list[ShardSelection] = []
    for shard_counts, written in pool.apply(resolved, write=_WriteSelectedRows(str(scratch), columns)):
        counts += shard_counts
        shards.append(written)
    funnel += [FunnelStage(label(stage.describe()), int(count)) for stage, count in zip(prefix, counts)]
    if rest:
        funnel += tail.funnel[1:]
    bound = int(counts[bounded - 1]) if bounded else pool_size
    if bound < recipe.min_size:
        raise RecipeError(f"recipe {recipe.name!r} selects {bound} samples, fewer than min_size {recipe.min_size}")
    count = int(counts[-1]) if len(resolved) else pool_size
    stages_funnel = [stage._asdict() for stage in funnel]
    if recipe.max_size is not None or exclude:
        stages_funnel.append({"stage": SIZE_BOUNDS, "rows": count})
    selection = SelectionResult(pa.array([], pa.large_string()), funnel, [stage.describe() for stage in stages])
    return Selected(selection, stages_funnel, sorted(scratch.glob("*.parquet")), count, _cutoffs(shards), rows)


def _rows(index: int, rows: pl.DataFrame) -> pl.DataFrame:
    return rows


def _cutoffs(shards: list[ShardSelection]) -> dict[str, float]:
    """For each score ``samples.parquet`` carries, the weakest value that made it into the release."""
    cutoffs: dict[str, float] = {}
    for shard in shards:
        for name, value in shard.weakest.items():
            if value is not None:
                cutoffs[name] = min(cutoffs.get(name, value), float(value))
    return cutoffs


def _embedding_fetcher(sources: ReleaseSources, version: int | None) -> Callable[[pa.Array], np.ndarray]:
    """uids -> image embeddings (NormSim-D), read from the pinned embeddings table version (``None``
    only for releases made before the embeddings table was pinned: then the current version)."""
    def fetch(uids: pa.Array) -> np.ndarray:
        table = lance_tables.connect(sources.lance_uri, sources.s3).open_table(EMBEDDINGS_TABLE)
        if version is not None:
            table.checkout(version)
        rows = table.to_lance().to_table(
            columns=["uid", "image_embedding"],
            filter=f"teacher_id = {lance_tables.sql_string(sources.teacher_id)}")
        order = pl.from_arrow(rows.select(["uid"])).with_row_index().join(
            pl.DataFrame({"uid": pl.Series(uids).cast(pl.String)}).with_row_index("want"), on="uid").sort("want")
        if order.height != len(uids):
            raise RecipeError("some selected samples have no embeddings of the teacher")
        return vectors(rows, "image_embedding")[order["index"].to_numpy()]

    return fetch


# -- the release step: merging the sorted shard files -------------------------------------------

def sorted_merge(paths: Sequence[Path], columns: Sequence[str] | None = None,
                 batch_rows: int = MERGE_BATCH_ROWS, fan_in: int = MERGE_FAN_IN) -> Iterator[pa.Table]:
    """The rows of parquet files each sorted by uid, as tables in global uid order.

    Memory: ``fan_in`` batches of ``batch_rows``; beyond ``fan_in`` files, groups of them are merged
    into scratch files first (levels of an external merge sort).
    """
    if len(paths) <= fan_in:
        yield from _merge_runs(paths, columns, batch_rows)
        return
    with tempfile.TemporaryDirectory(prefix="release-merge-") as folder:
        runs = [_merged_run(paths[start:start + fan_in], Path(folder) / f"{start:08d}.parquet", batch_rows)
                for start in range(0, len(paths), fan_in)]
        yield from sorted_merge(runs, columns, batch_rows, fan_in)


def _merged_run(paths: Sequence[Path], run: Path, batch_rows: int) -> Path:
    """Merge ``paths`` into one sorted file ``run`` (an empty file keeps the first input's schema)."""
    writer = None
    for table in _merge_runs(paths, None, batch_rows):
        writer = writer or pq.ParquetWriter(run, table.schema)
        writer.write_table(table)
    if writer is None:
        pq.write_table(pq.read_table(paths[0]), run)
    else:
        writer.close()
    return run


def _merge_runs(paths: Sequence[Path], columns: Sequence[str] | None, batch_rows: int) -> Iterator[pa.Table]:
    """A vectorised k-way merge: each round emits every buffered row up to the smallest last uid among
    the runs that have more to read, so each round empties at least one buffer."""
    readers = [pq.ParquetFile(path).iter_batches(batch_rows, columns=columns) for path in paths]
    buffers: list[pa.Table | None] = [None] * len(readers)
    exhausted = [False] * len(readers)

    def refill(index: int) -> None:
        while not exhausted[index] and (buffers[index] is None or buffers[index].num_rows == 0):
            batch = next(readers[index], None)
            if batch is None:
                exhausted[index] = True
            else:
                buffers[index] = pa.Table.from_batches([batch])

    for index in range(len(readers)):
        refill(index)
    while any(buffer is not None and buffer.num_rows for buffer in buffers):
        limits = [buffer.column("uid")[-1].as_py() for index, buffer in enumerate(buffers)
                  if not exhausted[index] and buffer is not None and buffer.num_rows]
        bound = min(limits) if limits else None
        taken = []
        for index, buffer in enumerate(buffers):
            if buffer is None or buffer.num_rows == 0:
                continue
            count = buffer.num_rows if bound is None else int(
                np.searchsorted(buffer.column("uid").to_numpy(zero_copy_only=False), bound, side="right"))
            taken.append(buffer.slice(0, count))
            buffers[index] = buffer.slice(count)
            refill(index)
        merged = pa.concat_tables(taken)
        yield merged.take(pc.sort_indices(merged, [("uid", "ascending")]))


@dataclass(frozen=True)
class WrittenSamples:
    samples: Path
    subset: Path
    rows: int


def write_samples(recipe: Recipe, selected: Selected, samples_path: Path, subset_path: Path) -> WrittenSamples:
    """``samples.parquet`` (uid order, the recipe's weights) and ``subset.npy`` from the sorted shard files,
    streamed: one merge batch per run in memory, the subset written into a memory map."""
    log_mean = _log_mean_weight(recipe, selected.files) if recipe.weights is not None \
        and recipe.weights.mode != "raw" else None
    subset = np.lib.format.open_memmap(subset_path, mode="w+", dtype=np.dtype("u8,u8"), shape=(selected.count,))
    position, unordered = 0, False
    pending: list[pa.Table] = []
    writer: pq.ParquetWriter | None = None
    try:
        for table in _samples_stream(recipe, selected.files, log_mean):
            if writer is None:
                writer = pq.ParquetWriter(samples_path, table.schema, compression="zstd")
            pairs = subset_array(table.column("uid").to_pylist())
            if len(pairs) and position and tuple(pairs[0]) < tuple(subset[position - 1]):
                unordered = True  # each batch is sorted; only the seams can be out of order
            subset[position:position + table.num_rows] = pairs
            position += table.num_rows
            pending.append(table)
            if sum(part.num_rows for part in pending) >= ROW_GROUP_ROWS:
                whole = pa.concat_tables(pending)
                writer.write_table(whole.slice(0, ROW_GROUP_ROWS))
                pending = [whole.slice(ROW_GROUP_ROWS)]
        if writer is not None:
            rest = pa.concat_tables(pending) if pending else None
            if rest is not None and (rest.num_rows or position == 0):
                writer.write_table(rest)
    finally:
        if writer is not None:
            writer.close()
    if position != selected.count:
        raise RuntimeError(f"the shard files hold {position} selected rows, the selection counted {selected.count}")
    if unordered:
        subset.sort(order=["f0", "f1"])  # uids whose string order is not their numeric order (upper-case hex)
    subset.flush()
    del subset
    return WrittenSamples(samples_path, subset_path, position)


def _samples_stream(recipe: Recipe, files: Sequence[Path], log_mean: float | None) -> Iterator[pa.Table]:
    """The merged rows with their weights; an empty selection is one empty table (the schema)."""
    tables = sorted_merge(files)
    first = next(tables, None)
    for table in [pq.read_table(files[0])] if first is None else itertools.chain([first], tables):
        frame = pl.from_arrow(table)
        yield frame.with_columns(_weights(recipe, frame, log_mean)).to_arrow()


def _weights(recipe: Recipe, frame: pl.DataFrame, log_mean: float | None) -> pl.Series:
    """Per-sample weight: 1, or the importance weight of the recipe's prompt in the recipe's mode (the
    self-normalising mean over the whole release, folded beforehand in uid order)."""
    if recipe.weights is None:
        return pl.Series("weight", np.ones(frame.height))
    log_weights = frame[recipe.weights.column].to_numpy().astype(np.float64)
    return pl.Series("weight", normalise_log_weights(log_weights, recipe.weights.mode, recipe.weights.clip_at,
                                                     log_mean))


def _log_mean_weight(recipe: Recipe, files: Sequence[Path]) -> float:
    """``logaddexp`` folded over every selected log weight in uid order, minus log n: the same value
    :func:`~curation_platform.scoring.scores.normalise_log_weights` computes over the whole array."""
    total, rows = None, 0
    for table in sorted_merge(files, ["uid", recipe.weights.column]):
        values = table.column(recipe.weights.column).to_numpy(zero_copy_only=False).astype(np.float64)
        if values.size:
            total = np.logaddexp.reduce(values if total is None else np.concatenate([[total], values]))
            rows += values.size
    return (total if total is not None else 0.0) - np.log(max(rows, 1))


def selection_uids(selected: Selected) -> Iterator[pa.Array]:
    """The selected uids in ascending order, a merge batch at a time."""
    for table in sorted_merge(selected.files, ["uid"]):
        yield table.column("uid").combine_chunks()


