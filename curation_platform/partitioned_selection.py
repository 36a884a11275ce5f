"""Exact selection over a pool held as partitions, with memory bounded by one partition.

:func:`curation_platform.selection.run_selection` ranks a frame that holds the whole pool. Here the
pool is a list of partitions (shards, LanceDB fragments), each loaded on its own by a worker, and
every global rank cut is found from small per-partition summaries:

* row filters (``threshold``, ``is_in``, ``decontaminate``) are applied inside each partition;
* a ``top_fraction`` stage keeps the ``k`` best rows by (score, then ascending uid). Its cut-off is
  the k-th key of the whole pool: each partition sorts its surviving keys and returns every m-th of
  them (``sketch_size`` per partition, so each sampled key's global rank is known within the
  partitions' strides), the coordinator brackets the k-th key between two sampled keys, and the next
  round asks only for the keys inside the bracket (their count below it is exact). Once the bracket
  holds at most ``bracket_limit`` keys they are fetched and the cut is exact, ties included;
* after the last cut, each partition applies every stage and returns its selected uids.

The result equals ``run_selection`` on the concatenated pool, uid for uid and count for count.
Stages whose outcome is not a per-row cut (``rank_sum``, ``norm_sim_d``, ``dedup``) are global:
:func:`split_partitionable` separates a recipe into the prefix that runs here and the rest, which
runs on the prefix's survivors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curation_platform.selection import (
    UID,
    Decontaminate,
    FunnelStage,
    IsIn,
    Policy,
    SelectionResult,
    Threshold,
    TopFraction,
    _score,
    _stages,
    label,
    target_count,
)

ROW_FILTERS = (Threshold, IsIn, Decontaminate)
DEFAULT_SKETCH_SIZE = 256
DEFAULT_BRACKET_LIMIT = 1 << 20


class Partition(Protocol):
    """One independently loadable piece of the pool (picklable, so process pools can load it)."""

    def load(self) -> pl.DataFrame: ...


@dataclass(frozen=True)
class Cut:
    """A resolved ``top_fraction``: keep non-null rows whose (score, uid) is at or before (value, uid)."""

    column: str
    descending: bool
    value: float | None = None  # None: keep every ranked row (``keep_all``) or none
    uid: str | None = None
    keep_all: bool = False

    def expression(self) -> pl.Expr:
        score = _score(self.column)
        if self.value is None:
            return score.is_not_null() if self.keep_all else pl.lit(False)
        better = score > self.value if self.descending else score < self.value
        return score.is_not_null() & (better | ((score == self.value) & (pl.col(UID) <= self.uid)))


@dataclass(frozen=True)
class _Bracket:
    """Keys strictly after ``low`` and at or before ``high`` (None: unbounded), in stage order."""

    low: tuple[float, str] | None = None
    high: tuple[float, str] | None = None


def split_partitionable(policies: Policy | Iterable[Policy]) -> tuple[list[Policy], list[Policy]]:
    """The leading stages that run partition by partition, and the global rest."""
    stages = _stages(policies)
    prefix = next((index for index, stage in enumerate(stages) if not isinstance(stage, (*ROW_FILTERS, TopFraction))),
                  len(stages))
    return stages[:prefix], stages[prefix:]


def select_partitioned(partitions: Sequence[Partition], policies: Policy | Iterable[Policy],
                       pool_size: int | None = None, *, executor: Executor | None = None,
                       sketch_size: int = DEFAULT_SKETCH_SIZE, bracket_limit: int = DEFAULT_BRACKET_LIMIT,
                       on_selected: Callable[[int, pa.Array], None] | None = None) -> SelectionResult:
    """``run_selection`` over ``partitions`` (every stage must be partitionable, see
    :func:`split_partitionable`); ``executor`` runs the per-partition passes (None: in this process).

    With ``on_selected``, each partition's selected uids (ascending) are handed to it with the
    partition's index as they arrive, and the result's ``uids`` stays empty: the coordinator never
    holds the selection, only one partition's share of it.
    """
    prefix, rest = split_partitionable(policies)
    if rest:
        raise ValueError(f"stage {label(rest[0].describe())} is global: run it on the partitionable prefix's rows")
    run = _Runner(partitions, executor, sketch_size, bracket_limit)
    pool_size = sum(run.map(_count_rows, [])) if pool_size is None else pool_size
    resolved: list[Policy | Cut] = []
    for stage in prefix:
        resolved.append(run.cut(resolved, stage, pool_size) if isinstance(stage, TopFraction) else stage)
    counts = np.zeros(len(prefix), dtype=np.int64)
    gathered = []
    for index, (partition_counts, selected) in enumerate(run.map(_apply, resolved)):
        counts += partition_counts
        if on_selected is None:
            gathered.append(selected)
        else:
            on_selected(index, selected.take(pc.sort_indices(selected)))
    uids = pa.chunked_array(gathered, pa.large_string()).combine_chunks()
    uids = uids.take(pc.sort_indices(uids))
    funnel = [FunnelStage("pool", pool_size)]
    funnel += [FunnelStage(label(stage.describe()), int(count)) for stage, count in zip(prefix, counts, strict=True)]
    return SelectionResult(uids, funnel, [stage.describe() for stage in prefix])


class _Runner:
    def __init__(self, partitions: Sequence[Partition], executor: Executor | None, sketch_size: int,
                 bracket_limit: int) -> None:
        if sketch_size < 2:
            raise ValueError("sketch_size must be at least 2")
        self.partitions, self.executor = partitions, executor
        self.sketch_size, self.bracket_limit = sketch_size, bracket_limit

    def map(self, function: Callable, resolved: list, *extra: Any) -> Iterator:
        """``function(partition, resolved, *extra)`` per partition, results in partition order as they come."""
        arguments = [(partition, resolved, *extra) for partition in self.partitions]
        if self.executor is None:
            return (function(*item) for item in arguments)
        return self.executor.map(function, *zip(*arguments, strict=True))

    def cut(self, resolved: list[Policy | Cut], stage: TopFraction, pool_size: int) -> Cut:
        """The exact cut of ``stage`` over the rows that survive ``resolved``."""
        bracket, fetch_all = _Bracket(), False
        while True:
            summaries = list(self.map(_summarise, resolved, stage, bracket, self.sketch_size, fetch_all))
            entering = sum(summary["entering"] for summary in summaries)
            keep = target_count(stage.fraction, entering if stage.of == "current" else pool_size)
            below = sum(summary["below"] for summary in summaries)
            inside = sum(summary["inside"] for summary in summaries)
            if keep <= 0:
                return Cut(stage.column, stage.descending)
            if keep >= below + inside and bracket.high is None:  # every ranked row is kept
                return Cut(stage.column, stage.descending, keep_all=True)
            rank = keep - below  # 1-based rank of the cut-off inside the bracket
            if all(summary["exact"] for summary in summaries):
                keys = _keys(summaries)
                value, uid = keys.row(rank - 1)
                return Cut(stage.column, stage.descending, -value if stage.descending else value, uid)
            narrowed = _narrow(summaries, rank, bracket)
            # fetch the bracket's keys once they fit (or when the samples cannot narrow it further)
            fetch_all = inside <= self.bracket_limit or narrowed == bracket
            bracket = bracket if inside <= self.bracket_limit else narrowed


def _frame(partition: Partition, resolved: list[Policy | Cut]) -> tuple[pl.LazyFrame, list[pl.LazyFrame]]:
    """The partition after each resolved stage (lazy, one plan per stage)."""
    frame = partition.load().lazy()
    after = []
    for stage in resolved:
        frame = frame.filter(stage.expression()) if isinstance(stage, Cut) else stage.apply(frame)
        after.append(frame)
    return frame, after


def _count_rows(partition: Partition, resolved: list) -> int:
    return partition.load().height


def _apply(partition: Partition, resolved: list[Policy | Cut]) -> tuple[list[int], pa.Array]:
    frame, after = _frame(partition, resolved)
    *counts, uids = pl.collect_all([plan.select(pl.len()) for plan in after] + [frame.select(UID)])
    return [count.item() for count in counts], uids[UID].to_arrow().cast(pa.large_string())


def _summarise(partition: Partition, resolved: list[Policy | Cut], stage: TopFraction, bracket: _Bracket,
               sketch_size: int, fetch_all: bool) -> dict[str, Any]:
    """Rows entering the stage, ranked keys before the bracket, and the keys inside it (all of them
    when asked or when there are at most ``sketch_size``, else every m-th)."""
    frame, _ = _frame(partition, resolved)
    score = _score(stage.column)
    keyed = frame.select(UID, (-score if stage.descending else score).alias("key"))
    entering, ranked = pl.collect_all([frame.select(pl.len()), keyed.filter(pl.col("key").is_not_null())])
    ranked = ranked.sort("key", UID)
    below = 0 if bracket.low is None else ranked.filter(_at_or_before(bracket.low)).height
    inside = ranked.filter(~_at_or_before(bracket.low) if bracket.low else pl.lit(True))
    if bracket.high is not None:
        inside = inside.filter(_at_or_before(bracket.high))
    exact = fetch_all or inside.height <= sketch_size
    stride = 1 if exact else math.ceil(inside.height / sketch_size)
    sample = inside if exact else inside.gather_every(stride, offset=stride - 1)
    return {"entering": entering.item(), "below": below, "inside": inside.height, "exact": exact,
            "stride": stride, "keys": sample.select("key", UID)}


def _at_or_before(key: tuple[float, str] | None) -> pl.Expr:
    value, uid = key
    return (pl.col("key") < value) | ((pl.col("key") == value) & (pl.col(UID) <= uid))


def _keys(summaries: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.concat([summary["keys"] for summary in summaries]).sort("key", UID)


def _narrow(summaries: list[dict[str, Any]], rank: int, bracket: _Bracket) -> _Bracket:
    """A smaller bracket around the key of 1-based ``rank`` inside ``bracket``, from the partitions' samples.

    A partition with stride m whose t-th sample is at or before key x has between t*m and
    min(inside, (t+1)*m - 1) keys at or before x; summed over partitions these bound x's rank.
    """
    frames = []
    for index, summary in enumerate(summaries):
        keys, stride, inside = summary["keys"], summary["stride"], summary["inside"]
        taken = pl.int_range(1, keys.height + 1, eager=True) if keys.height else pl.Series([], dtype=pl.Int64)
        frames.append(keys.with_columns(
            part=pl.lit(index),
            lower_step=pl.lit(stride),
            upper_step=(pl.min_horizontal(pl.lit(inside), (taken + 1) * stride - 1)
                        - pl.min_horizontal(pl.lit(inside), taken * stride - 1)),
        ))
    base_upper = sum(min(summary["inside"], summary["stride"] - 1) for summary in summaries)
    ordered = pl.concat(frames).sort("key", UID).with_columns(
        lower=pl.col("lower_step").cum_sum(), upper=pl.col("upper_step").cum_sum() + base_upper)
    before = ordered.filter(pl.col("upper") < rank)
    after = ordered.filter(pl.col("lower") >= rank)
    low = tuple(before.select("key", UID).row(-1)) if before.height else bracket.low
    high = tuple(after.select("key", UID).row(0)) if after.height else bracket.high
    return _Bracket(low, high)
