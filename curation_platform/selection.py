"""Composable, global selection policies over the per-sample score table.

A policy maps a lazy frame of candidate rows (one row per sample, a unique ``uid`` column) to the
rows it keeps. Ranking is always global over the frame it is given, never per shard, and every
fraction counts against the pool: ``TopFraction("norm_sim_inf", 0.2)`` applied after a 30% stage
keeps 20% of the *original pool* (the NormSim paper's "negCLIPLoss top 30%, then NormSim_inf to 20%
of the pool"); ``of="current"`` counts against the rows entering the stage instead.

Counts are ``floor(fraction * rows)``; ties are broken by ascending ``uid``, so a selection does not
depend on the row order of the storage. Null and NaN scores are never ranked and never kept.
:class:`DataCompTopFraction` instead reproduces DataComp's own rule (a score threshold: ``n + 1``
rows plus ties), for its baselines (docs/baselines.md).

Everything except NormSim-D (which has to fetch embeddings) and ``of="current"`` counts stays a
lazy polars plan: ``sort(...).head(k)`` runs as a top-k, filters stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import polars as pl
import pyarrow as pa

from curation_platform.scoring.scores import norm_sim_dynamic

UID = "uid"
Of = Literal["pool", "current"]
FrameLike = pl.LazyFrame | pl.DataFrame | pa.Table
EmbeddingSource = str | Callable[[pa.Array], np.ndarray]


@runtime_checkable
class Policy(Protocol):
    """A selection stage. ``pool_size`` is the original pool's row count (``None``: ``frame`` is the pool)."""

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame: ...

    def describe(self) -> dict[str, Any]: ...


# -- helpers ------------------------------------------------------------------------------------

def as_lazy(frame: FrameLike) -> pl.LazyFrame:
    """Accept the score table as a polars (lazy) frame or an Arrow table."""
    if isinstance(frame, pa.Table):
        return pl.from_arrow(frame).lazy()
    return frame.lazy()


def row_count(frame: pl.LazyFrame) -> int:
    return frame.select(pl.len()).collect().item()


def target_count(fraction: float, rows: int) -> int:
    """``floor(fraction * rows)``, tolerant of float noise (``0.29 * 100`` is 29, not 28)."""
    return math.floor(round(fraction * rows, 6))


def _score(column: str) -> pl.Expr:
    """The column with NaN turned into null, so NaN can never outrank real scores."""
    return pl.col(column).fill_nan(None)


def _count_for(frame: pl.LazyFrame, fraction: float, of: Of, pool_size: int | None) -> int:
    if of == "current" or pool_size is None:
        return target_count(fraction, row_count(frame))
    return target_count(fraction, pool_size)


def _check_fraction(fraction: float, of: str) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if of not in ("pool", "current"):
        raise ValueError(f"of must be 'pool' or 'current', got {of!r}")


def _keep_uids(frame: pl.LazyFrame, uids: pl.Series) -> pl.LazyFrame:
    return frame.join(pl.LazyFrame({UID: uids}), on=UID, how="semi")


