"""Releases are selected shard by shard and written by a bounded merge (issue 16): the files equal what
one process holding the whole pool frame gives, for every kind of stage, size bound and weight mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation_platform.releases import (
    ReleaseOptions,
    ReleaseSources,
    apply_recipe,
    create_release,
    parse_recipe,
    verify_release,
)
from curation_platform.releases.apply_recipe import release_columns, sorted_merge
from curation_platform.releases.artefacts import SAMPLES, SUBSET, npy_bytes, subset_array
from curation_platform.releases.inputs import pool_frame, table_versions
from curation_platform.scoring.scores import normalise_log_weights
from curation_platform.selection import run_selection
from tests.helpers.recipes import NEGCLIP_NORMSIM

RECIPES = {
    # partitionable stages only: the ranks are cut from per-shard summaries
    "negclip-normsim": NEGCLIP_NORMSIM,
    # a global stage (intersection) on the survivors, a size bound, clipped self-normalised weights
    "weighted": """
name = "weighted"
max_size = 50
rank_by = "clip_score"
[[stage]]
type = "basic_filter"
[[stage]]
type = "intersection"
stages = [{type = "top_fraction", score = "clip_score", fraction = 0.5},
          {type = "threshold", score = "kl_text", min = 0.0}]
[weights]
prompt = "circles squares and triangles"
mode = "clipped"
clip_at = 3.0
""",
    # DataComp's value-threshold top fraction and a rank sum are global; raw weights
    "datacomp-ranksum": """
name = "datacomp-ranksum"
[[stage]]
type = "datacomp_top_fraction"
score = "clip_score"
fraction = 0.6
[[stage]]
type = "rank_sum"
scores = ["clip_score", "kl_image"]
fraction = 0.25
[weights]
prompt = "circles squares and triangles"
mode = "raw"
""",
}


def _one_process(recipe, sources: ReleaseSources) -> pl.DataFrame:
    """What a release holds when one process selects from the whole pool frame (the former path)."""
    frame = pool_frame(sources, table_versions(sources))
    uids = pl.Series("uid", run_selection(frame, recipe.policies()).uids).cast(pl.String)
    selected = frame.filter(pl.col("uid").is_in(uids.implode()))
    if recipe.max_size is not None and selected.height > recipe.max_size:
        selected = selected.sort(pl.col(recipe.rank_by).fill_nan(None), "uid", descending=[True, False],
                                 nulls_last=True).head(recipe.max_size)
    selected = selected.sort("uid")
    weight = np.ones(selected.height) if recipe.weights is None else normalise_log_weights(
        selected[recipe.weights.column].to_numpy(), recipe.weights.mode, recipe.weights.clip_at)
    return selected.select("uid", "shard", "key", *release_columns(recipe)).with_columns(pl.Series("weight", weight))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shard_by_shard_release_equals_the_whole_pool_selection(name: str, sources: ReleaseSources,
                                                                 tmp_path: Path, monkeypatch) -> None:
    recipe = parse_recipe(RECIPES[name])
    monkeypatch.setattr(apply_recipe, "MERGE_BATCH_ROWS", 7)  # many merge rounds over the shard files
    release = create_release(recipe, sources, str(tmp_path / "releases"), ReleaseOptions(workers=2))
    expected = _one_process(recipe, sources)
    written = pl.read_parquet(Path(release.uri) / SAMPLES)
    assert written.height == release.manifest["selected"] >= recipe.min_size
    assert written.equals(expected)
    assert (Path(release.uri) / SUBSET).read_bytes() == npy_bytes(subset_array(expected["uid"].to_list()))
    assert release.manifest["funnel"][-1]["rows"] == written.height
    assert sum(shard["samples"] for shard in release.manifest["input_shards"]) == release.manifest["pool_rows"]
    assert verify_release(release.uri).ok


def test_small_releases_keep_one_row_group(sources: ReleaseSources, tmp_path: Path) -> None:
    """A release under a million rows is the single row group ``pq.write_table`` writes."""
    release = create_release(parse_recipe(RECIPES["negclip-normsim"]), sources, str(tmp_path / "releases"))
    table = pq.read_table(Path(release.uri) / SAMPLES)
    single = tmp_path / "single.parquet"
    pq.write_table(table, single, compression="zstd")
    assert pq.ParquetFile(Path(release.uri) / SAMPLES).metadata.num_row_groups == 1
    assert single.read_bytes() == (Path(release.uri) / SAMPLES).read_bytes()


@pytest.mark.parametrize(("files", "fan_in", "batch_rows"), [(1, 4, 3), (9, 2, 1), (17, 4, 5), (6, 64, 1000)])
def test_sorted_merge_is_a_global_sort_in_levels(tmp_path: Path, files: int, fan_in: int, batch_rows: int) -> None:
    rng = np.random.default_rng(files)
    uids = [f"{value:032x}" for value in rng.permutation(10_000)[:files * 40]]
    paths = []
    for index in range(files):
        part = sorted(uids[index::files][: int(rng.integers(0, 41))])  # some files empty
        path = tmp_path / f"{index:03d}.parquet"
        pq.write_table(pa.table({"uid": pa.array(part, pa.large_string()), "value": np.arange(len(part))}), path)
        paths.append(path)
    expected = sorted(uid for path in paths for uid in pq.read_table(path)["uid"].to_pylist())
    merged = list(sorted_merge(paths, batch_rows=batch_rows, fan_in=fan_in))
    assert [uid for table in merged for uid in table["uid"].to_pylist()] == expected
    assert all(table.num_rows for table in merged)


def test_each_shard_is_read_through_an_index(sources: ReleaseSources, tmp_path: Path) -> None:
    """A release brings the scores table's shard index up to date before it pins the version it reads."""
    import shutil

    from curation_platform import lance_tables
    from curation_platform.releases.inputs import index_shards

    lance = tmp_path / "lance"
    shutil.copytree(sources.lance_uri, lance)
    private = ReleaseSources(str(lance), sources.validated_uri, sources.teacher_id, sources.pool_uri)
    release = create_release(parse_recipe(RECIPES["negclip-normsim"]), private, str(tmp_path / "releases"))
    scores = lance_tables.connect(str(lance)).open_table("scores")
    (index,) = [index for index in scores.list_indices() if list(index.columns) == ["shard"]]
    assert scores.index_stats(index.name).num_unindexed_rows == 0
    assert release.manifest["lancedb_tables"]["scores"]["version"] == scores.version
    assert not index_shards(private), "an index covering every row is left alone"
