"""Incremental near duplicates (LanceDB vector index), duplicate groups, decontamination and the recipe stages
that use them, on the scored demo against its ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curation_platform import lance_tables
from curation_platform.dedup import ExactDuplicateIndex, semdedup
from curation_platform.dedup.contamination import EVALUATION_TABLE, EvaluationSet, copies_in_shard, embed_evaluation_set
from curation_platform.dedup.index import NearSearch, ensure_vector_index, near_matches, shard_image_embeddings
from curation_platform.dedup.tables import (
    GROUPS_TABLE,
    build_groups,
    read_groups,
    selection_columns,
    write_groups,
    write_shard_pairs,
)
from curation_platform.embedding.engine import EmbedConfig
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, LanceSink, record_batch
from curation_platform.releases import ReleaseSources, create_release, parse_recipe, verify_release
from curation_platform.releases.recipe import RecipeError
from curation_platform.scoring.pipeline import save_set
from curation_platform.selection import Decontaminate, Dedup, run_selection

EPS = 0.05
# a small table: an index with several IVF partitions, every one probed, so the search is exhaustive here
SEARCH = NearSearch(eps=EPS, neighbours=64, nprobes=8, min_index_rows=50)
SHARDS = ("00000", "00001")
EVAL_SET = "demo-eval"


def _embedding_rows(lance: str, teacher_id: str, shard: str) -> pa.Table:
    table = lance_tables.connect(lance).open_table(EMBEDDINGS_TABLE)
    return table.to_lance().to_table(filter=lance_tables.partition_condition(shard, teacher_id))


def _copy_shards(source: str, target: Path, teacher_id: str, shards: tuple[str, ...]) -> str:
    """A LanceDB with the source's embedding rows of ``shards`` only (added shard by shard)."""
    database = lance_tables.connect(str(target))
    for shard in shards:
        rows = _embedding_rows(source, teacher_id, shard)
        if EMBEDDINGS_TABLE in database.list_tables().tables:
            database.open_table(EMBEDDINGS_TABLE).add(rows)
        else:
            database.create_table(EMBEDDINGS_TABLE, rows)
    return str(target)


def _index_and_pair(lance: str, teacher_id: str, shards: tuple[str, ...], exact: ExactDuplicateIndex,
                    validated: dict[str, pl.DataFrame], sets=()) -> dict:
    """What the per-shard step does for ``shards``: extend the index, query, store the shard's pairs."""
    work = {}
    ensure_vector_index(lance, SEARCH)
    for shard in shards:
        exact.add_shard(shard, validated[shard])
        found = near_matches(lance, teacher_id, shard, SEARCH)
        uids, images = shard_image_embeddings(lance, teacher_id, shard)
        write_shard_pairs(lance, teacher_id, shard, found.pairs, copies_in_shard(uids, images, sets, EPS), EPS)
        work[shard] = found
    return work


@pytest.fixture(scope="module")
def validated(scored_demo: dict) -> dict[str, pl.DataFrame]:
    return {shard.name: pl.from_arrow(accepted) for shard, accepted in scored_demo["jobs"]}


