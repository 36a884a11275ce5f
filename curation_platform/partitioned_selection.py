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
* a ``dedup`` stage needs only the grouped rows that reach it (uid, keep score, group ids): the
  coordinator gathers those, picks each group's representative as :class:`~curation_platform.selection.Dedup`
  does, and the stage becomes a filter that drops the others (memory: the grouped rows, not the pool);
* after the last cut, each partition applies every stage and returns its selected uids, or hands its
  selected rows to a writer that runs in the worker (pass 2 of a release).

The result equals ``run_selection`` on the concatenated pool, uid for uid and count for count.
Stages whose outcome is not a per-row cut (``rank_sum``, ``norm_sim_d``, DataComp's value-threshold
top fraction, intersections) are global: :func:`split_partitionable` separates a recipe into the prefix
that runs here and the rest, which runs on the prefix's survivors.
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
    Dedup,
    FunnelStage,
    IsIn,
    Policy,
    SelectionResult,
    Threshold,
    TopFraction,
    _score,
    _stages,
    duplicate_column,
    label,
    target_count,
)

ROW_FILTERS = (Threshold, IsIn, Decontaminate)
PARTITIONABLE = (*ROW_FILTERS, TopFraction, Dedup)
DEFAULT_SKETCH_SIZE = 256
DEFAULT_BRACKET_LIMIT = 1 << 20
SHARD = "shard"


class Partition(Protocol):
    """One independently loadable piece of the pool (picklable, so process pools can load it)."""

    def load(self) -> pl.DataFrame: ...


@dataclass(frozen=True)
class TopCount:
    """Keep the best ``count`` rows by (``column``, then ascending uid); null and NaN scores rank last
    instead of being dropped. A release's ``max_size`` bound (``rank_by``) is one."""

    column: str
    count: int
    descending: bool = True

    def describe(self) -> dict[str, Any]:
        return {"policy": "top_count", "column": self.column, "count": self.count, "descending": self.descending}


RankedStage = TopFraction | TopCount


def _key(stage: RankedStage | Cut) -> pl.Expr:
    """The ascending sort key of a ranked stage (best first); null where a row is not ranked."""
    score = _score(stage.column)
    key = -score if stage.descending else score
    return key.fill_null(float("inf")) if isinstance(stage, TopCount) or getattr(stage, "nulls_last", False) else key


@dataclass(frozen=True)
class Cut:
    """A resolved ranked stage: keep ranked rows whose (key, uid) is at or before (value, uid)."""

    column: str
    descending: bool
    value: float | None = None  # the cut-off key; None: keep every ranked row (``keep_all``) or none
    uid: str | None = None
    keep_all: bool = False
    nulls_last: bool = False  # null scores are ranked (last) rather than dropped

    def expression(self) -> pl.Expr:
        key = _key(self)
        if self.value is None:
            return key.is_not_null() if self.keep_all else pl.lit(False)
        return key.is_not_null() & ((key < self.value) | ((key == self.value) & (pl.col(UID) <= self.uid)))


@dataclass(frozen=True)
class Membership:
    """A resolved set filter: keep (or drop) the listed uids. ``dedup`` resolves to the uids it drops;
    a global tail of stages resolves to the uids it kept."""

    uids: pl.Series
    keep: bool
    shards: pl.Series | None = None  # each uid's shard, where known: a shard's pass then reads only its part

    def expression(self) -> pl.Expr:
        member = pl.col(UID).is_in(self.uids.implode())
        return member if self.keep else ~member


RESOLVED = (Cut, Membership)


@dataclass(frozen=True)
class _Bracket:
    """Keys strictly after ``low`` and at or before ``high`` (None: unbounded), in stage order."""

    low: tuple[float, str] | None = None
    high: tuple[float, str] | None = None


