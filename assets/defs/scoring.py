"""Density-ratio scores: the global reference sample and NormSim target, per-shard scores, pool statistics.

Every shard is scored against the reference sample and target recorded by the latest materialisation
of ``reference_sample`` and ``normsim_target``; these are drawn once and refreshed only on request,
so a new shard is scored without rescoring the pool. Re-materialising either makes every shard's
scores stale (their data versions change) and automation rescores them.
"""

import time
from dataclasses import replace

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.quality import scores_suite, statistics_suite
from curation_platform.scoring.pipeline import (
    REFERENCE_TABLE,
    SCORE_VERSION,
    TARGET_TABLE,
    PromptColumnError,
    load_set,
    prompt_column,
    save_set,
    score_schema,
)
from curation_platform.scoring.run import (
    add_prompt_columns,
    draw_pool_reference,
    embed_target,
    read_scores,
    score_shard,
    scoring_context,
)
from curation_platform.scoring.statistics import analyse_pool, summary_uri
from curation_platform.teachers import load_teacher
from curation_platform_dagster.defs.automation import on_statistics_cron, once_available, per_shard
from curation_platform_dagster.defs.embeddings import embeddings
from curation_platform_dagster.defs.evaluation import IN_MAIN_JOB
from curation_platform_dagster.defs.metadata import png_metadata
from curation_platform_dagster.defs.ingestion import shard_partitions
from curation_platform_dagster.defs.quality import check_result
from curation_platform_dagster.defs.resources import PlatformResource, ScoringResource, TeacherResource
from curation_platform_dagster.defs.sources import target_split
from curation_platform_dagster.defs.teachers import latest_metadata, teacher, teacher_id_of

ALL_SHARDS = dg.AllPartitionMapping()


@dg.asset(
    deps=[dg.AssetDep(embeddings, partition_mapping=ALL_SHARDS), teacher],
    group_name="scoring",
    code_version="reference-v1",
    kinds={"lancedb"},
    automation_condition=once_available(),
    description="N (image, text) pairs drawn uniformly from the whole pool's embeddings with a recorded seed: "
                "the marginals every density ratio is estimated against.",
)
def reference_sample(context: dg.AssetExecutionContext, platform: PlatformResource,
                     teacher_config: TeacherResource, scoring: ScoringResource) -> dg.MaterializeResult:
    teacher_id = teacher_id_of(context)
    reference = draw_pool_reference(teacher_id, platform.lancedb_uri, scoring.reference_size,
                                    scoring.reference_seed, teacher_config.table, platform.s3)
    version = save_set(platform.lancedb_uri, REFERENCE_TABLE, reference, platform.s3)
    context.log.info(f"reference {reference.set_id}: {reference.size} of {reference.description['pool_rows']} pairs")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(reference.set_id),
        metadata={
            "reference_id": reference.set_id,
            "teacher_id": teacher_id,
            "dagster/row_count": reference.size,
            "pool_rows": reference.description["pool_rows"],
            "seed": scoring.reference_seed,
            "requested_size": scoring.reference_size,
            "lancedb_table": f"{platform.lancedb_uri}/{REFERENCE_TABLE}",
            "lancedb_version": version,
        },
    )


@dg.asset(
    deps=[teacher, target_split],
    group_name="scoring",
    code_version="target-v1",
    kinds={"lancedb", "pytorch"},
    automation_condition=once_available(),
    description="Image embeddings of the NormSim target (downstream-task images); none when no target is set.",
)
def normsim_target(context: dg.AssetExecutionContext, platform: PlatformResource,
                   teacher_config: TeacherResource, scoring: ScoringResource) -> dg.MaterializeResult:
    target_uri = scoring.target(platform)
    if target_uri is None:
        context.log.warning("no NormSim target configured: norm_sim_2 and norm_sim_inf will be NaN")
        return dg.MaterializeResult(data_version=dg.DataVersion("none"), metadata={"target_id": None})
    config = teacher_config.embed_config()
    loaded = load_teacher(teacher_config.spec(platform), device=config.resolved_device(), s3=platform.s3)
    target = embed_target(loaded, target_uri, replace(config, workers=0), platform.s3)
    version = save_set(platform.lancedb_uri, TARGET_TABLE, target, platform.s3)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(target.set_id),
        metadata={
            "target_id": target.set_id,
            "teacher_id": loaded.teacher_id,
            "source": target_uri,
            "dagster/row_count": target.size,
            "lancedb_table": f"{platform.lancedb_uri}/{TARGET_TABLE}",
            "lancedb_version": version,
        },
    )


