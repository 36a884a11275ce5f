"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

from __future__ import annotations

import dagster as dg

from assets.ingestion import shard_discovery_sensor, shard_reconciles, validated_samples
from assets.resources import PlatformResource

defs = dg.Definitions(
    assets=[validated_samples],
    asset_checks=[shard_reconciles],
    sensors=[shard_discovery_sensor],
    resources={"platform": PlatformResource()},
)
