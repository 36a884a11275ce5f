"""The main job's commands, ``curation-platform run`` and ``demo``: they drive Dagster, so they live with
the code location and join the library's command group here (the console script's entry point)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from curation_platform import storage
from curation_platform.cli import main
from curation_platform.cli.display import example, warn
from curation_platform.cli.group import ANY_URL, HOME_HELP, project_layout
from curation_platform.cli.pool import build_demo_pool_into
from curation_platform.cli.releases import echo_funnel
from curation_platform.cli.teachers import (
    TrainingBar,
    teacher_options,
    teacher_spec,
    training_options,
    training_overrides,
)
from curation_platform.evaluation.arms import ARMS as ARM_ORDER
from curation_platform.layout import ProjectLayout

DEMO_PROMPTS = ("a photo of a geometric shape", "a checkerboard or striped texture pattern")

DEMO_SCORING = {"reference_size": 1000, "neg_clip_batch_size": 1024, "neg_clip_repeats": 10,
                "prompts": list(DEMO_PROMPTS)}
# The published equal-size claim (negCLIPLoss + NormSim over CLIPScore), each against its random baseline.
DEMO_EVALUATION = {"scale": "demo", "baselines": ["random"], "main_job": ["negclip-normsim", "clip-score-top20"]}
# The demo's 128-d teacher puts different renders of one attribute set as close as re-uploads: the
# near-duplicate eps with the best F1 on the demo's labels is 0.005, and decontamination needs 0.02 to
# find most eval copies (docs/dedup.md).
DEMO_DUPLICATES = {"eps": 0.005, "decontamination_eps": 0.02}
DEMO_SETTINGS = {"scoring": DEMO_SCORING, "evaluation": DEMO_EVALUATION, "duplicates": DEMO_DUPLICATES}


@main.command(epilog=example("demo --home ./curation_home --shards 2"))
@click.option("--home", default=None, help=HOME_HELP)
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Shards in the demo pool.")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=500, show_default=True, help="Samples per demo shard.")
@click.option("--pool-seed", type=click.IntRange(min=0), default=0, show_default=True, help="Demo pool seed.")
@click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Worker processes for demo generation.")
@click.option("--retrain-teacher", is_flag=True, help="Train the teacher again even if one is materialised.")
def demo(home: str | None, shards: int, samples_per_shard: int, pool_seed: int, workers: int,
         retrain_teacher: bool) -> None:
    """The main job on the embedded default: build the demo pool, then `run` on it.

    The demo home gets the demo's scoring settings (``curation.json``, unless one is there) and
    recipes; the teacher trains on the demo's clean reference split.
    """
    layout = project_layout(home)
    if not storage.is_local(layout.home):
        raise click.UsageError("the demo builds its pool on local disk: give a local --home")
    started = time.perf_counter()
    click.echo(f"project home: {layout.home}")
    build_demo_pool_into(Path(layout.demo), shards, samples_per_shard, pool_seed, workers, reuse=True)
    click.echo(f"demo pool in {layout.demo} ({time.perf_counter() - started:.1f} s)")
    settings = Path(layout.settings_file)
    if not settings.exists():
        settings.write_text(json.dumps(DEMO_SETTINGS, indent=2) + "\n")
    elif layout.settings() != DEMO_SETTINGS:
        click.echo(f"using the settings in {settings} (not the demo's: delete it for those)")
    _install_demo_recipes(layout.recipes)
    _run_main_job(layout, pool=layout.demo_split("pool"), teacher={"train_on": layout.demo_split("reference")},
                  scoring={}, recipes=None, retrain_teacher=retrain_teacher, started=started)


@main.command("run", epilog=example("run --pool s3://bucket/pool --train-on s3://bucket/reference "
                                    "--home ./curation_home"))
@click.option("--pool", "pool_uri", required=True, help=f"The pool's shards ({ANY_URL}).")
@click.option("--home", default=None, help=HOME_HELP)
@teacher_options
@click.option("--train-on", default=None,
              help="Trusted split (shards) the platform trains its teacher on; default: the pool itself.")
@click.option("--min-recall", "min_recall_at_5", type=click.FloatRange(min=0, max=1), default=None,
              help="Teacher quality bar: held-out R@5 each way (default 0.3).")
@click.option("--teacher-gate", type=click.Choice(["block", "warn"]), default=None,
              help="What a teacher below the bar does: block embedding (default) or only warn.")
@training_options
@click.option("--target", "target_uri", default=None, help=f"NormSim target images or shards ({ANY_URL}).")
@click.option("--prompt", "prompts", multiple=True, help="Domain prompt for importance weights (repeatable).")
@click.option("--recipes", "recipes_dir", default=None, type=click.Path(file_okay=False),
              help="Release recipes (default <home>/recipes).")
@click.option("--retrain-teacher", is_flag=True, help="Train the teacher again even if one is materialised.")
def run_command(pool_uri: str, home: str | None, teacher_checkpoint: str | None, arch: str | None,
                pretrained: str | None, train_on: str | None, min_recall_at_5: float | None,
                teacher_gate: str | None, epochs: int | None, precision: str, threads: int | None,
                max_seconds: float | None, target_uri: str | None, prompts: tuple[str, ...],
                recipes_dir: str | None, retrain_teacher: bool) -> None:
    """The main job on your own pool: every shard through the whole asset graph, in this process.

    Registers the pool's shards as partitions, then runs teacher (trained on --train-on, or the pool;
    or --teacher / --arch --pretrained) and its quality gate, ingestion, embeddings, reference, target,
    scores, statistics and one release per recipe, as Dagster runs with every data-quality check.
    Settings in <home>/curation.json apply; options given here override them for this run and are
    never written back.
    """
    if train_on and (teacher_checkpoint or pretrained):
        raise click.UsageError("--train-on trains the platform's own teacher: leave out --teacher / --pretrained")
    if teacher_checkpoint or pretrained:
        teacher_spec(teacher_checkpoint, arch, pretrained)  # refuses a bad combination before anything runs
    training = training_overrides(epochs, precision, threads, max_seconds)
    given = {"checkpoint": teacher_checkpoint, "architecture": arch, "pretrained": pretrained, "train_on": train_on,
             "min_recall_at_5": min_recall_at_5, "gate": teacher_gate,
             "max_training_seconds": training.pop("max_seconds", None), **training}
    teacher = {name: value for name, value in given.items() if value is not None}
    scoring = {name: value for name, value in (("target_uri", target_uri), ("prompts", list(prompts) or None))
               if value is not None}
    _run_main_job(project_layout(home), pool=pool_uri, teacher=teacher, scoring=scoring, recipes=recipes_dir,
                  retrain_teacher=retrain_teacher, started=time.perf_counter())


def _run_main_job(layout: ProjectLayout, *, pool: str, teacher: dict, scoring: dict, recipes: str | None,
                  retrain_teacher: bool, started: float) -> None:
    """``run`` and ``demo``: the graph in-process, one line per run, then releases and how to open the UI."""
    from curation_platform_dagster.local_run import instance_for, main_job_definitions, materialize_graph

    with TrainingBar() as training_progress:
        defs = main_job_definitions(layout.home, pool=pool, teacher=teacher, scoring=scoring, recipes=recipes,
                                    training_progress=training_progress)
        instance = instance_for(layout)
        click.echo(f"running the asset graph in-process on {pool} (Dagster instance: {instance.root_directory})")
        outcomes = materialize_graph(instance, defs, on_step=_print_step, retrain_teacher=retrain_teacher)
    failed = [outcome for outcome in outcomes if not outcome.success]
    click.echo(f"\ndone in {time.perf_counter() - started:.1f} s: {len(outcomes)} runs, {len(failed)} failed.")
    gate = next((check for outcome in outcomes for name, check in outcome.checks.items()
                 if name.endswith("teacher_beats_the_bar")), None)
    if gate:
        click.echo(f"teacher {'passed' if gate['passed'] else 'FAILED'} its quality gate: {gate['description']}")
    statistics = next((o.materialized["score_statistics"] for o in outcomes if "score_statistics" in o.materialized),
                      None)
    if statistics:
        click.echo(f"scores of {statistics['dagster/row_count']} samples; plots and summary in {layout.analysis}")
    duplicates = next((o.materialized["duplicate_groups"] for o in outcomes if "duplicate_groups" in o.materialized),
                      None)
    if duplicates:
        click.echo(f"duplicates (near: eps {duplicates['eps']}, decontamination: eps {duplicates['decontamination_eps']}"
                   f"):\n{duplicates['groups']}\n{duplicates['share_of_pool_in_groups']:.1%} of the pool in some group; "
                   f"evaluation copies flagged: {duplicates['contaminated'] or 'none'}")
    evaluated = []
    for outcome in outcomes:
        for asset, metadata in outcome.materialized.items():
            if asset.startswith("release_") and "release_id" in metadata:
                _echo_release(metadata)
            if asset.startswith("evaluation_") and "evaluation_id" in metadata:
                evaluated.append(metadata)
    if evaluated:
        _echo_evaluations(evaluated)
    click.echo(f"\nNext: `{_ui_command(layout, instance, defs)}` opens the asset graph with these runs.")
    if failed:
        click.echo(f"FAILED: {failed[0].error}", err=True)
        sys.exit(1)


def _ui_command(layout: ProjectLayout, instance, defs) -> str:
    """``dagster dev`` with the environment that makes the code location see this run's settings."""
    platform, teacher = defs.resources["platform"], defs.resources["teacher_config"]
    env = {"DAGSTER_HOME": instance.root_directory, "CURATION_HOME": layout.home, "CURATION_POOL": platform.pool,
           "CURATION_TEACHER": teacher.checkpoint, "CURATION_TEACHER_ARCH": teacher.architecture,
           "CURATION_TEACHER_PRETRAINED": teacher.pretrained, "CURATION_TEACHER_TRAIN_ON": teacher.train_on,
           "CURATION_TARGET": defs.resources["scoring"].target_uri, "CURATION_RECIPES": platform.recipes_uri}
    return " ".join(f"{name}={value}" for name, value in env.items() if value) + " dagster dev -w workspace.yaml"


