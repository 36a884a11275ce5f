"""The release passes as assets, so no step holds the pool and the per-shard work runs on as many workers
as ingestion and scoring: ``release_plan`` pins the tables for every recipe, ``release_candidates``
(per shard) writes the columns the recipes rank, ``release_cuts`` resolves every recipe's stages into
exact per-row filters, ``release_selections`` (per shard) writes every recipe's selected rows; each
``release_<recipe>`` asset then merges its recipe's shard files and publishes (defs/releases.py).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from curation_platform import storage
from curation_platform.partitioned_selection import Cut, Membership
from curation_platform.pool import partition_key_for
from curation_platform.releases import Recipe, RecipeError, ReleaseSources
from curation_platform.releases.passes import (
    PassFolder,
    ReleasePlan,
    plan_releases,
    read_plan,
    resolve_recipe,
    write_candidates,
    write_plan,
    write_selection,
)
from curation_platform_dagster.defs.duplicates import duplicate_groups
from curation_platform_dagster.defs.ingestion import shard_partitions
from curation_platform_dagster.defs.resources import PlatformResource
from curation_platform_dagster.defs.scoring import ALL_SHARDS, score_statistics, teacher_id_of

PASSES_FOLDER = "release_passes"  # under the project home: one folder per plan, the latest kept
PLAN = dg.AssetKey("release_plan")
SELECTIONS = dg.AssetKey("release_selections")
CUT_READERS = min(8, os.cpu_count() or 1)
# a backfill of a per-shard pass runs as many runs (machines) of up to this many shards each
PASS_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=64)  # candidate files the global step reads at once (threads)


def passes_root(platform: PlatformResource) -> str:
    return storage.join(platform.home, PASSES_FOLDER)


def latest_plan(context: dg.AssetExecutionContext, platform: PlatformResource) -> tuple[ReleasePlan, PassFolder]:
    """The plan ``release_plan`` last recorded, read from its folder."""
    event = context.instance.get_latest_materialization_event(PLAN)
    if event is None or event.asset_materialization is None:
        raise dg.Failure("release_plan has not been materialised yet")
    folder = PassFolder(event.asset_materialization.metadata["folder"].value, platform.s3)
    if not folder.exists("plan.json"):
        raise dg.Failure(f"the release plan's folder {folder.uri} is gone: materialise release_plan again")
    return read_plan(folder), folder


def _shards_of(plan: ReleasePlan, partition_keys: list[str]) -> list[str]:
    """The plan's shards behind a run's partitions (a shard without scored rows is in no plan: no release
    reads it)."""
    wanted = set(partition_keys)
    return [shard for shard in plan.shards if partition_key_for(shard) in wanted]


def _described(item: object) -> str:
    if isinstance(item, Cut):
        if item.value is None:
            return f"{item.column}: {'every ranked row' if item.keep_all else 'no row'}"
        order = "descending" if item.descending else "ascending"
        return f"{item.column} {order}, up to key {item.value:.6g} (ties up to uid {item.uid})"
    if isinstance(item, Membership):
        return f"{'keep' if item.keep else 'drop'} listed uids"
    return item.describe().get("policy", type(item).__name__)  # a row filter applied as written


def release_pass_assets(recipes: list[Recipe]) -> list[dg.AssetsDefinition]:
    """The four pass assets for ``recipes`` (none without recipes)."""
    if not recipes:
        return []
    by_name = {recipe.name: recipe for recipe in recipes}

    @dg.asset(
        deps=[score_statistics, duplicate_groups],
        group_name="releases",
        kinds={"lancedb", "parquet"},
        description="The inputs of the next releases of every recipe: the pinned LanceDB table versions, the score "
                    "provenance and the scored rows per shard, with each recipe checked against them.",
    )
    def release_plan(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        sources = ReleaseSources(platform.lancedb_uri, platform.validated_uri, teacher_id_of(context), platform.pool,
                                 platform.s3)
        try:
            plan = plan_releases(recipes, sources)
        except RecipeError as error:
            raise dg.Failure(str(error)) from error
        root = passes_root(platform)
        folder = PassFolder(storage.join(root, plan.plan_id), platform.s3)
        write_plan(plan, folder)
        older = [name for name in storage.list_dirs(root, platform.s3) if name != plan.plan_id]
        for name in older:  # a release always reads the latest plan
            PassFolder(storage.join(root, name), platform.s3).remove()
        return dg.MaterializeResult(
            data_version=dg.DataVersion(plan.plan_id),
            metadata={
                "plan_id": plan.plan_id,
                "folder": folder.uri,
                "shards": len(plan.shards),
                "dagster/row_count": plan.pool_rows,
                "recipes": dg.MetadataValue.json(plan.recipes),
                "columns": dg.MetadataValue.json(list(plan.columns)),
                "lancedb_tables": dg.MetadataValue.json(plan.versions),
                "older_plans_removed": len(older),
            },
        )

    @dg.asset(
        partitions_def=shard_partitions,
        backfill_policy=PASS_BACKFILL,
        deps=[release_plan],
        group_name="releases",
        kinds={"parquet"},
        description="Pass 1 of the releases, per shard: the shard's scored rows with every column the recipes rank "
                    "or filter by, sorted by uid (the exact per-shard score columns the cut-offs come from).",
    )
    def release_candidates(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        plan, folder = latest_plan(context, platform)
        shards = _shards_of(plan, context.partition_keys)
        rows = {shard: write_candidates(plan, folder, shard) for shard in shards}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{plan.plan_id}-{sum(rows.values())}"),
            metadata={"plan_id": plan.plan_id, "dagster/row_count": sum(rows.values()), "shards_in_plan": len(shards),
                      "shards_not_in_plan": len(context.partition_keys) - len(shards),
                      "shard_indexes": dg.MetadataValue.json([plan.index(shard) for shard in shards])},
        )

    @dg.asset(
        deps=[dg.AssetDep(release_candidates, partition_mapping=ALL_SHARDS)],
        group_name="releases",
        kinds={"polars"},
        description="The global step of the releases: every recipe's ranked stages become exact cut-offs (sketches "
                    "of the candidates, then a counting pass around the bracket, so ties resolve as in one "
                    "process), its dedup and global stages become uid sets; recorded per recipe in the plan folder.",
    )
    def release_cuts(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        plan, folder = latest_plan(context, platform)
        missing = [shard for index, shard in enumerate(plan.shards)
                   if not folder.exists(f"candidates/{index:08d}.parquet")]
        if missing:
            raise dg.Failure(f"release_candidates has not run for {len(missing)} shards of plan {plan.plan_id} "
                             f"(first: {missing[0]}): materialise its partitions first")
        lines = ["| recipe | filter | resolved as |", "| --- | ---: | --- |"]
        with ThreadPoolExecutor(CUT_READERS) as readers:
            for name in sorted(plan.recipes):
                try:
                    resolution = resolve_recipe(by_name[name], plan, folder, executor=readers)
                except RecipeError as error:
                    raise dg.Failure(str(error)) from error
                lines += [f"| {name} | {position} | {_described(item)} |"
                          for position, item in enumerate(resolution.filters)]
        return dg.MaterializeResult(
            data_version=dg.DataVersion(plan.plan_id),
            metadata={"plan_id": plan.plan_id, "recipes_resolved": len(plan.recipes), "cuts": dg.MetadataValue.md("\n".join(lines))},
        )

    @dg.asset(
        partitions_def=shard_partitions,
        backfill_policy=PASS_BACKFILL,
        deps=[release_cuts],
        group_name="releases",
        kinds={"parquet"},
        description="Pass 2 of the releases, per shard: every recipe's cut-offs applied to the shard's candidates, "
                    "its selected rows and its funnel counts written for the release to merge.",
    )
    def release_selections(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        plan, folder = latest_plan(context, platform)
        shards = _shards_of(plan, context.partition_keys)
        selected = {name: sum(write_selection(by_name[name], plan, folder, shard).rows for shard in shards)
                    for name in sorted(plan.recipes)}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{plan.plan_id}-{sum(selected.values())}"),
            metadata={"plan_id": plan.plan_id, "shards_in_plan": len(shards),
                      "selected_per_recipe": dg.MetadataValue.json(selected),
                      "dagster/row_count": sum(selected.values())},
        )

    return [release_plan, release_candidates, release_cuts, release_selections]


def plan_of_release(context: dg.AssetExecutionContext, platform: PlatformResource,
                    recipe: Recipe) -> tuple[ReleasePlan, PassFolder]:
    """The latest plan, which must hold this very recipe text."""
    plan, folder = latest_plan(context, platform)
    try:
        plan.check_recipe(recipe)
    except RecipeError as error:
        raise dg.Failure(str(error)) from error
    if teacher_id_of(context) != plan.sources.teacher_id:
        raise dg.Failure(f"release plan {plan.plan_id} is of teacher {plan.sources.teacher_id}, not the current one: "
                         "materialise release_plan again")
    return plan, folder
