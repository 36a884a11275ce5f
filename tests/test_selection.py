"""Selection policies: global ranking, pool-relative counts, tie-breaks, combinators and baselines."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curation_platform.scoring.scores import norm_sim_dynamic
from curation_platform.selection import (
    Chain,
    Intersection,
    IsIn,
    NormSimD,
    Policy,
    RankSum,
    Threshold,
    TopFraction,
    basic_filter,
    clip_score_top,
    laion_clip_score,
    negclip_then_normsim,
    negclip_then_normsim_d,
    run_selection,
    text_kl_top,
)


def _pool(n: int = 1000, seed: int = 0, dim: int = 8) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return pl.DataFrame({
        "uid": [f"{i:032x}" for i in rng.permutation(n)],
        "shard": [f"{i % 4:05d}" for i in range(n)],
        "clip_score": rng.uniform(0.1, 0.4, n),
        "neg_clip_loss": rng.normal(size=n),
        "norm_sim_inf": rng.normal(size=n),
        "kl_text": rng.exponential(size=n),
        "embedding": embeddings.astype(np.float32),
    })


def _top(frame: pl.DataFrame, column: str, count: int) -> set[str]:
    """Brute force: the ``count`` largest values (no ties in continuous random scores)."""
    order = np.argsort(-frame[column].to_numpy(), kind="stable")[:count]
    return set(frame["uid"].gather(order).to_list())


def _uids(policy: Policy, frame: pl.DataFrame) -> set[str]:
    return set(run_selection(frame, policy).uids.to_pylist())


def test_top_fraction_is_global_not_per_shard() -> None:
    frame = _pool(400).with_columns(
        clip_score=pl.when(pl.col("shard") == "00000").then(pl.col("clip_score") + 1).otherwise(pl.col("clip_score"))
    )
    selected = _uids(clip_score_top(0.25), frame)
    per_shard = set().union(*[_top(part, "clip_score", part.height // 4) for part in frame.partition_by("shard")])
    assert len(selected) == 100
    assert selected == _top(frame, "clip_score", 100)
    assert selected == set(frame.filter(pl.col("shard") == "00000")["uid"])
    assert selected != per_shard


def test_second_stage_counts_against_the_pool() -> None:
    frame = _pool(1000)
    result = run_selection(frame, negclip_then_normsim(0.30, 0.20))
    first = frame.filter(pl.col("uid").is_in(list(_top(frame, "neg_clip_loss", 300))))
    assert [stage.rows for stage in result.funnel] == [1000, 300, 200]
    assert set(result.uids.to_pylist()) == _top(first, "norm_sim_inf", 200)
    current = Chain(TopFraction("neg_clip_loss", 0.30), TopFraction("norm_sim_inf", 0.20, of="current"))
    assert [stage.rows for stage in run_selection(frame, current).funnel] == [1000, 300, 60]


def test_explicit_pool_size_and_float_noise_in_counts() -> None:
    frame = _pool(100)
    assert run_selection(frame, TopFraction("kl_text", 0.29)).funnel[-1].rows == 29
    assert run_selection(frame, TopFraction("kl_text", 0.29), pool_size=1000).funnel[-1].rows == 100
    assert run_selection(frame, text_kl_top(0.25)).uids.to_pylist() == sorted(_top(frame, "kl_text", 25))


def test_ties_broken_by_uid_whatever_the_row_order() -> None:
    frame = _pool(50).with_columns(clip_score=pl.lit(0.3))
    expected = sorted(frame["uid"].to_list())[:10]
    for seed in range(3):
        shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
        assert run_selection(shuffled, clip_score_top(0.2)).uids.to_pylist() == expected


def test_null_and_nan_scores_are_never_selected() -> None:
    frame = pl.DataFrame({"uid": ["a", "b", "c", "d"], "clip_score": [float("nan"), None, 0.5, 0.1]})
    assert run_selection(frame, clip_score_top(1.0)).uids.to_pylist() == ["c", "d"]
    assert run_selection(frame, laion_clip_score(0.28)).uids.to_pylist() == ["c"]
    assert run_selection(frame, RankSum(("clip_score",), 1.0)).uids.to_pylist() == ["c", "d"]


def test_intersection_matches_sets() -> None:
    frame = _pool(500)
    policy = Intersection(TopFraction("neg_clip_loss", 0.5), TopFraction("norm_sim_inf", 0.4), laion_clip_score(0.2))
    expected = (_top(frame, "neg_clip_loss", 250) & _top(frame, "norm_sim_inf", 200)
                & set(frame.filter(pl.col("clip_score") >= 0.2)["uid"]))
    assert _uids(policy, frame) == expected


def test_rank_sum_matches_brute_force() -> None:
    frame = _pool(300)
    columns, weights = ("neg_clip_loss", "norm_sim_inf", "kl_text"), (1.0, 2.0, 0.5)
    ranks = [np.argsort(np.argsort(-frame[c].to_numpy())) + 1 for c in columns]
    total = sum(w * r for w, r in zip(weights, ranks))
    expected = set(frame["uid"].gather(np.argsort(total, kind="stable")[:60]).to_list())
    assert _uids(RankSum(columns, 0.2, weights), frame) == expected


def test_basic_filter_rules_on_boundaries() -> None:
    rows = [  # uid, language, words, chars, width, height, aspect, expected
        ("keep", "en", 3, 6, 200, 200, 1.0, True),
        ("keep-aspect-3", "en", 5, 30, 600, 200, 3.0, True),
        ("german", "de", 5, 30, 640, 480, 1.33, False),
        ("two-words", "en", 2, 30, 640, 480, 1.33, False),
        ("five-chars", "en", 3, 5, 640, 480, 1.33, False),
        ("narrow", "en", 5, 30, 199, 480, 2.41, False),
        ("short", "en", 5, 30, 640, 199, 3.22, False),
        ("aspect", "en", 5, 30, 604, 200, 3.02, False),
    ]
    names = ["uid", "language", "caption_words", "caption_chars", "width", "height", "aspect_ratio", "expected"]
    frame = pl.DataFrame(rows, schema=names, orient="row")
    result = run_selection(frame, basic_filter())
    assert set(result.uids.to_pylist()) == set(frame.filter("expected")["uid"])
    assert [stage.rows for stage in result.funnel] == [8, 7, 6, 5, 4, 3, 2]


def test_norm_sim_d_keeps_the_requested_count_of_the_pool() -> None:
    frame = _pool(500)
    requested: list[pa.Array] = []
    vectors = dict(zip(frame["uid"].to_list(), frame["embedding"].to_numpy()))

    def fetch(uids: pa.Array) -> np.ndarray:
        requested.append(uids)
        return np.stack([vectors[uid] for uid in uids.to_pylist()])

    result = run_selection(frame, negclip_then_normsim_d(fetch, 0.30, 0.20, num_iters=5, seed=3))
    assert [stage.rows for stage in result.funnel] == [500, 150, 100]
    candidates = sorted(_top(frame, "neg_clip_loss", 150))
    assert [requested[0].to_pylist()] == [candidates]
    chosen = norm_sim_dynamic(np.stack([vectors[u] for u in candidates]), 100, num_iters=5, seed=3)
    assert result.uids.to_pylist() == [candidates[i] for i in chosen]
    by_column = run_selection(frame, negclip_then_normsim_d("embedding", 0.30, 0.20, num_iters=5, seed=3))
    assert by_column.uids.equals(result.uids)


def test_norm_sim_d_with_fewer_candidates_keeps_them_all() -> None:
    frame = _pool(100)
    policy = Chain(TopFraction("kl_text", 0.1), NormSimD(0.2, "embedding"))
    assert run_selection(frame, policy).funnel[-1].rows == 10


def test_manifest_is_json_and_chains_are_flattened() -> None:
    frame = _pool(200)
    result = run_selection(frame, [Chain(IsIn("shard", ("00000", "00001")), Threshold("clip_score", max=0.35)),
                                   clip_score_top(0.1)])
    manifest = json.loads(json.dumps(result.manifest()))
    assert manifest["pool_rows"] == 200 and manifest["selected"] == len(result.uids) == 20
    assert [stage["stage"].split("(")[0] for stage in manifest["funnel"]] == [
        "pool", "is_in", "threshold", "top_fraction"]
    assert result.uids.to_pylist() == sorted(result.uids.to_pylist())


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        TopFraction("clip_score", 1.5)
    with pytest.raises(ValueError):
        RankSum(("a", "b"), 0.1, weights=(1.0,))
    with pytest.raises(ValueError):
        Threshold("clip_score")
