"""One release asset per recipe in ``<home>/recipes``: an immutable release per materialisation."""

import re
from pathlib import Path

import dagster as dg
import polars as pl

from curation_platform import storage
from curation_platform.releases import Recipe, ReleaseOptions, ReleaseSources, create_release, load_recipe
from curation_platform_dagster.defs.duplicates import duplicate_groups
from curation_platform_dagster.defs.resources import PlatformResource
from curation_platform_dagster.defs.scoring import score_statistics, teacher_id_of

RECIPE_SUFFIXES = (".toml", ".yaml", ".yml")


def load_recipes(folder: Path) -> list[Recipe]:
    """Every recipe file in ``folder`` (sorted); an invalid recipe stops the code location with its error."""
    if not folder.is_dir():
        return []
    return [load_recipe(path) for path in sorted(folder.iterdir()) if path.suffix.lower() in RECIPE_SUFFIXES]


def _evaluation_labels(platform: PlatformResource) -> pl.DataFrame | None:
    """The demo's ground truth, shown in the report only (selection never sees it)."""
    truth = platform.layout.demo_ground_truth
    if storage.is_s3(truth) or not Path(truth).exists():
        return None
    return pl.read_parquet(truth).select("uid", pl.col("corruption").alias("label"))


def _check_results(context: dg.AssetExecutionContext, check_keys: list[dg.AssetCheckKey]) -> dict:
    """Status of the latest execution of every check of the graph (recorded in the manifest)."""
    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    return {key.to_user_string(): record.status.value for key, record in sorted(latest.items(), key=str) if record}


def release_asset(recipe: Recipe, check_keys: list[dg.AssetCheckKey]) -> dg.AssetsDefinition:
    """The release asset of one recipe; ``check_keys`` are the graph's checks whose results it records."""
    name = "release_" + re.sub(r"[^a-z0-9_]", "_", recipe.name)

    @dg.asset(
        name=name,
        deps=[score_statistics, duplicate_groups],
        group_name="releases",
        code_version=recipe.sha256[:16],
        kinds={"parquet", "numpy"},
        description=f"Release of recipe {recipe.name!r}: {recipe.description}",
    )
    def _release(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        teacher_id = teacher_id_of(context)
        sources = ReleaseSources(platform.lancedb_uri, platform.validated_uri, teacher_id, platform.pool, platform.s3)
        options = ReleaseOptions(run_id=context.run.run_id, checks=_check_results(context, check_keys),
                                 labels=_evaluation_labels(platform))
        created = create_release(recipe, sources, platform.releases_uri, options)
        manifest = created.manifest
        funnel = "\n".join(["| stage | rows |", "| --- | ---: |"]
                           + [f"| {stage['stage']} | {stage['rows']:,} |" for stage in manifest["funnel"]])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(manifest["samples_sha256"][:16]),
            metadata={
                "release_id": manifest["release_id"],
                "version": manifest["version"],
                "dagster/row_count": manifest["selected"],
                "pool_rows": manifest["pool_rows"],
                "teacher_id": teacher_id,
                "manifest": dg.MetadataValue.path(storage.join(created.uri, "manifest.json")),
                "report": dg.MetadataValue.path(storage.join(created.uri, "report", "report.md")),
                "funnel": dg.MetadataValue.md(funnel),
                "lancedb_tables": dg.MetadataValue.json(manifest["lancedb_tables"]),
            },
        )

    return _release