def split_partitionable(policies: Policy | Iterable[Policy]) -> tuple[list[Policy], list[Policy]]:
    """The leading stages that run partition by partition, and the global rest."""
    stages = _stages(policies)
    prefix = next((index for index, stage in enumerate(stages) if not isinstance(stage, PARTITIONABLE)),
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
    pool = PartitionedPool(partitions, executor, sketch_size, bracket_limit)
    pool_size = pool.rows() if pool_size is None else pool_size
    resolved = pool.resolve(prefix, pool_size)
    counts = np.zeros(len(prefix), dtype=np.int64)
    gathered = []
    for index, (partition_counts, selected) in enumerate(pool.apply(resolved)):
        counts += partition_counts
        if on_selected is None:
            gathered.append(selected)
        else:
            on_selected(index, selected)
    uids = pa.chunked_array(gathered, pa.large_string()).combine_chunks()
    uids = uids.take(pc.sort_indices(uids))
    funnel = [FunnelStage("pool", pool_size)]
    funnel += [FunnelStage(label(stage.describe()), int(count)) for stage, count in zip(prefix, counts, strict=True)]
    return SelectionResult(uids, funnel, [stage.describe() for stage in prefix])


class PartitionedPool:
    """The pool as partitions, with the passes a selection makes over them (each per partition, on
    ``executor`` when given): counting, resolving stages into cuts, and applying the resolved stages."""

    def __init__(self, partitions: Sequence[Partition], executor: Executor | None = None,
                 sketch_size: int = DEFAULT_SKETCH_SIZE, bracket_limit: int = DEFAULT_BRACKET_LIMIT) -> None:
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

    def rows(self) -> int:
        return sum(self.map(_count_rows, []))

    def resolve(self, stages: Sequence[Policy | TopCount], pool_size: int,
                resolved: Sequence[Policy | Cut | Membership] = ()) -> list[Policy | Cut | Membership]:
        """``resolved`` followed by ``stages``, each ranked or dedup stage replaced by the per-row filter
        it amounts to on this pool."""
        unsupported = [stage for stage in stages if not isinstance(stage, (*PARTITIONABLE, TopCount))]
        if unsupported:
            raise ValueError(f"stage {label(unsupported[0].describe())} is global: run it on the partitionable "
                             "prefix's rows")
        resolved = list(resolved)
        for stage in stages:
            if isinstance(stage, (TopFraction, TopCount)):
                stage = self.cut(resolved, stage, pool_size)
            elif isinstance(stage, Dedup):
                stage = self.dedup(resolved, stage)
            resolved.append(stage)
        return resolved

    def apply(self, resolved: list[Policy | Cut | Membership],
              write: Callable[[int, pl.DataFrame], Any] | None = None) -> Iterator[tuple[list[int], Any]]:
        """Per partition: the row count after each resolved stage, and its selected uids (ascending);
        with ``write``, what ``write(index, selected rows sorted by uid)`` returns in the worker instead."""
        if write is None:
            return self.map(_apply, resolved)
        arguments = [(partition, resolved, write, index) for index, partition in enumerate(self.partitions)]
        if self.executor is None:
            return (_apply_and_write(*item) for item in arguments)
        return self.executor.map(_apply_and_write, *zip(*arguments, strict=True))

    def dedup(self, resolved: list[Policy | Cut | Membership], stage: Dedup) -> Membership:
        """The uids ``stage`` drops: computed by the stage itself on the grouped rows that reach it."""
        parts = list(self.map(_grouped_rows, resolved, stage))
        if not parts:
            return Membership(pl.Series(UID, [], dtype=pl.String), keep=False)
        grouped = pl.concat(parts, how="vertical_relaxed")
        kept = stage.apply(grouped.lazy()).select(UID).collect()
        dropped = grouped.join(kept, on=UID, how="anti")
        return Membership(dropped[UID], keep=False, shards=dropped[SHARD] if SHARD in dropped.columns else None)

    def cut(self, resolved: list[Policy | Cut | Membership], stage: RankedStage, pool_size: int) -> Cut:
        """The exact cut of ``stage`` over the rows that survive ``resolved``."""
        nulls_last = isinstance(stage, TopCount)
        bracket, fetch_all = _Bracket(), False
        while True:
            summaries = list(self.map(_summarise, resolved, stage, bracket, self.sketch_size, fetch_all))
            entering = sum(summary["entering"] for summary in summaries)
            keep = stage.count if isinstance(stage, TopCount) else \
                target_count(stage.fraction, entering if stage.of == "current" else pool_size)
            below = sum(summary["below"] for summary in summaries)
            inside = sum(summary["inside"] for summary in summaries)
            if keep <= 0:
                return Cut(stage.column, stage.descending, nulls_last=nulls_last)
            if keep >= below + inside and bracket.high is None:  # every ranked row is kept
                return Cut(stage.column, stage.descending, keep_all=True, nulls_last=nulls_last)
            rank = keep - below  # 1-based rank of the cut-off inside the bracket
            if all(summary["exact"] for summary in summaries):
                value, uid = _keys(summaries).row(rank - 1)
                return Cut(stage.column, stage.descending, value, uid, nulls_last=nulls_last)
            narrowed = _narrow(summaries, rank, bracket)
            # fetch the bracket's keys once they fit (or when the samples cannot narrow it further)
            fetch_all = inside <= self.bracket_limit or narrowed == bracket
            bracket = bracket if inside <= self.bracket_limit else narrowed


def _frame(partition: Partition, resolved: list[Policy | Cut]) -> tuple[pl.LazyFrame, list[pl.LazyFrame]]:
    """The partition after each resolved stage (lazy, one plan per stage)."""
    frame = partition.load().lazy()
    after = []
    for stage in resolved:
        frame = frame.filter(stage.expression()) if isinstance(stage, RESOLVED) else stage.apply(frame)
        after.append(frame)
    return frame, after


def _count_rows(partition: Partition, resolved: list) -> int:
    return partition.load().height


def _apply(partition: Partition, resolved: list[Policy | Cut]) -> tuple[list[int], pa.Array]:
    frame, after = _frame(partition, resolved)
    *counts, uids = pl.collect_all([plan.select(pl.len()) for plan in after] + [frame.select(UID).sort(UID)])
    return [count.item() for count in counts], uids[UID].to_arrow().cast(pa.large_string())


def _apply_and_write(partition: Partition, resolved: list[Policy | Cut], write: Callable[[int, pl.DataFrame], Any],
                     index: int) -> tuple[list[int], Any]:
    frame, after = _frame(partition, resolved)
    *counts, selected = pl.collect_all([plan.select(pl.len()) for plan in after] + [frame.sort(UID)])
    return [count.item() for count in counts], write(index, selected)


def _grouped_rows(partition: Partition, resolved: list[Policy | Cut], stage: Dedup) -> pl.DataFrame:
    """The rows reaching ``stage`` that belong to a duplicate group, with what the stage reads of them."""
    columns = [duplicate_column(kind) for kind in stage.kinds]
    frame, _ = _frame(partition, resolved)
    shard = [SHARD] if SHARD in frame.collect_schema().names() else []
    return (frame.filter(pl.any_horizontal(pl.col(columns).is_not_null()))
            .select(UID, *shard, _score(stage.keep).alias(stage.keep), *columns).collect())


def _summarise(partition: Partition, resolved: list[Policy | Cut], stage: RankedStage, bracket: _Bracket,
               sketch_size: int, fetch_all: bool) -> dict[str, Any]:
    """Rows entering the stage, ranked keys before the bracket, and the keys inside it (all of them
    when asked or when there are at most ``sketch_size``, else every m-th)."""
    frame, _ = _frame(partition, resolved)
    keyed = frame.select(UID, _key(stage).alias("key"))
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
