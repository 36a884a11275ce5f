"""Partitioned selection equals the single-process selection, uid for uid and count for count (issue 16)."""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from curation_platform.partitioned_selection import (
    PartitionedPool,
    TopCount,
    select_partitioned,
    split_partitionable,
)
from curation_platform.processes import worker_context
from curation_platform.selection import (
    Chain,
    Decontaminate,
    Dedup,
    IsIn,
    RankSum,
    Threshold,
    TopFraction,
    basic_filter,
    run_selection,
)


@dataclass(frozen=True)
class FramePartition:
    frame: pl.DataFrame

    def load(self) -> pl.DataFrame:
        return self.frame


def _pool(rows: int, seed: int, distinct: int | None = None) -> pl.DataFrame:
    """Scores with heavy ties (``distinct`` values), nulls and NaNs; uids in random order."""
    rng = np.random.default_rng(seed)
    def score() -> np.ndarray:
        values = rng.integers(0, distinct, rows).astype(float) if distinct else rng.normal(size=rows)
        values[rng.random(rows) < 0.05] = np.nan
        return values
    frame = pl.DataFrame({
        "uid": [f"{value:032x}" for value in rng.permutation(rows * 7)[:rows]],
        "clip_score": score(), "neg_clip_loss": score(), "norm_sim_inf": score(),
        "language": rng.choice(["en", "de", "fr"], rows),
        "caption_words": rng.integers(1, 12, rows), "caption_chars": rng.integers(1, 60, rows),
        "width": rng.integers(100, 400, rows), "height": rng.integers(100, 400, rows),
        "aspect_ratio": rng.uniform(1, 4, rows),
        "contaminated_by": [["demo-eval"] if flag else [] for flag in rng.random(rows) < 0.03],
        # duplicate groups of 2-4 rows (ids shared across partitions), most rows in none
        "dup_image": [f"i{value}" if value < rows // 8 else None for value in rng.integers(0, rows // 2, rows)],
        "dup_near": [f"n{value}" if value < rows // 10 else None for value in rng.integers(0, rows // 2, rows)],
    })
    return frame.with_columns(pl.when(pl.int_range(pl.len()) % 11 == 0).then(None).otherwise(pl.col("clip_score"))
                              .alias("clip_score"))


def _partitions(frame: pl.DataFrame, seed: int) -> list[FramePartition]:
    """Awkward cuts: empty partitions, single rows and one big one."""
    rng = np.random.default_rng(seed)
    edges = sorted({0, frame.height, *rng.integers(0, frame.height, 6).tolist()})
    parts = [FramePartition(frame[start:end]) for start, end in itertools.pairwise(edges)]
    return [FramePartition(frame.head(0)), *parts, FramePartition(frame.head(0))]


RECIPES = {
    "top30": [TopFraction("clip_score", 0.3)],
    "ascending": [TopFraction("neg_clip_loss", 0.45, descending=False)],
    "negclip-normsim": [TopFraction("neg_clip_loss", 0.3), TopFraction("norm_sim_inf", 0.2)],
    "of-current": [Threshold("width", min=150), TopFraction("clip_score", 0.5, of="current")],
    "basic-then-top": [basic_filter(), Decontaminate(), TopFraction("clip_score", 0.25)],
    "keep-all": [IsIn("language", ("en", "de")), TopFraction("clip_score", 1.0)],
    "keep-none": [TopFraction("clip_score", 0.0)],
    "fraction-above-survivors": [Threshold("clip_score", min=1.0), TopFraction("norm_sim_inf", 0.5)],
    "decontaminate-dedup-top": [Decontaminate(), Dedup("clip_score"), TopFraction("neg_clip_loss", 0.3)],
    "top-then-dedup": [TopFraction("clip_score", 0.6), Dedup("neg_clip_loss", kinds=("near",), descending=False)],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize(("rows", "distinct", "sketch", "limit"), [
    (997, None, 2, 64),      # many narrowing rounds
    (2048, 5, 3, 64),        # a few values: the cut falls inside a huge tie, resolved by uid
    (613, None, 256, 1 << 20),
])
def test_partitioned_equals_single_process(recipe: str, rows: int, distinct: int | None, sketch: int,
                                           limit: int) -> None:
    frame = _pool(rows, seed=rows, distinct=distinct)
    expected = run_selection(frame, RECIPES[recipe])
    got = select_partitioned(_partitions(frame, seed=rows + 1), RECIPES[recipe], sketch_size=sketch,
                             bracket_limit=limit)
    assert got.uids.equals(expected.uids)
    assert got.funnel == expected.funnel and got.policies == expected.policies


def test_worker_processes_give_the_same_selection() -> None:
    frame = _pool(1500, seed=3)
    stages = RECIPES["negclip-normsim"]
    with ProcessPoolExecutor(2, mp_context=worker_context()) as executor:
        got = select_partitioned(_partitions(frame, 4), stages, executor=executor, sketch_size=4, bracket_limit=64)
    assert got.uids.equals(run_selection(frame, stages).uids)


def test_global_stages_are_split_off() -> None:
    prefix, rest = split_partitionable(Chain(basic_filter(), TopFraction("clip_score", 0.3),
                                             RankSum(("clip_score", "norm_sim_inf"), 0.2), Threshold("width", min=1)))
    assert len(prefix) == 7 and isinstance(rest[0], RankSum) and len(rest) == 2
    with pytest.raises(ValueError, match="is global"):
        select_partitioned([FramePartition(_pool(10, 0))], [RankSum(("clip_score", "norm_sim_inf"), 0.2)])


@pytest.mark.parametrize(("count", "descending"), [(0, True), (1, True), (137, False), (600, True), (10_000, True)])
def test_top_count_ranks_nulls_last(count: int, descending: bool) -> None:
    """A release's max_size bound: the best ``count`` by (score, uid), null and NaN scores last but kept."""
    frame = _pool(700, seed=count, distinct=7)
    pool = PartitionedPool(_partitions(frame, seed=count + 1), sketch_size=3, bracket_limit=32)
    resolved = pool.resolve([Threshold("width", min=120), TopCount("clip_score", count, descending)], frame.height)
    got = sorted(uid for _, uids in pool.apply(resolved) for uid in uids.to_pylist())
    expected = (frame.filter(pl.col("width") >= 120)
                .sort(pl.col("clip_score").fill_nan(None), "uid", descending=[descending, False], nulls_last=True)
                .head(count)["uid"].sort().to_list())
    assert got == expected


def test_pass_two_writes_in_the_worker() -> None:
    frame = _pool(900, seed=21)
    stages = RECIPES["decontaminate-dedup-top"]
    pool = PartitionedPool(_partitions(frame, 22), sketch_size=4, bracket_limit=64)
    results = list(pool.apply(pool.resolve(stages, frame.height), write=lambda index, rows: (index, rows)))
    written = pl.concat([rows for _, (_, rows) in results])
    assert [index for _, (index, _) in results] == list(range(len(results)))
    assert all(rows["uid"].is_sorted() for _, (_, rows) in results)
    assert written["uid"].sort().to_list() == run_selection(frame, stages).uids.to_pylist()
    assert set(written.columns) == set(frame.columns)


def test_on_selected_streams_each_partitions_share() -> None:
    frame = _pool(800, seed=9)
    stages = RECIPES["basic-then-top"]
    shares: dict[int, list[str]] = {}
    result = select_partitioned(_partitions(frame, 10), stages, sketch_size=4, bracket_limit=64,
                                on_selected=lambda index, uids: shares.setdefault(index, uids.to_pylist()))
    assert len(result.uids) == 0 and all(share == sorted(share) for share in shares.values())
    assert sorted(uid for share in shares.values() for uid in share) == run_selection(frame, stages).uids.to_pylist()