@dg.asset(
    partitions_def=shard_partitions,
    deps=[embeddings, dg.AssetDep(reference_sample, partition_mapping=ALL_SHARDS),
          dg.AssetDep(normsim_target, partition_mapping=ALL_SHARDS)],
    group_name="scoring",
    code_version=f"scores-v{SCORE_VERSION}",
    kinds={"lancedb"},
    automation_condition=per_shard(),
    description="Every score of SCORES.md for a shard's samples, plus a log importance weight per domain prompt.",
)
def shard_scores(context: dg.AssetExecutionContext, platform: PlatformResource,
                 teacher_config: TeacherResource, scoring: ScoringResource) -> dg.MaterializeResult:
    shard = platform.recorded_shard(context.partition_key)
    loaded = load_teacher(teacher_config.spec(platform), s3=platform.s3)  # prompts need its text tower
    reference_id = latest_metadata(context, reference_sample, "reference_id")
    reference = load_set(platform.lancedb_uri, REFERENCE_TABLE, reference_id, platform.s3)
    target_id = latest_metadata(context, normsim_target, "target_id")
    target = load_set(platform.lancedb_uri, TARGET_TABLE, target_id, platform.s3) if target_id else None
    try:
        scoring_ctx = scoring_context(loaded, scoring.params(), reference, target)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    started = time.perf_counter()
    result = score_shard(scoring_ctx, platform.lancedb_uri, shard.name, teacher_config.table, platform.s3)
    seconds = time.perf_counter() - started
    described = scoring_ctx.describe()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{shard.checksum[:16]}-{reference.set_id}-{target_id}-v{SCORE_VERSION}"),
        metadata={
            "teacher_id": loaded.teacher_id,
            "dagster/row_count": result.rows,
            "reference_id": reference.set_id,
            "target_id": target_id,
            "score_version": SCORE_VERSION,
            "params": dg.MetadataValue.json(described["params"]),
            "neg_clip_batch_size_effective": described["neg_clip_batch_size_effective"],
            "seconds": dg.MetadataValue.float(seconds),
            "samples_per_second": dg.MetadataValue.float(result.rows / max(seconds, 1e-9)),
            "dagster/column_schema": dg.TableSchema(columns=[
                dg.TableColumn(field.name, str(field.type)) for field in score_schema(scoring.prompts)]),
            "lancedb_table": f"{platform.lancedb_uri}/scores",
            "lancedb_version": result.version,
        },
    )


@dg.asset(
    deps=[shard_scores],
    partitions_def=shard_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),  # one run fills many shards with one teacher load
    group_name="scoring",
    code_version="prompt-weights-v1",
    kinds={"lancedb"},
    tags={IN_MAIN_JOB: "false"},  # the main job scores with every configured prompt already
    description="The importance weight column iw_<prompt> of every configured domain prompt, added to an already "
                "scored shard without rescoring it: adding a prompt to the scoring settings fills just that "
                "column (a dot product per sample with the stored image embeddings). Launch a backfill of the "
                "prompt_weights job after adding a prompt; new shards get every prompt from shard_scores.",
)
def shard_prompt_weights(context: dg.AssetExecutionContext, platform: PlatformResource,
                         teacher_config: TeacherResource, scoring: ScoringResource) -> dg.MaterializeResult:
    shards = [platform.recorded_shard(key).name for key in context.partition_keys]
    if not scoring.prompts:
        return dg.MaterializeResult(metadata={"prompts": dg.MetadataValue.json([]), "rows_written": 0,
                                              "shards": dg.MetadataValue.json(shards)})
    loaded = load_teacher(teacher_config.spec(platform), s3=platform.s3)  # the prompts need its text tower
    try:
        added = add_prompt_columns(platform.lancedb_uri, loaded, scoring.prompts, platform.s3, shards,
                                   importance_scale=scoring.importance_scale, table=teacher_config.table)
    except PromptColumnError as error:
        raise dg.Failure(str(error)) from error
    if added["missing_embeddings"]:
        context.log.warning(f"{added['missing_embeddings']} score rows have no stored image embedding: their "
                            "prompt weights stay empty until the shard is embedded again")
    return dg.MaterializeResult(metadata={
        "teacher_id": added["teacher_id"],
        "prompts": dg.MetadataValue.json(list(scoring.prompts)),
        "prompt_columns": dg.MetadataValue.json(added["columns"]),
        "shards": dg.MetadataValue.json(shards),
        "shards_written": added["shards_written"],
        "rows_written": added["rows_written"],
        "missing_embeddings": added["missing_embeddings"],
        "lancedb_version": added["version"],
    })


