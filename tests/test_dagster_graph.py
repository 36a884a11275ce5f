"""The whole asset graph: its sources, jobs and checks, then on a small demo pool: row counts, checks,
blocking, incremental automation."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from curation_platform.evaluation import scales
from curation_platform.evaluation.benchmark_sets import build_demo_benchmarks
from curation_platform.scoring.pipeline import prompt_column
from curation_platform_dagster.definitions import build_definitions, defs
from curation_platform_dagster.defs.automation import once_available
from curation_platform_dagster.defs.ingestion import shard_discovery_sensor, shard_partitions
from curation_platform_dagster.defs.metadata import INLINE_MARKDOWN_CHARS, UI_IMAGE_WIDTH, bar_chart_markdown
from curation_platform_dagster.defs.resources import (
    EvaluationResource,
    PlatformResource,
    ScoringResource,
    TeacherResource,
)
from curation_platform_dagster.defs.sources import raw_pool
from curation_platform_dagster.local_run import materialize_graph
from tests.helpers.demo import build_small_demo_pool
from tests.helpers.teachers import TINY_STUDENT, tiny_teacher_dir

PER_SHARD = ("validated_samples", "embeddings", "shard_scores", "duplicate_pairs")
GLOBAL = ("teacher", "reference_sample", "normsim_target", "score_statistics", "eval_set_embeddings",
          "image_index", "duplicate_groups")
PROMPT = "a photo of a geometric shape"
RECIPE = 'name = "clip-top"\n[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n'
SOURCES = {"raw_pool": {"validated_samples"}, "reference_split": {"teacher"}, "target_split": {"normsim_target"},
           "evaluation_sets": {"eval_set_embeddings"}, "benchmarks": {"evaluation_clip_top"}}
JOBS = {"shard_pipeline", "prompt_weights", "teacher_and_references", "pool_statistics", "releases", "evaluations"}
RELEASE_CHECKS = {"release_verifies", "funnel_reconciles", "size_within_bounds"}
CLASS_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z0-9]+)+")  # GreatExpectations, ExpectColumnValuesToBeBetween
SCORE_NAMES = {"NormSim"}  # a score's name (SCORES.md), not code


def test_definitions_validate() -> None:
    loaded = defs()  # built when loaded, not when the module is imported
    dg.Definitions.validate_loadable(loaded)
    keys = {key.to_user_string() for key in loaded.resolve_all_asset_keys()}
    assert set(PER_SHARD + GLOBAL) <= keys
    checks = {key.name for key in loaded.resolve_asset_graph().asset_check_keys}
    assert {"shard_reconciles", "samples_meet_expectations", "embeddings_meet_expectations",
            "scores_meet_expectations", "statistics_are_sane", "quarantine_rate_within_bound", "uids_kept_once",
            "duplicate_groups_are_consistent"} <= checks


def _located(tmp_path: Path) -> dg.Definitions:
    """The graph of a home with one recipe and a NormSim target (nothing but the recipe is read)."""
    recipes = tmp_path / "home" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "clip.toml").write_text(RECIPE)
    (tmp_path / "target").mkdir()
    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(tmp_path / "pool"))
    return build_definitions({}, {"platform": platform, "scoring": ScoringResource(target_uri=str(tmp_path / "target"))})


def test_lineage_starts_at_the_external_sources(tmp_path: Path) -> None:
    graph = _located(tmp_path).resolve_asset_graph()
    for source, readers in SOURCES.items():
        node = graph.get(dg.AssetKey(source))
        assert node.is_external and not node.is_materializable and node.description and node.kinds
        assert {key.to_user_string() for key in node.child_keys} == readers, source
    pool = graph.get(raw_pool.key)
    assert pool.partitions_def == graph.get(dg.AssetKey("validated_samples")).partitions_def, "shard by shard"
    assert pool.metadata["uri"].value == str(tmp_path / "pool")
    assert graph.get(dg.AssetKey("reference_split")).metadata["uri"].value == str(tmp_path / "pool"), "no trusted split"
    assert graph.get(dg.AssetKey("target_split")).metadata["uri"].value == str(tmp_path / "target")


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # raised inside Dagster's own condition tester
def test_automation_does_not_wait_for_external_sources() -> None:
    @dg.asset(partitions_def=shard_partitions, deps=[raw_pool], automation_condition=once_available())
    def reads_the_pool() -> None: ...

    toy = dg.Definitions(assets=[raw_pool, reads_the_pool])
    instance = dg.DagsterInstance.ephemeral()
    first = dg.evaluate_automation_conditions(toy, instance)
    instance.add_dynamic_partitions(shard_partitions.name, ["00000"])
    second = dg.evaluate_automation_conditions(toy, instance, cursor=first.cursor)
    assert second.get_requested_partitions(reads_the_pool.key) == {"00000"}, "Dagster never records the pool"


def test_every_run_goes_through_a_named_job(tmp_path: Path) -> None:
    loaded = _located(tmp_path)
    assert {job.name for job in loaded.jobs} == JOBS
    owners: dict[str, list[str]] = {}
    for name in JOBS:
        for key in loaded.resolve_job_def(name).asset_layer.selected_asset_keys:
            owners.setdefault(key.to_user_string(), []).append(name)
    materializable = {key.to_user_string() for key in loaded.resolve_asset_graph().materializable_asset_keys}
    assert set(owners) == materializable and all(len(jobs) == 1 for jobs in owners.values()), owners
    # Declarative automation launches Dagster's own asset job, which the UI lists by the assets it ran.
    launching = [sensor for sensor in loaded.sensors if not isinstance(sensor, dg.AutomationConditionSensorDefinition)]
    assert launching and all(sensor.job_name in JOBS for sensor in launching)
    assert all(schedule.job_name in JOBS for schedule in loaded.schedules or [])


def test_checks_speak_the_users_language(tmp_path: Path) -> None:
    graph = _located(tmp_path).resolve_asset_graph()
    assert {key.name for key in graph.asset_check_keys if key.asset_key == dg.AssetKey("release_clip_top")} \
        == RELEASE_CHECKS
    for key in graph.asset_check_keys:
        description = graph.get_check_spec(key).description or ""
        assert description and "Great Expectations" not in description, key.to_user_string()
        assert set(CLASS_NAME.findall(description)) <= SCORE_NAMES, (key.to_user_string(), description)


def _graph(tmp_path: Path, demo_pool_dir: Path) -> tuple[dg.Definitions, Path]:
    pool = tmp_path / "pool"
    shutil.copytree(demo_pool_dir / "pool", pool)
    # A shard whose tar is cut short: ingestion accounts for it, the blocking check stops it there.
    (pool / "00001.tar").write_bytes((demo_pool_dir / "pool" / "00001.tar").read_bytes()[:20_000])
    shutil.copy(demo_pool_dir / "pool" / "00001.parquet", pool / "00001.parquet")
    recipes = tmp_path / "home" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "clip.toml").write_text(RECIPE)
    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(pool), decode_workers=0)
    # Random weights: the quality gate only warns here (test_teacher_gate covers blocking).
    teacher_config = TeacherResource(checkpoint=str(tiny_teacher_dir(tmp_path / "teacher")), device="cpu",
                                     workers=0, batch_size=64, gate="warn")
    scoring = ScoringResource(reference_size=100, neg_clip_batch_size=64, neg_clip_repeats=3, prompts=[PROMPT],
                              target_uri=str(demo_pool_dir / "target"))
    return build_definitions({}, {"platform": platform, "teacher_config": teacher_config, "scoring": scoring}), pool


def _new_shard(pool: Path, name: str, scratch: Path) -> None:
    """A shard with new samples (another seed of the demo generator) dropped into the pool."""
    build_small_demo_pool(scratch, shards=1, samples_per_shard=60, seed=11, reference_samples=10, target_samples=10,
                          eval_samples=10)
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(scratch / "pool" / f"00000{suffix}", pool / f"{name}{suffix}")


def _materialised(instance: dg.DagsterInstance, asset: str) -> dict[str | None, int]:
    """Materialisations per partition of an asset."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
    counts: dict[str | None, int] = {}
    for record in records:
        counts[record.partition_key] = counts.get(record.partition_key, 0) + 1
    return counts


