"""One evaluation asset per release recipe, downstream of its release, on the ``gpu`` concurrency pool.

Materialising it trains students with open_clip_train on the latest release of the recipe and on its
baselines at equal compute, evaluates them with clip_benchmark, and publishes a checksummed record
keyed by the release id (the release folder is never touched); the leaderboard is rewritten.
Evaluations run on request or in the main job (``evaluation.main_job``): at GPU scales they cost hours.
"""

from pathlib import Path

import dagster as dg

from curation_platform import storage
from curation_platform.evaluation.evaluate import evaluate_release, project_benchmarks
from curation_platform.evaluation.record import write_leaderboard
from curation_platform.releases import Recipe
from curation_platform_dagster.defs.metadata import png_metadata
from curation_platform_dagster.defs.resources import EvaluationResource, PlatformResource
from curation_platform_dagster.defs.sources import benchmarks

GPU_POOL = "gpu"
IN_MAIN_JOB = "curation/main_job"


def _release_uri(context: dg.AssetExecutionContext, release: dg.AssetsDefinition) -> str:
    event = context.instance.get_latest_materialization_event(release.key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"{release.key.to_user_string()} has not been materialised yet")
    return str(Path(event.asset_materialization.metadata["manifest"].value).parent)


def evaluation_asset(recipe: Recipe, release: dg.AssetsDefinition, in_main_job: bool) -> dg.AssetsDefinition:
    """The evaluation of ``recipe``'s release; ``in_main_job`` says whether the main job materialises it."""

    @dg.asset(
        name=release.key.path[-1].replace("release_", "evaluation_", 1),
        deps=[release, benchmarks],
        group_name="evaluation",
        pool=GPU_POOL,
        kinds={"pytorch"},
        tags={IN_MAIN_JOB: str(in_main_job).lower()},
        description=f"Students trained on release {recipe.name!r} and its baselines at equal compute "
                    "(open_clip_train), zero-shot evaluated (clip_benchmark).",
    )
    def _evaluation(context: dg.AssetExecutionContext, platform: PlatformResource,
                    evaluation: EvaluationResource) -> dg.MaterializeResult:
        try:
            benchmark_sets = project_benchmarks(platform.layout, evaluation.benchmarks_uri)
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        evaluated = evaluate_release(
            _release_uri(context, release), platform.layout.evaluations, evaluation.eval_scale(), benchmark_sets,
            seeds=evaluation.seed_list(), baselines=evaluation.baselines, device=evaluation.device, s3=platform.s3,
            on_run=lambda run: context.log.info(f"{run['arm']} seed {run['seed']}: {run['metrics']}"))
        record = evaluated.record
        for metric in record["at_chance"]:
            context.log.warning(f"every arm scores {metric} near chance ({record['chance'][metric]:.3f}): "
                                "this scale cannot rank the arms on it")
        board = write_leaderboard(platform.layout.evaluations, platform.s3)
        figure = storage.read_bytes(storage.join(evaluated.uri, "figures", "metrics.png"), platform.s3)
        summary = {arm: {metric: f"{value['mean']:.3f} ± {value['sd']:.3f}" for metric, value in by_metric.items()}
                   for arm, by_metric in record["summary"]["arms"].items()}
        verdicts = {f"{baseline}/{metric}": comparison["verdict"]
                    for baseline, by_metric in record["summary"]["comparisons"].items()
                    for metric, comparison in by_metric.items()}
        return dg.MaterializeResult(metadata={
            "evaluation_id": record["evaluation_id"],
            "release_id": record["release_id"],
            "scale": record["scale"]["name"],
            "seeds": dg.MetadataValue.json(record["seeds"]),
            "samples_seen": record["compute"]["samples_seen"],
            "weighted": record["weighted"],
            "arms": dg.MetadataValue.json(summary),
            "verdicts": dg.MetadataValue.json(verdicts),
            "at_chance": dg.MetadataValue.json(record["at_chance"]),
            "record": dg.MetadataValue.path(storage.join(evaluated.uri, "record.json")),
            "leaderboard": dg.MetadataValue.path(board["markdown"]),
            "metrics_png": png_metadata("metrics", figure),
        })

    return _evaluation
