"""One release asset per recipe in ``<home>/recipes``: an immutable release per materialisation."""

import itertools
import re
from pathlib import Path

import dagster as dg
import polars as pl

from curation_platform import storage
from curation_platform.releases import (
    Recipe,
    RecipeError,
    Release,
    ReleaseOptions,
    load_recipe,
    read_samples,
    verify_release,
)
from curation_platform.releases.passes import assemble
from curation_platform.releases.report import INLINE_MAX_BYTES, inline_markdown
from curation_platform.releases.store import publish_release
from curation_platform_dagster.defs.metadata import bar_chart_markdown, png_metadata
from curation_platform_dagster.defs.release_passes import SELECTIONS, plan_of_release
from curation_platform_dagster.defs.resources import PlatformResource
from curation_platform_dagster.defs.scoring import ALL_SHARDS

RECIPE_SUFFIXES = (".toml", ".yaml", ".yml")


def load_recipes(folder: Path) -> list[Recipe]:
    """Every recipe file in ``folder`` (sorted); an invalid recipe stops the code location with its error."""
    if not folder.is_dir():
        return []
    return [load_recipe(path) for path in sorted(folder.iterdir()) if path.suffix.lower() in RECIPE_SUFFIXES]


def _evaluation_labels(platform: PlatformResource) -> pl.DataFrame | None:
    """The demo's ground truth, shown in the report only (selection never sees it)."""
    truth = platform.layout.demo_ground_truth
    if not storage.is_local(truth) or not Path(truth).exists():
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
    reconciles = all(later <= earlier for earlier, later in itertools.pairwise(rows)) \
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


REPORT_FIGURES = {"funnel_png": "funnel.png", "score_histograms_png": "score_histograms.png",
                  "composition_language_png": "composition_language.png"}
PREVIEW_ROWS = 10


def report_metadata(release: Release, platform: PlatformResource) -> dict[str, dg.MetadataValue]:
    """The report as the asset page shows it: its main figures inline (downscaled to the panel's width)
    and a preview of the released samples. With the report the release was just made with
    (``release.report``): its UI figures (funnel, score histograms, the samples around each cut-off, the
    random sample) and, as ``report_markdown``, those in one page under a byte budget (the funnel tables
    first); otherwise (a release opened from storage) the figures are read from the published
    report: the funnel, score histograms, language composition and the best and worst examples of the first
    ranked score."""
    if release.report is not None:
        metadata = {f"{path.stem}_png": png_metadata(f"{path.stem}_png", png)
                    for _, path, png in release.report.ui_figures()}
        metadata["report_markdown"] = dg.MetadataValue.md(inline_markdown(release.report, INLINE_MAX_BYTES))
    else:
        figures = storage.join(release.uri, "report", "figures")
        found = {entry.uri.rsplit("/", 1)[-1] for entry in storage.list_files(figures, platform.s3)}
        examples = sorted(name for name in found if name.startswith("examples_"))[:2]
        shown = {**REPORT_FIGURES, **{name.removesuffix(".png") + "_png": name for name in examples}}
        metadata = {key: png_metadata(key, storage.read_bytes(storage.join(figures, name), platform.s3))
                    for key, name in shown.items() if name in found}
    samples = read_samples(release, platform.s3).head(PREVIEW_ROWS)
    floats = [name for name, dtype in samples.schema.items() if dtype.is_float()]
    preview = samples.with_columns(pl.col(floats).round(4)) if floats else samples
    header = "| " + " | ".join(preview.columns) + " |"
    rows = ["| " + " | ".join(str(value) for value in row) + " |" for row in preview.iter_rows()]
    metadata["preview"] = dg.MetadataValue.md("\n".join([header, "|" + " --- |" * len(preview.columns), *rows]))
    return metadata


def _short_stage(stage: str) -> str:
    """``top_fraction(column=clip_score, fraction=0.3, ...)`` -> ``top_fraction clip_score``."""
    name, _, arguments = stage.partition("(")
    column = re.search(r"column=([\w-]+)", arguments)
    return f"{name} {column.group(1)}" if column else name


def release_asset(recipe: Recipe, check_keys: list[dg.AssetCheckKey]) -> dg.AssetsDefinition:
    """The release asset of one recipe; ``check_keys`` are the graph's checks whose results it records."""
    name = release_asset_name(recipe)

    @dg.asset(
        name=name,
        deps=[dg.AssetDep(SELECTIONS, partition_mapping=ALL_SHARDS)],
        group_name="releases",
        code_version=recipe.sha256[:16],
        kinds={"parquet", "numpy"},
        description=f"Release of recipe {recipe.name!r}: {recipe.description}",
        check_specs=[dg.AssetCheckSpec(check, asset=name, description=text) for check, text in RELEASE_CHECKS.items()],
    )
    def _release(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        plan, folder = plan_of_release(context, platform, recipe)
        try:
            selected = assemble(recipe, plan, folder)
        except RecipeError as error:
            raise dg.Failure(str(error)) from error
        options = ReleaseOptions(run_id=context.run.run_id, checks=_check_results(context, check_keys),
                                 labels=_evaluation_labels(platform))
        created = publish_release(recipe, plan, selected, platform.releases_uri, options)
        manifest = created.manifest
        # counts first and one stage a line: the metadata column is narrow, and Dagster 1.13 draws markdown
        # inline only below 1,000 characters (longer values hide behind "[Show Markdown]")
        funnel = "\n".join(f"- **{stage['rows']:,}** {stage['stage']}" for stage in manifest["funnel"])
        chart = bar_chart_markdown("funnel", [(_short_stage(stage["stage"]), stage["rows"]) for stage in manifest["funnel"]])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(manifest["samples_sha256"][:16]),
            metadata={
                "release_id": manifest["release_id"],
                "version": manifest["version"],
                "dagster/row_count": manifest["selected"],
                "pool_rows": manifest["pool_rows"],
                "teacher_id": plan.sources.teacher_id,
                "manifest": dg.MetadataValue.path(storage.join(created.uri, "manifest.json")),
                "report": dg.MetadataValue.path(storage.join(created.uri, "report", "report.md")),
                "funnel": dg.MetadataValue.md(funnel),
                **({"funnel_chart": dg.MetadataValue.md(chart)} if chart else {}),
                "lancedb_tables": dg.MetadataValue.json(manifest["lancedb_tables"]),
                "plan_id": plan.plan_id,
                **report_metadata(created, platform),
            },
            check_results=release_checks(manifest, recipe, created.uri, platform),
        )

    return _release
