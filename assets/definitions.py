"""The code location: ``build_definitions`` wires the graph; ``defs`` is what Dagster's tools load."""

import warnings

import dagster as dg

from curation_platform.layout import ProjectLayout
from curation_platform.storage import S3Settings

# Partitioned asset checks are "preview" in dagster 1.13 and the per-shard checks rely on them; backfill
# policies (one run over many shards) are "beta". Both warnings are raised when the asset modules below are
# imported, on every CLI command.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning, message="Parameter `backfill_policy`")

from curation_platform_dagster.defs.duplicates import (
    duplicate_groups,
    duplicate_groups_are_consistent,
    duplicate_pairs,
    eval_set_embeddings,
    image_index,
)
from curation_platform_dagster.defs.embeddings import embeddings, embeddings_meet_expectations
from curation_platform_dagster.defs.evaluation import evaluation_asset
from curation_platform_dagster.defs.ingestion import (
    SHARD_PIPELINE,
    quarantine_rate_within_bound,
    samples_meet_expectations,
    shard_discovery_sensor,
    shard_reconciles,
    uids_kept_once,
    validated_samples,
)
from curation_platform_dagster.defs.release_passes import release_pass_assets
from curation_platform_dagster.defs.releases import load_recipes, release_asset
from curation_platform_dagster.defs.resources import (
    DuplicatesResource,
    EvaluationResource,
    PlatformResource,
    ScoringResource,
    TeacherResource,
)
from curation_platform_dagster.defs.scoring import (
    normsim_target,
    reference_sample,
    score_statistics,
    scores_meet_expectations,
    shard_prompt_weights,
    shard_scores,
    statistics_are_sane,
)
from curation_platform_dagster.defs.sources import located
from curation_platform_dagster.defs.teachers import no_progress, teacher, teacher_gate

automation_sensor = dg.AutomationConditionSensorDefinition(
    "curation_automation", target=dg.AssetSelection.all(), minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Embeds, scores and deduplicates each newly ingested shard once its checks pass, and refreshes "
                "the pool's statistics hourly; its runs are listed by the assets they materialise.",
)

# Every run the sensors or a person launches goes through one of these (the main job as well), so the runs
# list says what each run did.
shard_pipeline = dg.define_asset_job(
    SHARD_PIPELINE, selection=[validated_samples, embeddings, shard_scores, duplicate_pairs],
    description="Ingest, embed, score and deduplicate shards: the job behind CLI backfills and single-shard retries.",
)
prompt_weights = dg.define_asset_job(
    "prompt_weights", selection=[shard_prompt_weights],
    description="Add the importance weight column of newly configured domain prompts to scored shards (one run "
                "fills a whole backfill's shards with one teacher load).",
)
teacher_and_references = dg.define_asset_job(
    "teacher_and_references", selection=[teacher, reference_sample, normsim_target, eval_set_embeddings],
    description="Train or load the teacher, draw the reference sample, embed the NormSim target and evaluation sets.",
)
pool_statistics = dg.define_asset_job(
    "pool_statistics", selection=[score_statistics, image_index, duplicate_groups],
    description="Pool-wide statistics, the near-duplicate index and the duplicate groups.",
)
releases_job = dg.define_asset_job(
    "releases", selection=dg.AssetSelection.groups("releases"),
    description="Publish one new release version of every recipe (each verified by its checks).",
)
evaluations_job = dg.define_asset_job(
    "evaluations", selection=dg.AssetSelection.groups("evaluation"),
    description="Train students on the latest release of a recipe and on its baselines, and benchmark them "
                "(hours on GPUs at DataComp scales: select the recipes to evaluate).",
)


def build_definitions(settings: dict | None = None, resources: dict | None = None) -> dg.Definitions:
    """The whole graph; ``settings`` (default: the home's ``curation.json``) seeds the teacher and scoring
    resources, ``resources`` replaces resources by key (tests, the main job, embedding the location elsewhere)."""
    settings = ProjectLayout.resolve().settings(S3Settings.from_env()) if settings is None else settings
    resources = {
        "platform": PlatformResource(),
        "teacher_config": TeacherResource(**settings.get("teacher", {})),
        "scoring": ScoringResource(**settings.get("scoring", {})),
        "evaluation": EvaluationResource(**settings.get("evaluation", {})),
        "duplicates": DuplicatesResource(**settings.get("duplicates", {})),
        "training_progress": no_progress,
    } | (resources or {})
    checks = [teacher_gate(blocking=resources["teacher_config"].blocks), shard_reconciles, samples_meet_expectations,
              quarantine_rate_within_bound, uids_kept_once, embeddings_meet_expectations, scores_meet_expectations,
              statistics_are_sane, duplicate_groups_are_consistent]
    check_keys = [key for check in checks for key in check.check_keys]
    recipes = load_recipes(resources["platform"].recipes_dir)
    releases = [release_asset(recipe, check_keys) for recipe in recipes]
    in_main_job = set(resources["evaluation"].main_job)
    evaluations = [evaluation_asset(recipe, release, recipe.name in in_main_job)
                   for recipe, release in zip(recipes, releases, strict=True)]
    return dg.Definitions(
        assets=[*located(resources), validated_samples, teacher, embeddings, reference_sample, normsim_target, shard_scores,
                shard_prompt_weights, score_statistics, eval_set_embeddings, image_index, duplicate_pairs, duplicate_groups,
                *release_pass_assets(recipes), *releases, *evaluations],
        asset_checks=checks,
        jobs=[shard_pipeline, prompt_weights, teacher_and_references, pool_statistics, releases_job, evaluations_job],
        sensors=[shard_discovery_sensor, automation_sensor],
        resources=resources,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What ``dagster dev -w workspace.yaml`` and ``dagster ... -m curation_platform_dagster.definitions`` load:
    built when a tool loads the location (reading the environment and ``curation.json`` then), not at import."""
    return build_definitions()
