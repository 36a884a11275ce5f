"""Applying a recipe to a pool frame: its selection policies (:mod:`curation_platform.selection`, with the
NormSim-D embeddings read from the pinned embeddings table), its size bounds, the per-sample weights
of its ``[weights]`` section, the rows ``samples.parquet`` holds, and the cut-off each score ended at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curation_platform import lance_tables
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.releases.inputs import ReleaseSources
from curation_platform.releases.recipe import Recipe, RecipeError
from curation_platform.scoring.pipeline import SCORE_COLUMNS
from curation_platform.scoring.scores import normalise_log_weights
from curation_platform.selection import SelectionResult, run_selection


def select(recipe: Recipe, frame: pl.DataFrame, sources: ReleaseSources, provenance: dict[str, Any],
           embeddings_version: int | None) -> tuple[SelectionResult, pl.Series]:
    """Run the recipe on its :func:`selection_frame`; returns the selection and the final uids (after size
    bounds)."""
    if recipe.needs_target() and provenance["target_id"] is None:
        raise RecipeError(f"recipe {recipe.name!r} uses NormSim but the scores have no NormSim target: "
                          "score with a target first")
    selection = run_selection(frame.lazy(), recipe.policies(_embedding_fetcher(sources, embeddings_version)))
    uids = pl.Series("uid", selection.uids).cast(pl.String)
    if recipe.max_size is not None and uids.len() > recipe.max_size:
        kept = (frame.filter(pl.col("uid").is_in(uids.implode()))
                .sort(pl.col(recipe.rank_by).fill_nan(None), "uid", descending=[True, False], nulls_last=True)
                .head(recipe.max_size))
        uids = kept["uid"].sort()
    if uids.len() < recipe.min_size:
        raise RecipeError(f"recipe {recipe.name!r} selects {uids.len()} samples, fewer than min_size "
                          f"{recipe.min_size}")
    return selection, uids


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


def weights(recipe: Recipe, selected: pl.DataFrame) -> pl.Series:
    """Per-sample weight: 1, or the importance weight of the recipe's prompt in the recipe's mode."""
    if recipe.weights is None:
        return pl.Series("weight", np.ones(selected.height))
    log_weights = selected[recipe.weights.column].to_numpy().astype(np.float64)
    return pl.Series("weight", normalise_log_weights(log_weights, recipe.weights.mode, recipe.weights.clip_at))


def _samples_table(recipe: Recipe, frame: pl.DataFrame, uids: pl.Series) -> pa.Table:
    selected = frame.filter(pl.col("uid").is_in(uids.implode())).sort("uid")
    used = [name for name in recipe.scores_used() if name in SCORE_COLUMNS or name.startswith("iw_")]
    table = selected.select("uid", "shard", "key", *used).with_columns(weights(recipe, selected))
    return table.to_arrow()


def _cutoffs(recipe: Recipe, frame: pl.DataFrame, uids: pl.Series) -> dict[str, float]:
    """For each ranked or thresholded score, the weakest value that made it into the release."""
    selected = frame.filter(pl.col("uid").is_in(uids.implode()))
    cutoffs = {}
    for name in recipe.scores_used():
        if (name in SCORE_COLUMNS or name.startswith("iw_")) and selected.height:
            value = selected[name].fill_nan(None).min()
            if value is not None:
                cutoffs[name] = float(value)
    return cutoffs
