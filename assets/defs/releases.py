"""One release asset per recipe in ``<home>/recipes``: an immutable release per materialisation."""

import re
from pathlib import Path

import dagster as dg
import polars as pl

from curation_platform import storage
from curation_platform.releases import (
    Recipe,
    ReleaseOptions,
    ReleaseSources,
    create_release,
    load_recipe,
    verify_release,
)
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


RELEASE_CHECKS = {
    "release_verifies": "The published folder matches its SHA256SUMS, and re-running the recipe on the pinned "
                        "tables gives the same samples.parquet, subset.npy and release id.",
    "funnel_reconciles": "Each selection stage keeps at most the rows it was given, and the last count is the "
                         "number of samples released.",
    "size_within_bounds": "The release holds at least the recipe's min_size samples and at most its max_size.",
}


def release_asset_name(recipe: Recipe) -> str:
    return "release_" + re.sub(r"[^a-z0-9_]", "_", recipe.name)


def release_checks(manifest: dict, recipe: Recipe, uri: str, platform: PlatformResource) -> list[dg.AssetCheckResult]:
    """The three checks every release gets, computed on what was just published."""
    verification = verify_release(uri, platform.s3)
    rows = [stage["rows"] for stage in manifest["funnel"]]
    reconciles = all(later <= earlier for earlier, later in zip(rows, rows[1:], strict=False)) \
        and rows[-1] == manifest["selected"]
    selected = manifest["selected"]
    return [
        dg.AssetCheckResult(check_name="release_verifies", passed=verification.ok, metadata={
            "files_checked": verification.files_checked, "uids_identical": verification.uids_identical,
            "problems": dg.MetadataValue.json(verification.mismatched + verification.missing + verification.unlisted
                                              + verification.problems)}),
        dg.AssetCheckResult(check_name="funnel_reconciles", passed=reconciles,
                            metadata={"rows_per_stage": dg.MetadataValue.json(rows), "selected": selected}),
        dg.AssetCheckResult(check_name="size_within_bounds",
                            passed=recipe.min_size <= selected <= (recipe.max_size or selected),
                            metadata={"selected": selected, "min_size": recipe.min_size,
                                      "max_size": recipe.max_size}),
    ]


def release_asset(recipe: Recipe, check_keys: list[dg.AssetCheckKey]) -> dg.AssetsDefinition:
    """The release asset of one recipe; ``check_keys`` are the graph's checks whose results it records."""
    name = release_asset_name(recipe)

    @dg.asset(
        name=name,
        deps=[score_statistics, duplicate_groups],
        group_name="releases",
        code_version=recipe.sha256[:16],
        kinds={"parquet", "numpy"},
        description=f"Release of recipe {recipe.name!r}: {recipe.description}",
        check_specs=[dg.AssetCheckSpec(check, asset=name, description=text) for check, text in RELEASE_CHECKS.items()],
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
            check_results=release_checks(manifest, recipe, created.uri, platform),
        )

    return _release
