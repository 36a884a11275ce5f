"""External assets: the data the platform reads and never writes, so the lineage starts where the data lives.

Dagster records no materialisation of these (automation must not wait for them: :data:`EXTERNAL`);
:func:`located` adds where this deployment reads each one from, when the code location loads.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from curation_platform import storage
from curation_platform_dagster.defs.resources import (
    DuplicatesResource,
    EvaluationResource,
    PlatformResource,
    ScoringResource,
    TeacherResource,
)

GROUP = "sources"

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")

raw_pool = dg.AssetSpec(
    "raw_pool",
    partitions_def=shard_partitions,
    group_name=GROUP,
    kinds={"webdataset", "parquet"},
    description="The raw image-text pool as downloaded (a tar of images and captions plus a parquet of metadata "
                "per shard): one partition per shard, added by the shard discovery sensor.",
)
reference_split = dg.AssetSpec(
    "reference_split",
    group_name=GROUP,
    kinds={"webdataset"},
    description="Trusted image-text pairs: the platform trains its teacher on them and judges every teacher on "
                "their held-out part. Without one, the pool itself is used (and the teacher learns its noise).",
)
target_split = dg.AssetSpec(
    "target_split",
    group_name=GROUP,
    kinds={"webdataset"},
    description="Images of the downstream tasks: NormSim scores how close each pool image is to them. "
                "Without them the NormSim scores stay empty (NaN).",
)
evaluation_sets = dg.AssetSpec(
    "evaluation_sets",
    group_name=GROUP,
    kinds={"webdataset"},
    description="The evaluation sets whose images must not leak into a release: pool samples that copy one are "
                "flagged as contaminated.",
)
benchmarks = dg.AssetSpec(
    "benchmarks",
    group_name=GROUP,
    kinds={"webdataset"},
    description="The zero-shot classification and retrieval benchmarks that students trained on a release are "
                "evaluated on.",
)

SOURCES = (raw_pool, reference_split, target_split, evaluation_sets, benchmarks)
EXTERNAL = dg.AssetSelection.assets(*(spec.key for spec in SOURCES))


def _at(spec: dg.AssetSpec, uri: str) -> dg.AssetSpec:
    return spec.merge_attributes(metadata={"uri": dg.MetadataValue.path(uri)},
                                 kinds={"s3"} if storage.is_s3(uri) else set())


def located(resources: Mapping[str, Any]) -> list[dg.AssetSpec]:
    """The external assets with where this deployment reads them, resolved as the assets that read them do."""
    platform: PlatformResource = resources["platform"]
    teacher_config: TeacherResource = resources["teacher_config"]
    scoring: ScoringResource = resources["scoring"]
    duplicates: DuplicatesResource = resources["duplicates"]
    evaluation: EvaluationResource = resources["evaluation"]
    target = scoring.target(platform)
    sets = {item.name: item.uri for item in duplicates.sets(platform)}
    return [
        _at(raw_pool, platform.pool),
        _at(reference_split, teacher_config.trusted_split(platform)),
        _at(target_split, target) if target else target_split.merge_attributes(
            metadata={"uri": dg.MetadataValue.text("none configured: set scoring.target_uri or CURATION_TARGET")}),
        evaluation_sets.merge_attributes(metadata={"sets": dg.MetadataValue.json(sets)}),
        _at(benchmarks, evaluation.benchmarks_uri) if evaluation.benchmarks_uri else benchmarks.merge_attributes(
            metadata={"uri": dg.MetadataValue.text(f"none configured: the demo's eval split "
                                                   f"({platform.layout.demo_split('eval')}) when the home has one; "
                                                   "set evaluation.benchmarks_uri")}),
    ]