# -- row filters --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    """Keep rows with ``min <= column <= max`` (inclusive bounds; null and NaN fail)."""

    column: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        value = _score(self.column)
        bounds = [value >= self.min] if self.min is not None else []
        bounds += [value <= self.max] if self.max is not None else []
        return frame.filter(*bounds)

    def describe(self) -> dict[str, Any]:
        return {"policy": "threshold", "column": self.column, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class IsIn:
    """Keep rows whose ``column`` is one of ``values`` (e.g. the caption language)."""

    column: str
    values: tuple[Any, ...]

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        return frame.filter(pl.col(self.column).is_in(list(self.values)))

    def describe(self) -> dict[str, Any]:
        return {"policy": "is_in", "column": self.column, "values": list(self.values)}


ORIGINAL_SIZE = ("original_width", "original_height")
SizeMeasure = Literal["width", "height", "aspect_ratio"]


def original_size(frame: pl.LazyFrame) -> tuple[pl.Expr, pl.Expr]:
    """Width and height of the image before img2dataset resized it (``original_width``/``_height``),
    the decoded ``width``/``height`` where either original is null or the frame has no such columns."""
    if not set(ORIGINAL_SIZE) <= set(frame.collect_schema().names()):
        return pl.col("width"), pl.col("height")
    known = pl.col("original_width").is_not_null() & pl.col("original_height").is_not_null()
    return (pl.when(known).then(pl.col("original_width")).otherwise(pl.col("width")),
            pl.when(known).then(pl.col("original_height")).otherwise(pl.col("height")))


@dataclass(frozen=True)
class OriginalSize(Threshold):
    """A :class:`Threshold` on the original image size (:func:`original_size`): ``width``, ``height``
    or ``aspect_ratio`` = long side / short side. DataComp filters on the size before download-time
    resizing, which the decoded image no longer has; being a Threshold, partitioned selection applies
    it per partition like any row filter."""

    column: SizeMeasure = "width"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.column not in ("width", "height", "aspect_ratio"):
            raise ValueError(f"measure must be width, height or aspect_ratio, got {self.column!r}")

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        width, height = original_size(frame)
        measures = {"width": width, "height": height,
                    "aspect_ratio": pl.max_horizontal(width, height) / pl.min_horizontal(width, height)}
        value = measures[self.column].cast(pl.Float64).fill_nan(None)  # 0 / 0 is NaN: never kept
        bounds = [value >= self.min] if self.min is not None else []
        bounds += [value <= self.max] if self.max is not None else []
        return frame.filter(*bounds)

    def describe(self) -> dict[str, Any]:
        return {"policy": "original_size", "measure": self.column, "min": self.min, "max": self.max}


# -- global rankings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TopFraction:
    """Keep the best ``floor(fraction * N)`` rows by ``column``, ``N`` the pool (or current) size."""

    column: str
    fraction: float
    of: Of = "pool"
    descending: bool = True

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, self.of)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        keep = _count_for(frame, self.fraction, self.of, pool_size)
        ordered = frame.sort(_score(self.column), UID, descending=[self.descending, False], nulls_last=True)
        return ordered.head(keep).filter(_score(self.column).is_not_null())

    def describe(self) -> dict[str, Any]:
        return {"policy": "top_fraction", "column": self.column, "fraction": self.fraction, "of": self.of,
                "descending": self.descending}


def datacomp_count(fraction: float, rows: int) -> int:
    """DataComp's ``n = int(len(df) * fraction)``: truncation of the float product (``0.29 * 100`` is 28)."""
    return int(rows * fraction)


@dataclass(frozen=True)
class DataCompTopFraction:
    """DataComp's top fraction (``get_threshold``): with ``n = int(fraction * N)``, the threshold is the
    score at 0-based position ``n`` of the scores sorted best first, and every row scoring at least that
    stays: ``n + 1`` rows plus any ties with the threshold, chosen by value alone (no uid tie-break).

    Null and NaN scores are never kept but count in ``N`` (DataComp's NaN rows are in ``len(df)``);
    when ``n`` reaches past the scored rows, all of them stay (DataComp would index out of range).
    """

    column: str
    fraction: float
    of: Of = "pool"
    descending: bool = True

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, self.of)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        rows = row_count(frame) if self.of == "current" or pool_size is None else pool_size
        n = datacomp_count(self.fraction, rows)
        score = _score(self.column)
        scored = score.drop_nulls()
        if self.descending:
            return frame.filter(score >= scored.top_k(n + 1).min())
        return frame.filter(score <= scored.bottom_k(n + 1).max())

    def describe(self) -> dict[str, Any]:
        return {"policy": "datacomp_top_fraction", "column": self.column, "fraction": self.fraction, "of": self.of,
                "descending": self.descending}


