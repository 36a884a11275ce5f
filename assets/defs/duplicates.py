"""Duplicates and evaluation-set contamination: per-shard pairs, pool-wide groups (LanceDB tables).

The per-shard step adds the shard to the exact index (its own hash file), queries the pool's vector
index for the shard's near duplicates and compares it with the evaluation sets; only the shard's rows
are read. The pool-wide ``duplicate_groups`` joins the pairs into groups without reading embeddings.
"""

import json

import dagster as dg
import polars as pl

from curation_platform import lance_tables
from curation_platform.dedup import ExactDuplicateIndex
from curation_platform.dedup.contamination import EVALUATION_TABLE, copies_in_shard, embed_evaluation_set
from curation_platform.dedup.index import ensure_vector_index, near_matches, shard_image_embeddings
from curation_platform.dedup.plots import group_size_histogram, largest_groups, largest_groups_grid, sample_images
from curation_platform.dedup.tables import (
    CONTAMINATION_TABLE,
    GROUPS_TABLE,
    PAIRS_TABLE,
    build_groups,
    write_groups,
    write_shard_pairs,
)
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE
from curation_platform.ingest import read_accepted
from curation_platform.quality import duplicate_groups_suite
from curation_platform.scoring.pipeline import load_set, save_set
from curation_platform.teachers import load_teacher
from curation_platform_dagster.defs.automation import on_statistics_cron, once_available, per_shard
from curation_platform_dagster.defs.embeddings import embeddings
from curation_platform_dagster.defs.ingestion import shard_partitions
from curation_platform_dagster.defs.metadata import png_metadata
from curation_platform_dagster.defs.quality import check_result
from curation_platform_dagster.defs.resources import DuplicatesResource, PlatformResource, TeacherResource
from curation_platform_dagster.defs.scoring import ALL_SHARDS
from curation_platform_dagster.defs.sources import evaluation_sets
from curation_platform_dagster.defs.teachers import latest_metadata, teacher, teacher_id_of

NEAR_SHARE_WARNING = 0.5  # above this share of the pool in near groups, the teacher or eps is suspect


@dg.asset(
    deps=[teacher, evaluation_sets],
    group_name="duplicates",
    code_version="evaluation-sets-v1",
    kinds={"lancedb", "pytorch"},
    automation_condition=once_available(),
    description="The teacher's image embeddings of every registered evaluation set: what decontamination "
                "compares the pool against.",
)
def eval_set_embeddings(context: dg.AssetExecutionContext, platform: PlatformResource,
                              teacher_config: TeacherResource, duplicates: DuplicatesResource) -> dg.MaterializeResult:
    sets = duplicates.sets(platform)
    if not sets:
        context.log.warning("no evaluation sets registered: nothing will be flagged as contaminated")
        return dg.MaterializeResult(data_version=dg.DataVersion("none"), metadata={"set_ids": dg.MetadataValue.json({})})
    config = teacher_config.embed_config()
    loaded = load_teacher(teacher_config.spec(platform), device=config.resolved_device(), s3=platform.s3)
    set_ids, sizes, version = {}, {}, None
    for evaluation in sets:
        embedded = embed_evaluation_set(loaded, evaluation, config, platform.s3)
        version = save_set(platform.lancedb_uri, EVALUATION_TABLE, embedded, platform.s3)
        set_ids[evaluation.name], sizes[evaluation.name] = embedded.set_id, embedded.size
    return dg.MaterializeResult(
        data_version=dg.DataVersion("-".join(sorted(set_ids.values()))),
        metadata={"teacher_id": loaded.teacher_id, "set_ids": dg.MetadataValue.json(set_ids),
                  "images": dg.MetadataValue.json(sizes), "dagster/row_count": sum(sizes.values()),
                  "sources": dg.MetadataValue.json({item.name: item.uri for item in sets}),
                  "lancedb_table": f"{platform.lancedb_uri}/{EVALUATION_TABLE}", "lancedb_version": version},
    )