def _install_demo_recipes(folder: Path) -> None:
    """Copy the packaged demo recipes into the home (an edited recipe of the same name is kept)."""
    from importlib.resources import files

    folder.mkdir(parents=True, exist_ok=True)
    for recipe in sorted(files("curation_platform.releases").joinpath("demo_recipes").iterdir(),
                         key=lambda item: item.name):
        target = folder / recipe.name
        if recipe.name.endswith(".toml") and not target.exists():
            target.write_text(recipe.read_text())


def _echo_release(metadata: dict) -> None:
    manifest = json.loads(Path(metadata["manifest"]).read_text())
    click.echo(f"\nrelease {manifest['release_id']}: {manifest['selected']:,} of {manifest['pool_rows']:,} samples "
               f"in {Path(metadata['manifest']).parent} (report: report/report.md)")
    echo_funnel(manifest)


def _echo_evaluations(evaluated: list[dict]) -> None:
    """Each evaluation's verdicts, then the leaderboard of every evaluated release."""
    for metadata in evaluated:
        click.echo(f"\nevaluation {metadata['evaluation_id']} ({metadata['scale']} scale, seeds {metadata['seeds']}, "
                   f"{metadata['samples_seen']:,} samples seen per run):")
        for arm, metrics in sorted(metadata["arms"].items(), key=lambda item: ARM_ORDER.index(item[0])):
            click.echo(f"  {arm:<8} " + ", ".join(f"{name} {value}" for name, value in metrics.items()))
        for comparison, verdict in metadata["verdicts"].items():
            click.echo(f"  vs {comparison}: {verdict}")
        for metric in metadata["at_chance"]:
            click.echo(f"  WARNING: every arm scores {metric} near chance: this scale cannot rank them on it", err=True)
    leaderboard = evaluated[-1]["leaderboard"]
    click.echo(f"\nleaderboard ({leaderboard}):\n{storage.read_bytes(leaderboard).decode().rstrip()}")