@dataclass(frozen=True)
class RankSum:
    """Keep the ``floor(fraction * N)`` rows with the smallest weighted sum of per-column ranks.

    Ranks (1 = best, ties averaged) are taken over the rows given to this stage; rows with a null or
    NaN in any ranked column are not ranked. Combines scores on different scales without calibrating them.
    """

    columns: tuple[str, ...]
    fraction: float
    weights: tuple[float, ...] | None = None
    of: Of = "pool"
    descending: bool = True

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, self.of)
        if not self.columns:
            raise ValueError("give at least one column")
        if self.weights is not None and len(self.weights) != len(self.columns):
            raise ValueError(f"{len(self.weights)} weights for {len(self.columns)} columns")

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        keep = _count_for(frame, self.fraction, self.of, pool_size)
        weights = self.weights or (1.0,) * len(self.columns)
        ranks = [_score(c).rank("average", descending=self.descending) * w for c, w in zip(self.columns, weights)]
        rank_sum = pl.sum_horizontal(ranks)
        ranked = frame.filter(*[_score(c).is_not_null() for c in self.columns])
        return ranked.sort(rank_sum, UID).head(keep)

    def describe(self) -> dict[str, Any]:
        return {"policy": "rank_sum", "columns": list(self.columns), "fraction": self.fraction,
                "weights": list(self.weights) if self.weights else None, "of": self.of,
                "descending": self.descending}


@dataclass(frozen=True)
class NormSimD:
    """NormSim-D (SCORES.md section 3): iteratively prune the current rows to ``floor(fraction * N)``.

    ``embeddings`` is either the name of a fixed-size-list column of L2-normalised image embeddings in
    the frame, or a callable given the current uids (sorted ascending, an Arrow array) that returns
    their embeddings as an ``(n, d)`` array in that order, so the caller can fetch them from storage.
    This stage materialises the uids it receives.
    """

    fraction: float
    embeddings: EmbeddingSource = field(compare=False)
    num_iters: int = 10
    sample_fraction: float = 0.1
    seed: int = 0
    of: Of = "pool"

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, self.of)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        keep = _count_for(frame, self.fraction, self.of, pool_size)
        uids, vectors = self._candidates(frame)
        keep = min(keep, uids.len())
        if keep == 0:
            return frame.head(0)
        if keep == uids.len():
            return frame
        chosen = norm_sim_dynamic(vectors, keep, self.num_iters, self.sample_fraction, self.seed)
        return _keep_uids(frame, uids.gather(chosen))

    def _candidates(self, frame: pl.LazyFrame) -> tuple[pl.Series, np.ndarray]:
        if isinstance(self.embeddings, str):
            rows = frame.select(UID, self.embeddings).sort(UID).collect()
            vectors = rows[self.embeddings].to_numpy()
            return rows[UID], np.stack(vectors) if vectors.dtype == object else vectors
        uids = frame.select(UID).sort(UID).collect()[UID]
        vectors = np.asarray(self.embeddings(uids.to_arrow()))
        if vectors.ndim != 2 or vectors.shape[0] != uids.len():
            raise ValueError(f"embeddings callback returned shape {vectors.shape} for {uids.len()} uids")
        return uids, vectors

    def describe(self) -> dict[str, Any]:
        source = self.embeddings if isinstance(self.embeddings, str) else getattr(
            self.embeddings, "__qualname__", type(self.embeddings).__name__)
        return {"policy": "norm_sim_d", "fraction": self.fraction, "embeddings": source, "num_iters": self.num_iters,
                "sample_fraction": self.sample_fraction, "seed": self.seed, "of": self.of}


# -- duplicates and contamination --------------------------------------------------------------

DEDUP_KINDS = ("image", "caption", "near")


def duplicate_column(kind: str) -> str:
    """The frame column holding a sample's ``kind`` duplicate-group id (null outside any group)."""
    if kind not in DEDUP_KINDS:
        raise ValueError(f"duplicate kind must be one of {DEDUP_KINDS}, got {kind!r}")
    return f"dup_{kind}"


CONTAMINATED_BY = "contaminated_by"  # list of evaluation-set names a sample nearly copies