@dg.asset_check(asset=shard_scores, partitions_def=shard_partitions, blocking=True,
                description="One score row per sample (unique uids), and every score within its mathematical range "
                            "(SCORES.md): the KL scores between 0 and log N for a reference of N pairs, the reverse "
                            "KL scores and NormSim_2 non-negative, CLIPScore and NormSim_inf in [-1, 1], every prompt "
                            "weight finite (NormSim empty without a target). A score out of range means a broken "
                            "teacher, reference or target.")
def scores_meet_expectations(context: dg.AssetCheckExecutionContext, platform: PlatformResource,
                             scoring: ScoringResource) -> dg.AssetCheckResult:
    shard = platform.recorded_shard(context.partition_key)
    teacher_id = teacher_id_of(context)
    rows = read_scores(platform.lancedb_uri, teacher_id, platform.s3, shard=shard.name)
    reference_size = latest_metadata(context, reference_sample, "dagster/row_count")
    target_id = latest_metadata(context, normsim_target, "target_id")
    return check_result(scores_suite(rows, int(reference_size), target_id is not None,
                                     [prompt_column(prompt) for prompt in scoring.prompts]))


def _markdown_table(frame: pl.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * frame.width]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


@dg.asset(
    deps=[dg.AssetDep(shard_scores, partition_mapping=ALL_SHARDS),
          dg.AssetDep(shard_prompt_weights, partition_mapping=ALL_SHARDS), reference_sample],
    group_name="statistics",
    code_version="statistics-v1",
    kinds={"polars", "matplotlib"},
    automation_condition=on_statistics_cron(),
    description="Pool-wide score summary, histograms, correlations and KL-decile n-gram coverage (SCORES.md s. 7).",
)
def score_statistics(context: dg.AssetExecutionContext, platform: PlatformResource,
                     scoring: ScoringResource) -> dg.MaterializeResult:
    teacher_id = teacher_id_of(context)
    analysis = analyse_pool(platform.lancedb_uri, teacher_id, platform.analysis_uri,
                            validated_uri=platform.validated_uri,
                            shards=context.instance.get_dynamic_partitions(shard_partitions.name),
                            max_rows=scoring.statistics_max_rows, s3=platform.s3)
    return dg.MaterializeResult(
        metadata={
            "teacher_id": teacher_id,
            "dagster/row_count": analysis.pool_rows,
            "rows_analysed": analysis.rows_analysed,
            "sample": analysis.describe_sample(scoring.statistics_max_rows),
            "shards": analysis.shards,
            "reference_ids": dg.MetadataValue.json(analysis.reference_ids),
            "summary": dg.MetadataValue.md(_markdown_table(analysis.summary)),
            "analysis_uri": dg.MetadataValue.path(platform.analysis_uri),
            **{name: png_metadata(name, png) for name, png in analysis.plots.items()},
        },
    )


@dg.asset_check(asset=score_statistics, blocking=True,
                description="The pool's score summary has every score with at least one value and no NaN, a "
                            "non-negative spread and minimum <= mean <= maximum: the statistics page and release "
                            "reports are drawn from it.")
def statistics_are_sane(platform: PlatformResource) -> dg.AssetCheckResult:
    filesystem, path = storage.filesystem_for(summary_uri(platform.analysis_uri), platform.s3)
    return check_result(statistics_suite(pq.read_table(path, filesystem=filesystem)))