@dg.asset(
    deps=[dg.AssetDep(embeddings, partition_mapping=ALL_SHARDS)],
    group_name="duplicates",
    code_version="image-index-v1",
    kinds={"lancedb"},
    automation_condition=on_statistics_cron(),
    description="LanceDB's cosine vector index (IVF_PQ by default) on the image embeddings: created once the "
                "table is large enough, then extended with new rows (no retraining); unchanged when nothing is "
                "new. Queries search rows added since exactly, so no result waits for it: it only makes them fast.",
)
def image_index(platform: PlatformResource, duplicates: DuplicatesResource) -> dg.MaterializeResult:
    state = ensure_vector_index(platform.lancedb_uri, duplicates.search(), platform.s3)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{state.indexed_rows}-{state.unindexed_rows}"),
        metadata={"action": state.action, "indexed_rows": state.indexed_rows,
                  "unindexed_rows (searched exactly)": state.unindexed_rows, "partitions": state.partitions,
                  "search": dg.MetadataValue.json(duplicates.search().describe())},
    )


@dg.asset(
    partitions_def=shard_partitions,
    deps=[embeddings, eval_set_embeddings],
    group_name="duplicates",
    code_version="duplicate-pairs-v1",
    kinds={"lancedb"},
    automation_condition=per_shard(),
    description="A shard's exact-duplicate hashes, its near duplicates anywhere in the pool (index queries) "
                "and its near copies of evaluation images.",
)
def duplicate_pairs(context: dg.AssetExecutionContext, platform: PlatformResource,
                    duplicates: DuplicatesResource) -> dg.MaterializeResult:
    shard = platform.recorded_shard(context.partition_key)
    teacher_id = teacher_id_of(context)
    samples = read_accepted(platform.validated_uri, shard, platform.s3)
    exact = ExactDuplicateIndex(platform.layout.exact_duplicates, platform.s3)
    repeats = exact.duplicates_of(shard.name, samples)
    exact.add_shard(shard.name, samples)
    search = duplicates.search()
    near = near_matches(platform.lancedb_uri, teacher_id, shard.name, search, platform.s3)
    set_ids = latest_metadata(context, eval_set_embeddings, "set_ids") or {}
    sets = [load_set(platform.lancedb_uri, EVALUATION_TABLE, set_id, platform.s3) for set_id in set_ids.values()]
    uids, images = shard_image_embeddings(platform.lancedb_uri, teacher_id, shard.name, platform.s3)
    copies = copies_in_shard(uids, images, sets, duplicates.contamination_eps)
    version = write_shard_pairs(platform.lancedb_uri, teacher_id, shard.name, near.pairs, copies, search.eps,
                                platform.s3, duplicates.contamination_eps)
    if near.saturated:
        context.log.warning(f"{near.saturated} queries returned {search.neighbours} neighbours, the limit: "
                            "raise duplicates.neighbours to find every copy of their samples")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{shard.checksum[:16]}-{teacher_id}-{search.eps}-{duplicates.contamination_eps}-"
                                    f"{'-'.join(set_ids.values())}"),
        metadata={
            "teacher_id": teacher_id, "eps": search.eps, "decontamination_eps": duplicates.contamination_eps,
            "exact_repeats_of_other_shards": repeats.height,
            "near_pairs": near.pairs.height,
            "evaluation_copies": dg.MetadataValue.json(dict(copies.group_by("eval_set").len().iter_rows())),
            "rows_read": near.rows_read, "index_queries": near.queries, "candidates": near.candidates,
            "saturated_queries": near.saturated,
            "lancedb_table": f"{platform.lancedb_uri}/{PAIRS_TABLE}", "lancedb_version": version,
        },
    )


