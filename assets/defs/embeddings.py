"""Teacher embeddings per shard, in LanceDB, on the ``gpu`` concurrency pool."""

import dagster as dg

from curation_platform.embedding.engine import embed_shard
from curation_platform.embedding.sinks import LanceSink, embedding_schema
from curation_platform.ingest import read_accepted
from curation_platform.pool import tar_unchanged
from curation_platform.quality import embeddings_suite
from curation_platform.teachers import load_teacher
from curation_platform_dagster.defs.automation import per_shard
from curation_platform_dagster.defs.ingestion import shard_partitions, validated_samples
from curation_platform_dagster.defs.quality import check_result
from curation_platform_dagster.defs.resources import PlatformResource, TeacherResource
from curation_platform_dagster.defs.teachers import embed_dim_of, require_passed_gate, teacher, teacher_id_of


@dg.asset(
    partitions_def=shard_partitions,
    deps=[validated_samples, teacher],
    group_name="embedding",
    code_version="embed-v1",
    pool="gpu",
    kinds={"lancedb", "pytorch"},
    automation_condition=per_shard(),
    description="Unit-norm image and text embeddings of a shard's accepted samples, tagged with the teacher_id.",
)
def embeddings(context: dg.AssetExecutionContext, platform: PlatformResource,
               teacher_config: TeacherResource) -> dg.MaterializeResult:
    shard = platform.recorded_shard(context.partition_key)
    if not tar_unchanged(shard, platform.s3):
        raise dg.Failure(f"shard {shard.name}'s tar changed since it was ingested: re-ingest it first (the "
                         "discovery sensor requests that)")
    samples = read_accepted(platform.validated_uri, shard, platform.s3)
    config = teacher_config.embed_config()
    loaded = load_teacher(teacher_config.spec(platform), device=config.resolved_device(), s3=platform.s3)
    require_passed_gate(context, teacher_config, loaded.teacher_id)
    sink = LanceSink(platform.lancedb_uri, table=teacher_config.table, s3=platform.s3)
    report = embed_shard(loaded, shard, samples, sink, config, platform.s3)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{shard.checksum[:16]}-{loaded.teacher_id}"),
        metadata={
            "teacher_id": loaded.teacher_id,
            "rows": report.commit.rows,
            "refused_rows": report.commit.refused,
            "dagster/row_count": report.commit.rows,
            "device": report.device,
            "seconds": dg.MetadataValue.float(report.seconds),
            "pairs_per_second": dg.MetadataValue.float(report.pairs_per_second),
            "lancedb_table": f"{platform.lancedb_uri}/{teacher_config.table}",
            "lancedb_version": report.commit.version if report.commit else None,
            "embed_dim": loaded.embed_dim,
            "dagster/column_schema": dg.TableSchema(columns=[
                dg.TableColumn(field.name, str(field.type)) for field in embedding_schema(loaded.embed_dim)]),
        },
    )


@dg.asset_check(asset=embeddings, partitions_def=shard_partitions, blocking=True,
                description="Exactly one image and one text embedding per accepted sample of the shard, each finite, "
                            "of unit length and of the teacher's dimension: scores computed from anything else "
                            "would be meaningless, so the shard is not scored.")
def embeddings_meet_expectations(context: dg.AssetCheckExecutionContext, platform: PlatformResource,
                                 teacher_config: TeacherResource) -> dg.AssetCheckResult:
    shard = platform.recorded_shard(context.partition_key)
    samples = read_accepted(platform.validated_uri, shard, platform.s3)
    teacher_id, embed_dim = teacher_id_of(context), embed_dim_of(context)
    sink = LanceSink(platform.lancedb_uri, table=teacher_config.table, s3=platform.s3)
    rows = sink.read_shard(shard.name, teacher_id, embed_dim, columns=["uid", "image_embedding", "text_embedding"])
    return check_result(embeddings_suite(rows, samples.column("uid").to_pylist(), embed_dim), teacher_id=teacher_id)