STEP_FACTS = {  # what the main job prints per materialisation, when present
    "teacher_id": "teacher {}", "i2t_recall_at_5": "held-out i2t R@5 {:.3f}", "dagster/row_count": "{} rows",
    "pairs_per_second": "{:.0f} pairs/s", "reference_id": "{}", "target_id": "{}", "shards": "{} shards",
    "evaluation_id": "{}", "recipes_resolved": "{} recipes resolved",
}


def _print_step(outcome) -> None:
    where = f"[{outcome.partition}]" if outcome.partition else ""
    facts = []
    for asset, metadata in sorted(outcome.materialized.items()):
        shown = [template.format(metadata[name]) for name, template in STEP_FACTS.items()
                 if metadata.get(name) is not None and not (asset != "teacher" and name == "teacher_id")]
        facts.append(f"{asset}: {', '.join(shown)}")
    if outcome.failed_checks:
        facts.append("failed blocking checks: " + ", ".join(outcome.failed_checks))
    status = "ok" if outcome.success else "FAILED"
    click.echo(f"  {status:6} {'+'.join(outcome.assets)}{where} ({outcome.seconds:.1f} s)  " + "; ".join(facts))
    if outcome.error:
        click.echo(f"         {outcome.error}")
    reference = outcome.materialized.get("reference_sample")
    if reference and reference["dagster/row_count"] < reference["requested_size"]:
        warn(f"the reference holds N = {reference['dagster/row_count']:,} pairs, not reference_size "
             f"{reference['requested_size']:,}: the pool has only {reference['pool_rows']:,} embedded pairs")