def _execute_requests(graph: dg.Definitions, instance: dg.DagsterInstance,
                      result: dg.EvaluateAutomationConditionsResult) -> set[tuple[str, str | None]]:
    """Run what the automation requested, as the daemon would (one run per partition)."""
    by_partition: dict[str | None, list[str]] = {}
    for asset in PER_SHARD + GLOBAL:
        for partition in result.get_requested_partitions(dg.AssetKey(asset)):
            by_partition.setdefault(partition, []).append(asset)
    for partition, selection in by_partition.items():
        outcome = dg.materialize([*graph.assets, *graph.asset_checks], selection=selection, partition_key=partition,
                                 instance=instance, resources=graph.resources)
        assert outcome.success
    return {(asset, partition) for partition, selection in by_partition.items() for asset in selection}


def test_whole_graph_then_only_the_new_shard(tmp_path: Path, demo_pool_dir: Path, monkeypatch) -> None:
    graph, pool = _graph(tmp_path, demo_pool_dir)
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    outcomes = materialize_graph(instance, graph, retrain_teacher=True)

    by_step = {(outcome.assets, outcome.partition): outcome for outcome in outcomes}
    gate = by_step[(("teacher",), None)].checks["teacher:teacher_beats_the_bar"]
    assert not gate["passed"] and gate["severity"] == "WARN" and gate["metadata"]["evidence"] == "evaluated"
    assert gate["metadata"]["split"] == str(pool)  # no trusted split configured: judged on the pool's held-out slice
    broken = by_step[(("validated_samples", "embeddings"), "00001")]
    assert not broken.success and "validated_samples:shard_reconciles" in broken.failed_checks
    assert set(broken.materialized) == {"validated_samples"}, "a failing blocking check skips the embeddings"
    assert (("shard_scores",), "00001") not in by_step
    good = by_step[(("validated_samples", "embeddings"), "00000")]
    accepted = good.materialized["validated_samples"]["accepted"]
    assert good.success and good.materialized["embeddings"]["dagster/row_count"] == accepted > 100
    scores = by_step[(("duplicate_pairs", "shard_scores"), "00000")]
    assert scores.success and scores.materialized["shard_scores"]["dagster/row_count"] == accepted
    pairs = scores.materialized["duplicate_pairs"]
    assert pairs["rows_read"] == accepted <= pairs["index_queries"], "only the shard's own rows are read"
    pool_wide = by_step[(("duplicate_groups", "score_statistics"), None)]
    assert pool_wide.checks["duplicate_groups:duplicate_groups_are_consistent"]["passed"]
    assert "data:image/png;base64," in pool_wide.materialized["duplicate_groups"]["group_sizes"]
    statistics = pool_wide.materialized["score_statistics"]
    assert statistics["dagster/row_count"] == accepted and statistics["shards"] == 1
    assert "kl_text_coverage_png" in statistics and "data:image/png;base64," in statistics["score_histograms_png"]
    reference = by_step[(("eval_set_embeddings", "normsim_target", "reference_sample"), None)].materialized
    assert by_step[(("image_index",), None)].success, "one wave, one run per job"
    runs = instance.get_run_records()
    assert {record.dagster_run.job_name for record in runs} == \
        {"teacher_and_references", "shard_pipeline", "pool_statistics", "releases"}, "the runs say what they did"
    assert reference["reference_sample"]["dagster/row_count"] == 100
    assert reference["normsim_target"]["dagster/row_count"] > 0
    # The release passes: a plan, per shard the candidates and the selections, the cut-offs in between.
    plan = by_step[(("release_plan",), None)].materialized["release_plan"]
    assert plan["shards"] == 1 and plan["dagster/row_count"] == accepted and plan["older_plans_removed"] == 0
    candidates = by_step[(("release_candidates",), "00000")].materialized["release_candidates"]
    assert candidates["dagster/row_count"] == accepted and candidates["shard_indexes"] == [0]
    assert (("release_candidates",), "00001") not in by_step, "a shard stopped at ingestion has no passes"
    cuts = by_step[(("release_cuts",), None)].materialized["release_cuts"]
    assert cuts["plan_id"] == plan["plan_id"] and "clip_score descending, up to key" in cuts["cuts"]
    selections = by_step[(("release_selections",), "00000")].materialized["release_selections"]
    assert selections["selected_per_recipe"] == {"clip-top": accepted // 2}
    release = by_step[(("release_clip_top",), None)].materialized["release_clip_top"]
    assert release["dagster/row_count"] == accepted // 2 and Path(release["manifest"]).exists()
    assert release["funnel"].startswith(f"- **{accepted:,}** pool") and len(release["funnel"]) < 1000, "drawn inline"
    chart = base64.b64decode(release["funnel_chart"].split("data:image/svg+xml;base64,")[1].rstrip(")")).decode()
    assert len(release["funnel_chart"]) < INLINE_MARKDOWN_CHARS and f">{accepted // 2:,} top_fraction clip_score<" in chart
    assert release["plan_id"] == plan["plan_id"] and set(Path(plan["folder"]).parent.iterdir()) == {Path(plan["folder"])}
    for figure in ("funnel_png", "score_histograms_png"):  # the report inline, sized for the asset page
        encoded = release[figure].split("data:image/png;base64,")[1].rstrip(")")
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).width <= UI_IMAGE_WIDTH
    assert release["preview"].startswith("| uid | shard | key |") and release["preview"].count("\n") == 11
    evaluations = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [key for key in graph.resolve_asset_graph().asset_check_keys])
    assert evaluations, "check executions are recorded"
    assert ("evaluation_clip_top",) not in {assets for assets, _ in by_step}, "evaluations run on request only"

    # The release's evaluation (on request): students on the release and its random baseline, a record.
    monkeypatch.setitem(scales.SCALES, "demo", TINY_STUDENT)
    build_demo_benchmarks(demo_pool_dir, tmp_path / "benchmarks")
    evaluation = EvaluationResource(seeds=1, baselines=["random"], benchmarks_uri=str(tmp_path / "benchmarks" / "wds"),
                                    device="cpu")
    evaluated = dg.materialize([*graph.assets], selection=["evaluation_clip_top"], instance=instance,
                               resources={**graph.resources, "evaluation": evaluation})
    metadata = evaluated.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["release_id"].value == release["release_id"] and metadata["samples_seen"].value == 64
    assert set(metadata["arms"].value) == {"release", "random"} and Path(metadata["leaderboard"].value).exists()
    assert graph.resolve_asset_graph().get(dg.AssetKey("evaluation_clip_top")).pools == {"gpu"}

    # Nothing is out of date: the automation requests nothing.
    start = dt.datetime.now(dt.UTC)
    idle = dg.evaluate_automation_conditions(graph, instance, evaluation_time=start)
    assert idle.total_requested == 0
    before = {asset: _materialised(instance, asset) for asset in PER_SHARD + GLOBAL}

    # A new shard arrives: the sensor adds its partition and requests its ingestion only.
    _new_shard(pool, "00002", tmp_path / "more")
    sensor = shard_discovery_sensor(dg.build_sensor_context(instance=instance, resources=graph.resources))
    assert [request.partition_key for request in sensor.run_requests] == ["00002"], "ingested shards are not re-run"
    assert sensor.run_requests[0].asset_selection == [dg.AssetKey("validated_samples")], "ingestion only"
    instance.add_dynamic_partitions("shards", list(sensor.dynamic_partitions_requests[0].partition_keys))
    assert dg.materialize([*graph.assets, *graph.asset_checks], selection=["validated_samples"],
                          partition_key="00002", instance=instance, resources=graph.resources).success

    # Automation takes it from there, tick after tick; statistics wait for the hourly cron.
    executed: set[tuple[str, str | None]] = set()
    cursor = idle.cursor
    for minutes in (1, 2, 3, 61, 62):
        result = dg.evaluate_automation_conditions(graph, instance, cursor=cursor,
                                                   evaluation_time=start + dt.timedelta(minutes=minutes))
        cursor = result.cursor
        executed |= _execute_requests(graph, instance, result)
    assert executed == {("embeddings", "00002"), ("shard_scores", "00002"), ("image_index", None),
                        ("duplicate_pairs", "00002"), ("score_statistics", None), ("duplicate_groups", None)}
    after = {asset: _materialised(instance, asset) for asset in PER_SHARD + GLOBAL}
    for asset in ("teacher", "reference_sample", "normsim_target", "eval_set_embeddings"):
        assert after[asset] == before[asset], f"{asset} was recomputed"
    for asset in PER_SHARD:
        assert after[asset]["00000"] == before[asset]["00000"], f"{asset}[00000] was recomputed"
        assert after[asset]["00002"] == 1
    rows = instance.get_latest_materialization_event(dg.AssetKey("score_statistics")).asset_materialization.metadata
    assert rows["shards"].value == 2

    # A prompt added to the settings: one run of the prompt_weights job fills just its column, shard by shard.
    added = "a drawing of a landscape"
    scoring = ScoringResource(reference_size=100, neg_clip_batch_size=64, neg_clip_repeats=3, prompts=[PROMPT, added],
                              target_uri=str(demo_pool_dir / "target"))
    filled = dg.materialize([*graph.assets], selection=["shard_prompt_weights"], instance=instance,
                            resources={**graph.resources, "scoring": scoring},
                            tags={"dagster/asset_partition_range_start": "00000",
                                  "dagster/asset_partition_range_end": "00002"})
    metadata = filled.get_asset_materialization_events()[0].materialization.metadata
    assert filled.success and metadata["shards"].value == ["00000", "00001", "00002"]
    assert metadata["rows_written"].value == rows["dagster/row_count"].value, "every scored row, once"
    assert set(metadata["prompt_columns"].value) == {prompt_column(PROMPT), prompt_column(added)}


def test_a_funnel_chart_is_drawn_inline_or_not_at_all() -> None:
    stages = [("pool", 8_000_000), ("basic_filter", 6_000_000), ("decontaminate", 5_990_000), ("dedup", 5_500_000),
              ("top_fraction neg_clip_loss", 2_400_000), ("top_fraction norm_sim_inf", 1_600_000)]
    chart = bar_chart_markdown("funnel", stages)
    assert chart is not None and len(chart) < INLINE_MARKDOWN_CHARS, "six stages fit Dagster's inline limit"
    svg = base64.b64decode(chart.split("base64,")[1].rstrip(")")).decode()
    assert svg.count("<rect") == 6 and 'width="360"' in svg and "1,600,000 top_fraction norm_sim_inf" in svg
    assert bar_chart_markdown("funnel", stages * 3) is None, "too long to draw inline: left to the report"