@dataclass(frozen=True)
class Dedup:
    """Keep one representative per duplicate group among the rows that reach this stage.

    Groups of the chosen ``kinds`` (``image``: same bytes, ``caption``: same normalised caption,
    ``near``: image cosine >= 1 - eps) are merged where they share a member; the representative is the
    member with the best ``keep`` score (``descending``; null and NaN last, ties by ascending uid).
    Rows outside every group all stay. This stage materialises the grouped rows it receives.
    """

    keep: str
    kinds: tuple[str, ...] = ("image", "near")
    descending: bool = True

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("give at least one duplicate kind")
        for kind in self.kinds:
            duplicate_column(kind)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        columns = [duplicate_column(kind) for kind in self.kinds]
        grouped = (frame.filter(pl.any_horizontal(pl.col(columns).is_not_null()))
                   .select(UID, _score(self.keep).alias("keep"), *columns).collect())
        if grouped.is_empty():
            return frame
        component = _merged_groups(grouped[UID].to_list(), [grouped[name].to_list() for name in columns])
        ranked = (grouped.select(UID, "keep").with_columns(component=pl.Series(component))
                  .sort("keep", UID, descending=[self.descending, False], nulls_last=True))
        dropped = ranked.filter(pl.int_range(pl.len()).over("component") > 0)[UID]
        return frame.join(pl.LazyFrame({UID: dropped}), on=UID, how="anti")

    def describe(self) -> dict[str, Any]:
        return {"policy": "dedup", "kinds": list(self.kinds), "keep": self.keep, "descending": self.descending}


def _merged_groups(uids: list[str], group_columns: list[list[str | None]]) -> list[int]:
    """Per row, a component id: rows sharing any group id (in the same column) are one component."""
    parent = list(range(len(uids)))

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for column in group_columns:
        first: dict[str, int] = {}
        for row, group in enumerate(column):
            if group is None:
                continue
            if group in first:
                a, b = find(first[group]), find(row)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[group] = row
    return [find(row) for row in range(len(uids))]


@dataclass(frozen=True)
class Decontaminate:
    """Drop rows that nearly copy an image of any of the named evaluation ``sets`` (all flagged sets if empty)."""

    sets: tuple[str, ...] = ()

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        flagged = pl.col(CONTAMINATED_BY)
        hit = flagged.list.len() > 0 if not self.sets else flagged.list.set_intersection(
            pl.lit(list(self.sets), dtype=pl.List(pl.String))).list.len() > 0
        return frame.filter(~hit.fill_null(False))

    def describe(self) -> dict[str, Any]:
        return {"policy": "decontaminate", "sets": list(self.sets) or "all"}


# -- combinators --------------------------------------------------------------------------------

@dataclass(frozen=True, init=False)
class Chain:
    """Apply policies in order, each to the survivors of the previous one."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        object.__setattr__(self, "policies", policies)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        pool_size = row_count(frame) if pool_size is None else pool_size
        for policy in self.policies:
            frame = policy.apply(frame, pool_size)
        return frame

    def describe(self) -> dict[str, Any]:
        return {"policy": "chain", "stages": [p.describe() for p in self.policies]}


@dataclass(frozen=True, init=False)
class Intersection:
    """Keep rows kept by every policy, each applied independently to the same input."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("give at least one policy")
        object.__setattr__(self, "policies", policies)

    def apply(self, frame: pl.LazyFrame, pool_size: int | None = None) -> pl.LazyFrame:
        pool_size = row_count(frame) if pool_size is None else pool_size
        kept = frame
        for policy in self.policies:
            kept = kept.join(policy.apply(frame, pool_size).select(UID), on=UID, how="semi")
        return kept

    def describe(self) -> dict[str, Any]:
        return {"policy": "intersection", "of": [p.describe() for p in self.policies]}


# -- DataComp / paper baselines -----------------------------------------------------------------

def basic_filter() -> Chain:
    """DataComp's basic filter (``load_uids_with_basic_filter_helper``): English caption of more than 2
    words and 5 characters, image of min side >= 200 and aspect <= 3 at its original size.

    Sizes are img2dataset's ``original_width``/``original_height`` (pools are downloaded resized), the
    decoded ``width``/``height`` only where an original is null (:func:`original_size`). Word and char
    counts are integers, so "> 2" and "> 5" are the inclusive bounds 3 and 6. ``language`` is decided
    at ingestion (:func:`curation_platform.validation.detect_language`).
    """
    return Chain(
        IsIn("language", ("en",)),
        Threshold("caption_words", min=3),
        Threshold("caption_chars", min=6),
        OriginalSize("width", min=200),
        OriginalSize("height", min=200),
        OriginalSize("aspect_ratio", max=3.0),
    )


def clip_score_top(fraction: float = 0.30) -> TopFraction:
    """The top ``fraction`` of the pool by CLIPScore, exactly ``floor(fraction * N)`` rows."""
    return TopFraction("clip_score", fraction)


