"""Ingestion assets: one dynamic partition per shard, validated samples plus quarantine."""

import json

import dagster as dg

from assets.resources import PlatformResource
from curation_platform import storage
from curation_platform.ingest import ingest_shard, make_executor, output_paths, write_ingestion

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")


@dg.asset(
    partitions_def=shard_partitions,
    group_name="ingestion",
    code_version="ingest-v1",
    kinds={"parquet"},
    description="Accepted samples (with metadata) and quarantined samples (with reason codes) of one shard.",
)
def validated_samples(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    shard = platform.shard(context.partition_key)
    executor = make_executor(platform.decode_workers)
    try:
        ingestion = ingest_shard(shard, s3=platform.s3, limits=platform.limits, executor=executor)
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
            "seconds": dg.MetadataValue.float(report.seconds),
            "samples_per_second": dg.MetadataValue.float(report.total / max(report.seconds, 1e-9)),
            "samples_path": dg.MetadataValue.path(paths["samples"]),
            "quarantine_path": dg.MetadataValue.path(paths["quarantine"]),
            "dagster/row_count": report.accepted,
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(field.name, str(field.type)) for field in ingestion.accepted.schema]
            ),
        },
    )


@dg.asset_check(asset=validated_samples, partitions_def=shard_partitions, blocking=True,
                description="accepted + quarantined equals every sample the shard mentions; no shard-level errors.")
def shard_reconciles(context: dg.AssetCheckExecutionContext, platform: PlatformResource) -> dg.AssetCheckResult:
    report_uri = output_paths(platform.validated_uri, platform.shard(context.partition_key).name)["report"]
    report = json.loads(storage.read_bytes(report_uri, platform.s3))
    reconciles = report["accepted"] + report["quarantined"] == report["total"]
    return dg.AssetCheckResult(
        passed=reconciles and not report["errors"],
        metadata={"total": report["total"], "accepted": report["accepted"],
                  "quarantined": report["quarantined"], "errors": dg.MetadataValue.json(report["errors"])},
    )


@dg.sensor(target=[validated_samples], minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def shard_discovery_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult:
    """Add a partition per new shard and request a run for every new or changed shard.

    The cursor maps partition key -> content checksum, so an unchanged shard is never re-run and a
    re-uploaded one (same name, new bytes) is; ``run_key`` = shard id makes requests idempotent.
    """
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    shards = platform.discover()
    existing = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    new_keys = [shard.partition_key for shard in shards if shard.partition_key not in existing]
    changed = [shard for shard in shards if known.get(shard.partition_key) != shard.checksum]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=shard.partition_key, run_key=shard.shard_id) for shard in changed],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({shard.partition_key: shard.checksum for shard in shards}, sort_keys=True),
    )
