"""Ingestion assets: one dynamic partition per shard, validated samples plus quarantine."""

import json

import dagster as dg
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.ingest import ingest_shard, make_executor, write_ingestion
from curation_platform.layout import ShardOutputs
from curation_platform.pool import HASHED
from curation_platform.quality import quarantine_suite, validated_samples_suite
from curation_platform.uid_registry import LanceUidRegistry
from curation_platform_dagster.defs.quality import check_result
from curation_platform_dagster.defs.resources import PlatformResource
from curation_platform_dagster.defs.sources import raw_pool, shard_partitions

SHARD_PIPELINE = "shard_pipeline"  # the job the discovery sensor launches ingestion runs through


@dg.asset(
    partitions_def=shard_partitions,
    deps=[raw_pool],
    group_name="ingestion",
    code_version="ingest-v1",
    kinds={"parquet"},
    description="Accepted samples (with metadata) and quarantined samples (with reason codes) of one shard.",
)
def validated_samples(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    before = HASHED.reading()
    shard = platform.shard(context.partition_key)  # only here and in the sensor; later steps read the report
    hashed = HASHED.reading() - before
    executor = make_executor(platform.decode_workers)
    try:
        registry = LanceUidRegistry(ShardOutputs.uid_registry(platform.validated_uri), platform.s3)
        ingestion = ingest_shard(shard, s3=platform.s3, limits=platform.limits, executor=executor, registry=registry)
    finally:
        if executor is not None:
            executor.shutdown()
    paths = write_ingestion(ingestion, platform.validated_uri, s3=platform.s3)
    report = ingestion.report
    return dg.MaterializeResult(
        data_version=dg.DataVersion(shard.checksum),
        metadata={
            "shard_id": report.shard_id,
            "total": report.total,
            "accepted": report.accepted,
            "quarantined": report.quarantined,
            "quarantine_rate": dg.MetadataValue.float(report.quarantine_rate),
            "by_reason": dg.MetadataValue.json(report.by_reason),
            "shard_errors": dg.MetadataValue.json(report.errors),
            "warnings": dg.MetadataValue.json(report.warnings),
            "seconds": dg.MetadataValue.float(report.seconds),
            "hashes_computed": hashed.files,  # 0 when the checksum cache knew the shard's files
            "bytes_hashed": hashed.bytes_read,
            "tar_bytes_read": report.bytes_read,
            "samples_per_second": dg.MetadataValue.float(report.total / max(report.seconds, 1e-9)),
            "samples_path": dg.MetadataValue.path(paths["samples"]),
            "quarantine_path": dg.MetadataValue.path(paths["quarantine"]),
            "dagster/row_count": report.accepted,
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(field.name, str(field.type)) for field in ingestion.accepted.schema]
            ),
        },
    )


def _report(platform: PlatformResource, partition_key: str) -> dict:
    """The shard's ingestion report (files are named by partition key: no need to resolve the shard)."""
    return json.loads(storage.read_bytes(platform.layout.shard_outputs(partition_key).report, platform.s3))


def _read(uri: str, platform: PlatformResource):
    filesystem, path = storage.filesystem_for(uri, platform.s3)
    return pq.read_table(path, filesystem=filesystem)


@dg.asset_check(asset=validated_samples, partitions_def=shard_partitions, blocking=True,
                description="Every sample the shard lists is either accepted or quarantined, none lost or counted twice, "
                            "and the shard's files were read without errors: otherwise its counts cannot be "
                            "trusted and nothing downstream of it runs.")
def shard_reconciles(context: dg.AssetCheckExecutionContext, platform: PlatformResource) -> dg.AssetCheckResult:
    report = _report(platform, context.partition_key)
    reconciles = report["accepted"] + report["quarantined"] == report["total"]
    return dg.AssetCheckResult(
        passed=reconciles and not report["errors"],
        metadata={"total": report["total"], "accepted": report["accepted"],
                  "quarantined": report["quarantined"], "errors": dg.MetadataValue.json(report["errors"])},
    )


