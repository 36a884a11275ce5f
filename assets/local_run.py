"""The main job: the whole asset graph over every shard, executed in this process.

Steps run in lineage order (teacher; per shard ingestion and embeddings; reference sample and
NormSim target; per shard scores; pool statistics; one release per recipe), each as a Dagster run recorded in the
instance, so ``dagster dev -w workspace.yaml`` afterwards shows the same history, checks and
metadata. A blocking check that fails skips what depends on it and is reported, not hidden.
"""

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from assets.definitions import build_definitions
from assets.ingestion import shard_partitions

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class StepOutcome:
    assets: tuple[str, ...]
    partition: str | None
    success: bool
    seconds: float
    materialized: dict[str, dict] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)


def instance_for(home: Path) -> dg.DagsterInstance:
    """The persistent instance of the project: ``$DAGSTER_HOME``, else ``<home>/dagster`` (SQLite)."""
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():  # the embedded default: SQLite storage in this folder, nothing phoned home
        config.write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.get()


def materialize_graph(instance: dg.DagsterInstance, defs: dg.Definitions | None = None,
                      on_step: Callable[[StepOutcome], None] | None = None,
                      retrain_teacher: bool = False) -> list[StepOutcome]:
    """Discover the pool's shards, add their partitions and materialise every asset with its checks.

    An already materialised teacher is kept unless ``retrain_teacher`` (training is the slow step and
    deterministic, so it would reproduce the same teacher_id).
    """
    defs = defs or build_definitions()
    platform = defs.resources["platform"]
    keys = [shard.partition_key for shard in platform.discover()]
    new_keys = [key for key in keys if not instance.has_dynamic_partition(shard_partitions.name, key)]
    if new_keys:
        instance.add_dynamic_partitions(shard_partitions.name, new_keys)
    outcomes: list[StepOutcome] = []
    skipped: set[str] = set()

    def step(assets: Sequence[str], partition: str | None = None) -> None:
        if partition in skipped:
            return
        outcome = _execute(defs, instance, assets, partition)
        outcomes.append(outcome)
        if on_step:
            on_step(outcome)
        if not outcome.success:
            if partition is None:
                raise dg.DagsterError(f"{', '.join(assets)} failed: {outcome.failed_checks or 'see the run logs'}")
            skipped.add(partition)

    if retrain_teacher or instance.get_latest_materialization_event(dg.AssetKey("teacher")) is None:
        step(["teacher"])
    for key in keys:
        step(["validated_samples", "embeddings"], key)
    step(["reference_sample", "normsim_target"])
    for key in keys:
        step(["shard_scores"], key)
    step(["score_statistics"])
    releases = sorted(key.to_user_string() for key in defs.resolve_all_asset_keys()
                      if key.to_user_string().startswith("release_"))
    for release in releases:
        step([release])
    return outcomes


def _execute(defs: dg.Definitions, instance: dg.DagsterInstance, assets: Sequence[str],
             partition: str | None) -> StepOutcome:
    started = time.perf_counter()
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks], selection=list(assets), partition_key=partition, instance=instance,
        resources=defs.resources, run_config=QUIET, raise_on_error=False,
        tags={"curation/main_job": "true"},
    )
    materialized = {
        event.asset_key.to_user_string(): {name: value.value for name, value in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }
    failed = [f"{evaluation.asset_check_key.to_user_string()}"
              for evaluation in result.get_asset_check_evaluations()
              if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR]
    return StepOutcome(tuple(assets), partition, result.success and not failed and len(materialized) == len(assets),
                       time.perf_counter() - started, materialized, failed)
