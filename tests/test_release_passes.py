"""Releases as separate passes (issue 16): planned together, run step by step on a store in any shard
order, the per-recipe results equal one call's; the saved resolution holds no pickles and each shard
reads only its own part of a uid set; a recipe edited after planning and a missing pass are refused."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from curation_platform.releases import RecipeError, ReleaseSources, parse_recipe
from curation_platform.releases.apply_recipe import write_samples
from curation_platform.releases.artefacts import SAMPLES, SUBSET
from curation_platform.releases.passes import (
    PassFolder,
    assemble,
    load_resolution,
    plan_releases,
    read_plan,
    resolve_recipe,
    select,
    write_candidates,
    write_plan,
    write_selection,
)
from tests.helpers.recipes import NEGCLIP_NORMSIM

# a global stage on the survivors (a uid set saved per shard), then a size bound with ties by uid
GLOBAL_TAIL = """
name = "global-tail"
max_size = 40
rank_by = "kl_image"
[[stage]]
type = "basic_filter"
[[stage]]
type = "rank_sum"
scores = ["clip_score", "kl_text"]
fraction = 0.4
"""


@pytest.fixture()
def demo_sources(scored_demo: dict, demo_pool_dir: Path) -> ReleaseSources:
    return ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                          scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))


def _written(recipe, selected, folder: Path) -> tuple[bytes, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    write_samples(recipe, selected, folder / SAMPLES, folder / SUBSET)
    return (folder / SAMPLES).read_bytes(), (folder / SUBSET).read_bytes()


def test_step_by_step_on_a_store_equals_one_call(demo_sources: ReleaseSources, tmp_path: Path) -> None:
    recipes = [parse_recipe(NEGCLIP_NORMSIM), parse_recipe(GLOBAL_TAIL)]
    plan = plan_releases(recipes, demo_sources)
    assert plan_releases(recipes, demo_sources, plan.versions).plan_id == plan.plan_id, "same inputs, same plan"
    assert len(plan.shards) > 1 and set(plan.recipes) == {"negclip-normsim", "global-tail"}
    folder = PassFolder(f"memory://passes-{tmp_path.name}/{plan.plan_id}")
    write_plan(plan, folder)
    plan = read_plan(folder)  # every later step starts from the recorded plan, as a worker would
    for shard in reversed(plan.shards):
        write_candidates(plan, folder, shard)
    for recipe in recipes:
        resolve_recipe(recipe, plan, folder)
        for shard in reversed(plan.shards):
            write_selection(recipe, plan, folder, shard)
    for recipe in recipes:
        stepwise = assemble(recipe, plan, folder)
        _, whole = select(recipe, demo_sources, PassFolder(str(tmp_path / recipe.name / "passes")), plan.versions)
        assert stepwise.funnel == whole.funnel and stepwise.count == whole.count > 0
        assert stepwise.cutoffs == whole.cutoffs
        assert _written(recipe, stepwise, tmp_path / recipe.name / "a") == _written(recipe, whole,
                                                                                   tmp_path / recipe.name / "b")
    memory = fsspec.filesystem("memory")
    names = memory.find(f"/passes-{tmp_path.name}")
    assert names and all(name.endswith((".json", ".parquet")) for name in names), "nothing pickled"


def test_each_shard_reads_only_its_part_of_a_uid_set(demo_sources: ReleaseSources, tmp_path: Path) -> None:
    recipe = parse_recipe(GLOBAL_TAIL)
    plan, selected = select(recipe, demo_sources, PassFolder(str(tmp_path)))
    folder = PassFolder(str(tmp_path))
    parts = [load_resolution(recipe, folder, index).filters[-2] for index in range(len(plan.shards))]
    kept = [part.uids for part in parts]  # the rank_sum's kept uids, before the size bound's cut
    assert all(part.keep for part in parts) and sum(len(uids) for uids in kept) == selected.funnel[-2]["rows"]
    for index, shard in enumerate(plan.shards):
        candidates = folder.read_table(f"candidates/{index:08d}.parquet", ["uid", "shard"])
        assert set(candidates.column("shard").to_pylist()) == {shard}
        assert set(kept[index].to_list()) <= set(candidates.column("uid").to_pylist())
    assert selected.count == recipe.max_size


def test_an_edited_recipe_or_a_missing_pass_is_refused(demo_sources: ReleaseSources, tmp_path: Path) -> None:
    recipe = parse_recipe(NEGCLIP_NORMSIM)
    plan = plan_releases([recipe], demo_sources)
    folder = PassFolder(str(tmp_path))
    write_plan(plan, folder)
    for shard in plan.shards:
        write_candidates(plan, folder, shard)
    edited = parse_recipe(NEGCLIP_NORMSIM.replace("0.20", "0.25"))
    with pytest.raises(RecipeError, match="is not in release plan"):
        resolve_recipe(edited, plan, folder)
    resolve_recipe(recipe, plan, folder)
    write_selection(recipe, plan, folder, plan.shards[0])
    with pytest.raises(RecipeError, match=f"pass 2 has not run for {len(plan.shards) - 1} shards"):
        assemble(recipe, plan, folder)
    with pytest.raises(RecipeError, match="not in release plan"):
        write_candidates(plan, folder, "no-such-shard")