@dg.asset_check(asset=validated_samples, partitions_def=shard_partitions, blocking=True,
                description="Accepted samples have every expected column and no empty values, image sizes, caption "
                            "lengths and languages within the validation limits and unique, well-formed uids; "
                            "every quarantined sample carries a known reason. A shard that fails is not embedded.")
def samples_meet_expectations(context: dg.AssetCheckExecutionContext,
                              platform: PlatformResource) -> dg.AssetCheckResult:
    outputs = platform.layout.shard_outputs(context.partition_key)
    limits = platform.limits
    return check_result(
        validated_samples_suite(_read(outputs.samples, platform), limits.min_image_side, limits.max_pixels,
                                limits.max_caption_chars),
        quarantine_suite(_read(outputs.quarantine, platform)),
    )


@dg.asset_check(asset=validated_samples, partitions_def=shard_partitions,
                description="Warns when a shard quarantines more of its samples than the platform's "
                            "max_quarantine_rate (25% by default): a sign of a broken download or a wrong pool.")
def quarantine_rate_within_bound(context: dg.AssetCheckExecutionContext,
                                 platform: PlatformResource) -> dg.AssetCheckResult:
    report = _report(platform, context.partition_key)
    rate = report["quarantined"] / max(report["total"], 1)
    return dg.AssetCheckResult(
        passed=rate <= platform.max_quarantine_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"quarantine_rate": dg.MetadataValue.float(rate), "bound": platform.max_quarantine_rate,
                  "by_reason": dg.MetadataValue.json(report.get("by_reason", {}))},
    )


@dg.asset_check(asset=validated_samples, partitions_def=shard_partitions,
                description="Each sample is kept by one shard only: a copy of a uid that a shard with an earlier "
                            "name also holds is quarantined as cross_shard_duplicate. Warns when a later shard "
                            "kept copies of this shard's samples (re-ingest that shard).")
def uids_kept_once(context: dg.AssetCheckExecutionContext, platform: PlatformResource) -> dg.AssetCheckResult:
    report = _report(platform, context.partition_key)
    displaced = report.get("displaced", {})
    return dg.AssetCheckResult(
        passed=not displaced,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"cross_shard_duplicates": report["by_reason"].get("cross_shard_duplicate", 0),
                  "later_shards_holding_copies": dg.MetadataValue.json(displaced)},
    )


def _ingested_version(instance: dg.DagsterInstance, partition_key: str) -> str | None:
    """The data version (shard checksum) of the partition's latest validated_samples materialisation."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=validated_samples.key, asset_partitions=[partition_key]), limit=1).records
    return records[0].asset_materialization.tags.get("dagster/data_version") if records else None


@dg.sensor(job_name=SHARD_PIPELINE, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def shard_discovery_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult:
    """Add a partition per new shard and request ingestion of every new or changed shard (a ``shard_pipeline``
    run of ``validated_samples`` alone: the teacher or the reference may not exist yet).

    The cursor maps partition key -> content checksum already handled; a shard it does not know is
    looked up in the instance first, so shards ingested by other means (the main job, a backfill)
    are not ingested again. A re-uploaded shard (same name, new bytes) is re-run; ``run_key`` =
    shard id makes requests idempotent. Embeddings and scores follow by declarative automation.
    """
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    shards = platform.discover()
    existing = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    new_keys = [shard.partition_key for shard in shards if shard.partition_key not in existing]
    changed = [
        shard for shard in shards
        if known.get(shard.partition_key) != shard.checksum
        and _ingested_version(context.instance, shard.partition_key) != shard.checksum
    ]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=shard.partition_key, run_key=shard.shard_id,
                                    asset_selection=[validated_samples.key]) for shard in changed],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({shard.partition_key: shard.checksum for shard in shards}, sort_keys=True),
    )
