"""A recipe's selection as the release step sees it (:class:`Selected`: the funnel and one file of
selected rows per shard, each sorted by uid, made by :mod:`~curation_platform.releases.passes`), and
:func:`write_samples`, which merges those files in bounded memory into ``samples.parquet`` (with the
recipe's weights) and DataComp's ``subset.npy``.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.releases.artefacts import subset_array
from curation_platform.releases.recipe import Recipe
from curation_platform.scoring.pipeline import SCORE_COLUMNS
from curation_platform.scoring.scores import normalise_log_weights
from curation_platform.selection import SelectionResult
from curation_platform.storage import S3Settings

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
    files: list[str]  # local paths or storage URIs
    count: int
    cutoffs: dict[str, float]
    shard_rows: dict[str, int]
    s3: S3Settings | None = field(default=None, compare=False)

    @property
    def pool_rows(self) -> int:
        return self.selection.pool_rows


def release_columns(recipe: Recipe) -> list[str]:
    """The score columns ``samples.parquet`` carries (besides uid, shard, key and the weight)."""
    return [name for name in recipe.scores_used() if name in SCORE_COLUMNS or name.startswith("iw_")]


def _cutoffs(shards: list[ShardSelection]) -> dict[str, float]:
    """For each score ``samples.parquet`` carries, the weakest value that made it into the release."""
    cutoffs: dict[str, float] = {}
    for shard in shards:
        for name, value in shard.weakest.items():
            if value is not None:
                cutoffs[name] = min(cutoffs.get(name, value), float(value))
    return cutoffs


# -- the release step: merging the sorted shard files -------------------------------------------

def parquet_file(uri: str | Path, s3: S3Settings | None = None) -> pq.ParquetFile:
    """A parquet file on any store, read by row group."""
    filesystem, path = storage.filesystem_for(str(uri), s3)
    return pq.ParquetFile(filesystem.open_input_file(path))


def sorted_merge(paths: Sequence[str | Path], columns: Sequence[str] | None = None,
                 batch_rows: int = MERGE_BATCH_ROWS, fan_in: int = MERGE_FAN_IN,
                 s3: S3Settings | None = None) -> Iterator[pa.Table]:
    """The rows of parquet files (paths or storage URIs) each sorted by uid, as tables in global uid order.

    Memory: ``fan_in`` batches of ``batch_rows``; beyond ``fan_in`` files, groups of them are merged
    into local scratch files first (levels of an external merge sort).
    """
    if len(paths) <= fan_in:
        yield from _merge_runs(paths, columns, batch_rows, s3)
        return
    with tempfile.TemporaryDirectory(prefix="release-merge-") as folder:
        runs = [_merged_run(paths[start:start + fan_in], Path(folder) / f"{start:08d}.parquet", batch_rows, s3)
                for start in range(0, len(paths), fan_in)]
        yield from sorted_merge(runs, columns, batch_rows, fan_in)


def _merged_run(paths: Sequence[str | Path], run: Path, batch_rows: int, s3: S3Settings | None) -> Path:
    """Merge ``paths`` into one sorted file ``run`` (an empty file keeps the first input's schema)."""
    writer = None
    for table in _merge_runs(paths, None, batch_rows, s3):
        writer = writer or pq.ParquetWriter(run, table.schema)
        writer.write_table(table)
    if writer is None:
        pq.write_table(parquet_file(paths[0], s3).read(), run)
    else:
        writer.close()
    return run


def _merge_runs(paths: Sequence[str | Path], columns: Sequence[str] | None, batch_rows: int,
                s3: S3Settings | None) -> Iterator[pa.Table]:
    """A vectorised k-way merge: each round emits every buffered row up to the smallest last uid among
    the runs that have more to read, so each round empties at least one buffer."""
    readers = [parquet_file(path, s3).iter_batches(batch_rows, columns=columns) for path in paths]
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
    log_mean = _log_mean_weight(recipe, selected) if recipe.weights is not None \
        and recipe.weights.mode != "raw" else None
    subset = np.lib.format.open_memmap(subset_path, mode="w+", dtype=np.dtype("u8,u8"), shape=(selected.count,))
    position, unordered = 0, False
    pending: list[pa.Table] = []
    writer: pq.ParquetWriter | None = None
    try:
        for table in _samples_stream(recipe, selected, log_mean):
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


def _samples_stream(recipe: Recipe, selected: Selected, log_mean: float | None) -> Iterator[pa.Table]:
    """The merged rows with their weights; an empty selection is one empty table (the schema)."""
    tables = sorted_merge(selected.files, s3=selected.s3)
    first = next(tables, None)
    empty = [parquet_file(selected.files[0], selected.s3).read()] if first is None else []
    for table in empty or itertools.chain([first], tables):
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


def _log_mean_weight(recipe: Recipe, selected: Selected) -> float:
    """``logaddexp`` folded over every selected log weight in uid order, minus log n: the same value
    :func:`~curation_platform.scoring.scores.normalise_log_weights` computes over the whole array."""
    total, rows = None, 0
    for table in sorted_merge(selected.files, ["uid", recipe.weights.column], s3=selected.s3):
        values = table.column(recipe.weights.column).to_numpy(zero_copy_only=False).astype(np.float64)
        if values.size:
            total = np.logaddexp.reduce(values if total is None else np.concatenate([[total], values]))
            rows += values.size
    return (total if total is not None else 0.0) - np.log(max(rows, 1))


def selection_uids(selected: Selected) -> Iterator[pa.Array]:
    """The selected uids in ascending order, a merge batch at a time."""
    for table in sorted_merge(selected.files, ["uid"], s3=selected.s3):
        yield table.column("uid").combine_chunks()