@pytest.fixture(scope="module")
def deduplicated(scored_demo: dict, demo_pool_dir: Path, validated, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the scored demo's LanceDB with the evaluation set, pairs and groups of every shard."""
    root = tmp_path_factory.mktemp("deduplicated")
    lance = str(root / "lance")
    shutil.copytree(scored_demo["lance"], lance)
    teacher = scored_demo["teacher"]
    evaluation = embed_evaluation_set(teacher, EvaluationSet(EVAL_SET, str(demo_pool_dir / "eval")),
                                      EmbedConfig(device="cpu", workers=0, batch_size=64))
    save_set(lance, EVALUATION_TABLE, evaluation)
    exact = ExactDuplicateIndex(str(root / "exact"))
    work = _index_and_pair(lance, teacher.teacher_id, SHARDS, exact, validated, [evaluation])
    groups = build_groups(exact, lance, teacher.teacher_id, EPS)
    versions = write_groups(lance, teacher.teacher_id, groups)
    return {"lance": lance, "exact": exact, "groups": groups, "versions": versions, "work": work,
            "evaluation": evaluation, "root": root}


def test_index_groups_equal_exact_search(deduplicated: dict, scored_demo: dict) -> None:
    """With every partition probed, the index finds exactly the pairs an exhaustive search finds."""
    teacher_id = scored_demo["teacher"].teacher_id
    near = deduplicated["groups"].groups.filter(pl.col("kind") == "near")
    rows = [(_embedding_rows(deduplicated["lance"], teacher_id, shard)) for shard in SHARDS]
    batches = [(table.column("uid").to_pylist(), np.stack(table.column("image_embedding").to_numpy(
        zero_copy_only=False))) for table in rows]
    exhaustive = semdedup(iter(batches), clusters=1, eps=EPS)
    assert near.height > 0
    assert near.select("group_id", "uid").sort("uid").equals(exhaustive.select("group_id", "uid").sort("uid"))
    index = lance_tables.connect(deduplicated["lance"]).open_table(EMBEDDINGS_TABLE).list_indices()
    assert [item.index_type for item in index] == ["IvfPq"]


def test_groups_do_not_depend_on_arrival_order(deduplicated: dict, scored_demo: dict, validated,
                                               tmp_path: Path) -> None:
    """Shards one by one (index created on the first, extended for the second) give the groups of all at once."""
    teacher_id = scored_demo["teacher"].teacher_id
    outcomes = []
    for order in (SHARDS, SHARDS[::-1]):
        folder = tmp_path / "-".join(order)
        lance = _copy_shards(scored_demo["lance"], folder / "lance", teacher_id, order[:1])
        exact = ExactDuplicateIndex(str(folder / "exact"))
        first = _index_and_pair(lance, teacher_id, order[:1], exact, validated)
        database = lance_tables.connect(lance)
        database.open_table(EMBEDDINGS_TABLE).add(_embedding_rows(scored_demo["lance"], teacher_id, order[1]))
        assert database.open_table(EMBEDDINGS_TABLE).index_stats("image_embedding_idx").num_unindexed_rows > 0
        second = _index_and_pair(lance, teacher_id, order[1:], exact, validated)
        assert database.open_table(EMBEDDINGS_TABLE).index_stats("image_embedding_idx").num_unindexed_rows == 0
        # the work of the new shard: its own rows read once, one query each; nothing re-clustered
        shard_rows = len(validated[order[1]])
        assert second[order[1]].rows_read == shard_rows <= second[order[1]].queries
        assert second[order[1]].saturated == 0
        assert first[order[0]].rows_read == len(validated[order[0]])
        outcomes.append(build_groups(exact, lance, teacher_id, EPS).groups)
    expected = deduplicated["groups"].groups
    for groups in outcomes:
        assert groups.select("kind", "group_id", "uid").equals(expected.select("kind", "group_id", "uid"))


def test_a_new_shard_of_copies_joins_the_old_groups(deduplicated: dict, scored_demo: dict, tmp_path: Path) -> None:
    """Copies (re-encoded: tiny noise) of old samples in a new shard are found by the index alone."""
    teacher_id = scored_demo["teacher"].teacher_id
    lance = str(tmp_path / "lance")
    shutil.copytree(deduplicated["lance"], lance)
    old = _embedding_rows(lance, teacher_id, "00000").sort_by("uid").slice(0, 5)
    dim = old.schema.field("image_embedding").type.list_size
    images = np.stack(old.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    images = images + np.random.default_rng(0).normal(scale=1e-3, size=images.shape).astype(np.float32)
    copies = [f"copy-{uid}" for uid in old.column("uid").to_pylist()]
    texts = np.stack(old.column("text_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    with LanceSink(lance).shard_writer("copies", teacher_id, dim) as writer:
        writer.write(record_batch(copies, teacher_id, "copies", images, texts))
    assert ensure_vector_index(lance, SEARCH).action == "extended"
    found = near_matches(lance, teacher_id, "copies", SEARCH)
    assert found.rows_read == 5 and found.saturated == 0
    matched = found.pairs.filter(pl.col("matches_shard") == "00000")
    assert set(matched["matches_uid"]) >= set(old.column("uid").to_pylist())
    write_shard_pairs(lance, teacher_id, "copies", found.pairs, copies_in_shard([], np.zeros((0, dim)), []), EPS)
    near = build_groups(deduplicated["exact"], lance, teacher_id, EPS).groups.filter(pl.col("kind") == "near")
    group_of = dict(near.select("uid", "group_id").iter_rows())
    for original, copy in zip(old.column("uid").to_pylist(), copies):
        assert group_of[copy] == group_of[original]


def test_rerunning_changes_nothing(deduplicated: dict, scored_demo: dict, validated) -> None:
    teacher_id = scored_demo["teacher"].teacher_id
    lance = deduplicated["lance"]
    assert ensure_vector_index(lance, SEARCH).action == "unchanged"
    table = lance_tables.connect(lance).open_table(EMBEDDINGS_TABLE)
    assert len(table.list_indices()) == 1
    again = build_groups(deduplicated["exact"], lance, teacher_id, EPS)
    assert again.groups.equals(deduplicated["groups"].groups)
    assert write_groups(lance, teacher_id, again) == deduplicated["versions"], "an unchanged rebuild writes nothing"
    stored = read_groups(lance, teacher_id)
    assert stored.groups.sort("kind", "group_id", "uid").equals(deduplicated["groups"].groups)


def test_exact_and_near_groups_against_ground_truth(deduplicated: dict, scored_demo: dict) -> None:
    truth = scored_demo["truth"]
    groups = deduplicated["groups"].groups
    image = groups.filter(pl.col("kind") == "image")
    exact_copies = truth.filter(pl.col("corruption") == "exact_duplicate")
    grouped = set(image["uid"])
    embedded = set(groups["uid"]) | set(truth["uid"])
    for uid, source in exact_copies.select("uid", "duplicate_group").iter_rows():
        if uid in embedded and source in grouped:
            assert uid in grouped
    assert set(exact_copies["uid"]) & grouped, "the demo's exact duplicates are grouped"
    assert (image["similarity"] == 1.0).all()
    assert groups.filter(pl.col("kind") == "near")["similarity"].min() >= 1 - EPS - 1e-6


def test_decontamination_finds_the_eval_copies(deduplicated: dict, scored_demo: dict) -> None:
    truth = scored_demo["truth"]
    planted = set(truth.filter(pl.col("corruption") == "eval_copy")["uid"])
    assert planted, "the demo pool holds labelled near copies of eval images"
    flagged = deduplicated["groups"].contamination
    found = flagged.filter(pl.col("eval_set") == EVAL_SET)
    accepted = set(pl.concat([pl.from_arrow(rows.select(["uid"])) for _, rows in scored_demo["jobs"]])["uid"])
    assert planted & accepted <= set(found["uid"]), "every accepted eval copy is flagged"
    sources = dict(truth.filter(pl.col("corruption") == "eval_copy").select("uid", "corruption_detail").iter_rows())
    for uid, eval_uid in found.filter(pl.col("uid").is_in(list(planted))).select("uid", "eval_uid").iter_rows():
        assert eval_uid == sources[uid], "the closest evaluation image is the one it copies"


RECIPE = """name = "clean-top"
[[stage]]
type = "decontaminate"
sets = ["demo-eval"]
[[stage]]
type = "dedup"
keep = "clip_score"
kinds = ["image", "near"]
[[stage]]
type = "top_fraction"
score = "clip_score"
fraction = 0.6
"""


def test_a_release_that_uses_dedup_and_decontaminate(deduplicated: dict, scored_demo: dict, demo_pool_dir: Path,
                                                      validated, tmp_path: Path) -> None:
    sources = ReleaseSources(deduplicated["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    release = create_release(parse_recipe(RECIPE), sources, str(tmp_path / "releases"))
    samples = pl.read_parquet(Path(release.uri) / "samples.parquet")
    hashes = pl.concat(list(validated.values())).select("uid", "image_sha256")
    kept = samples.join(hashes, on="uid")
    assert kept["image_sha256"].n_unique() == kept.height, "no exact duplicates in the release"
    near = deduplicated["groups"].groups.filter(pl.col("kind") == "near")
    assert samples.join(near, on="uid")["group_id"].is_unique().all(), "at most one member per near group"
    assert not set(samples["uid"]) & set(deduplicated["groups"].contamination["uid"])
    funnel = {stage["stage"].split("(")[0]: stage["rows"] for stage in release.manifest["funnel"]}
    assert funnel["decontaminate"] < funnel["pool"] and funnel["dedup"] < funnel["decontaminate"]
    assert GROUPS_TABLE in release.manifest["lancedb_tables"]
    report = (Path(release.uri) / "report" / "report.md").read_text()
    assert "## Duplicates and contamination" in report and "duplicates_removed.png" in report
    assert verify_release(release.uri).ok, "the release re-derives from its pinned duplicate tables"


def test_recipes_refuse_bad_duplicate_stages(deduplicated: dict, scored_demo: dict, demo_pool_dir: Path,
                                             tmp_path: Path) -> None:
    for stage, message in (('type = "dedup"', "keep"),
                           ('type = "dedup"\nkeep = "clip_score"\nkinds = ["pixels"]', "kinds"),
                           ('type = "decontaminate"\nsets = "demo-eval"', "sets")):
        with pytest.raises(RecipeError, match=message):
            parse_recipe(f'name = "bad"\n[[stage]]\n{stage}\n')
    sources = ReleaseSources(deduplicated["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    unknown = parse_recipe('name = "bad"\n[[stage]]\ntype = "decontaminate"\nsets = ["imagenet"]\n')
    with pytest.raises(RecipeError, match="not registered"):
        create_release(unknown, sources, str(tmp_path / "releases"))
    without = ReleaseSources(scored_demo["lance"], sources.validated_uri, sources.teacher_id)
    with pytest.raises(RecipeError, match="duplicate_groups"):
        create_release(parse_recipe(RECIPE), without, str(tmp_path / "releases"))


def test_dedup_policy_keeps_the_best_member_whatever_the_row_order() -> None:
    frame = pl.DataFrame({
        "uid": list("abcdefg"), "score": [1.0, 5.0, 3.0, 2.0, None, 4.0, float("nan")],
        "dup_image": ["x", "x", None, None, None, None, None], "dup_caption": [None] * 7,
        "dup_near": [None, "n", "n", None, "m", "m", None],
        "contaminated_by": [None, None, ["demo-eval"], None, None, ["other"], None],
    })
    expected = ["b", "d", "f", "g"]  # {a, b, c} -> b; {e, f} -> f (e has no score); d and g in no group
    for seed in range(3):
        shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
        assert run_selection(shuffled, [Dedup("score", ("image", "near"))]).uids.to_pylist() == expected
    assert run_selection(frame, [Dedup("score", ("image",))]).uids.to_pylist() == ["b", "c", "d", "e", "f", "g"]
    assert run_selection(frame, [Decontaminate(("demo-eval",))]).uids.to_pylist() == list("abdefg")
    assert run_selection(frame, [Decontaminate()]).uids.to_pylist() == list("abdeg")


def test_selection_columns_merge_kinds_and_flags(deduplicated: dict) -> None:
    columns = selection_columns(deduplicated["groups"])
    assert columns["uid"].is_unique().all()
    assert {"dup_image", "dup_caption", "dup_near", "contaminated_by"} <= set(columns.columns)