def datacomp_clip_score_top(fraction: float = 0.30) -> DataCompTopFraction:
    """DataComp's CLIP-score baseline (``clip_score_*_30_percent``): its threshold rule on CLIPScore."""
    return DataCompTopFraction("clip_score", fraction)


def laion_clip_score(threshold: float = 0.28) -> Threshold:
    """LAION-2B-style filtering: CLIPScore >= ``threshold`` (DataComp's ``laion`` baseline, ViT-B/32)."""
    return Threshold("clip_score", min=threshold)


def text_kl_top(fraction: float = 0.25) -> TopFraction:
    """Top ``fraction`` of the pool by the text-side D_KL(t) (SCORES.md section 5)."""
    return TopFraction("kl_text", fraction)


def negclip_then_normsim(negclip_fraction: float = 0.30, normsim_fraction: float = 0.20) -> Chain:
    """The NormSim paper's selection: negCLIPLoss top 30% of the pool, then NormSim_inf to 20% of the pool."""
    return Chain(TopFraction("neg_clip_loss", negclip_fraction), TopFraction("norm_sim_inf", normsim_fraction))


def negclip_then_normsim_d(embeddings: EmbeddingSource, negclip_fraction: float = 0.30,
                           normsim_fraction: float = 0.20, num_iters: int = 10, seed: int = 0) -> Chain:
    """The same without target data: negCLIPLoss top 30%, then NormSim-D to 20% of the pool."""
    return Chain(TopFraction("neg_clip_loss", negclip_fraction),
                 NormSimD(normsim_fraction, embeddings, num_iters=num_iters, seed=seed))


# -- running a selection ------------------------------------------------------------------------

class FunnelStage(NamedTuple):
    stage: str
    rows: int


@dataclass(frozen=True)
class SelectionResult:
    """Selected uids (ascending, Arrow ``large_string``) and the row count after each stage."""

    uids: pa.Array
    funnel: list[FunnelStage]
    policies: list[dict[str, Any]]

    @property
    def pool_rows(self) -> int:
        return self.funnel[0].rows

    def manifest(self) -> dict[str, Any]:
        """JSON-ready record of what was run and how many rows each stage kept."""
        return {"pool_rows": self.pool_rows, "selected": len(self.uids), "policies": self.policies,
                "funnel": [stage._asdict() for stage in self.funnel]}


def label(description: dict[str, Any]) -> str:
    """Compact one-line form of ``describe()``, e.g. ``top_fraction(column=clip_score, fraction=0.3, ...)``."""
    def value(item: Any) -> str:
        if isinstance(item, dict):
            return label(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return str(item)

    arguments = ", ".join(f"{k}={value(v)}" for k, v in description.items() if k != "policy" and v is not None)
    return f"{description['policy']}({arguments})"


def _stages(policies: Policy | Iterable[Policy]) -> list[Policy]:
    """Top-level stages, with chains flattened so the funnel explains each step."""
    items = [policies] if isinstance(policies, Policy) else list(policies)
    flat: list[Policy] = []
    for policy in items:
        flat += _stages(policy.policies) if isinstance(policy, Chain) else [policy]
    return flat


def run_selection(
    frame: FrameLike, policies: Policy | Iterable[Policy], pool_size: int | None = None
) -> SelectionResult:
    """Apply ``policies`` in order to the whole pool and return the selected uids with a funnel.

    ``pool_size`` overrides the pool row count that fractions refer to (e.g. when ``frame`` is already
    a filtered view of a larger pool); by default it is ``frame``'s row count.
    """
    current = as_lazy(frame)
    pool_size = row_count(current) if pool_size is None else pool_size
    stages = _stages(policies)
    plans = []
    for policy in stages:
        current = policy.apply(current, pool_size)
        plans.append(current)
    *counts, selected = pl.collect_all([plan.select(pl.len()) for plan in plans] + [current.select(UID).sort(UID)])
    funnel = [FunnelStage("pool", pool_size)]
    funnel += [FunnelStage(label(p.describe()), c.item()) for p, c in zip(stages, counts)]
    uids = selected[UID].to_arrow().cast(pa.large_string())
    return SelectionResult(uids, funnel, [p.describe() for p in stages])
