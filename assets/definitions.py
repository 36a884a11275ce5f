"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

from __future__ import annotations

import dagster as dg

from assets.embeddings import embeddings, embeddings_are_complete_and_unit_norm
from assets.ingestion import shard_discovery_sensor, shard_reconciles, validated_samples
from assets.resources import PlatformResource, TeacherResource
from assets.teachers import teacher

defs = dg.Definitions(
    assets=[validated_samples, teacher, embeddings],
    asset_checks=[shard_reconciles, embeddings_are_complete_and_unit_norm],
    sensors=[shard_discovery_sensor],
    resources={"platform": PlatformResource(), "teacher_config": TeacherResource()},
)