@dg.asset(
    deps=[dg.AssetDep(duplicate_pairs, partition_mapping=ALL_SHARDS)],
    group_name="duplicates",
    code_version="duplicate-groups-v1",
    kinds={"lancedb", "polars"},
    automation_condition=on_statistics_cron(),
    description="Duplicate groups of the pool (exact image, exact caption, near) and its evaluation-set "
                "contamination flags, as LanceDB tables releases pin.",
)
def duplicate_groups(context: dg.AssetExecutionContext, platform: PlatformResource,
                     duplicates: DuplicatesResource) -> dg.MaterializeResult:
    teacher_id = teacher_id_of(context)
    exact = ExactDuplicateIndex(platform.layout.exact_duplicates, platform.s3)
    groups = build_groups(exact, platform.lancedb_uri, teacher_id, duplicates.eps, platform.s3,
                          duplicates.contamination_eps)
    versions = write_groups(platform.lancedb_uri, teacher_id, groups, platform.s3)
    pool_rows = lance_tables.connect(platform.lancedb_uri, platform.s3).open_table(EMBEDDINGS_TABLE).count_rows(
        f"teacher_id = {lance_tables.sql_string(teacher_id)}")
    summary = groups.summary(pool_rows)
    shown = groups.groups.join(largest_groups(groups.groups, 6).select("kind", "group_id"), on=["kind", "group_id"])
    images, captions = sample_images(platform.validated_uri, platform.pool, shown["uid"].unique().to_list(),
                                     platform.s3)
    per_kind = "\n".join(["| kind | groups | members | share of pool | removable |", "| --- | ---: | ---: | ---: | ---: |"]
                         + [f"| {kind} | {row['groups']:,} | {row['members']:,} | {row['pool_share']:.1%} | "
                            f"{row['removable']:,} |" for kind, row in summary["kinds"].items()])
    context.log.info(f"duplicate groups: {json.dumps(summary['kinds'])}; contaminated: {summary['contaminated']}")
    near_share = summary["kinds"]["near"]["pool_share"]
    if near_share > NEAR_SHARE_WARNING:
        context.log.warning(f"{near_share:.0%} of the pool are near duplicates at eps {duplicates.eps}: the teacher "
                            "cannot tell these images apart (or eps is too large); a dedup stage would drop "
                            "most of the pool")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{versions[GROUPS_TABLE]}-{versions[CONTAMINATION_TABLE]}"),
        metadata={
            "teacher_id": teacher_id, "eps": duplicates.eps, "decontamination_eps": duplicates.contamination_eps,
            "dagster/row_count": groups.groups.height,
            "groups": dg.MetadataValue.md(per_kind),
            "share_of_pool_in_groups": dg.MetadataValue.float(summary["in_any_group_share"]),
            "contaminated": dg.MetadataValue.json(summary["contaminated"]),
            "group_sizes": png_metadata("group sizes", group_size_histogram(groups.groups)),
            "largest_groups": png_metadata("largest groups", largest_groups_grid(groups.groups, images, captions)),
            "lancedb_tables": dg.MetadataValue.json({name: {"uri": f"{platform.lancedb_uri}/{name}", "version": number}
                                                     for name, number in versions.items()}),
        },
    )


@dg.asset_check(asset=duplicate_groups, blocking=True,
                description="Every member of a duplicate group has an embedding from the current teacher, no sample is in "
                            "two groups of the same kind, every group has at least two members and every "
                            "similarity is a valid cosine: releases drop duplicates by these groups.")
def duplicate_groups_are_consistent(context: dg.AssetCheckExecutionContext,
                                    platform: PlatformResource) -> dg.AssetCheckResult:
    teacher_id = teacher_id_of(context)
    database = lance_tables.connect(platform.lancedb_uri, platform.s3)
    condition = f"teacher_id = {lance_tables.sql_string(teacher_id)}"
    groups = database.open_table(GROUPS_TABLE).to_lance().to_table(columns=["uid", "kind", "group_id", "similarity"],
                                                                  filter=condition)
    embedded = database.open_table(EMBEDDINGS_TABLE).to_lance().to_table(columns=["uid"], filter=condition)
    members = pl.from_arrow(groups.select(["uid"])).unique()
    return check_result(duplicate_groups_suite(groups, embedded.column("uid").combine_chunks()),
                        teacher_id=teacher_id, members=members.height)
