"""The code location loads, the sensor partitions the pool, a shard partition materialises."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from curation_platform_dagster.defs.ingestion import (
    shard_discovery_sensor,
    shard_partitions,
    shard_reconciles,
    validated_samples,
)
from curation_platform_dagster.defs.resources import PlatformResource


def test_sensor_and_partition_materialisation(tmp_path: Path, demo_pool_dir: Path) -> None:
    pool = tmp_path / "pool"
    shutil.copytree(demo_pool_dir / "pool", pool)
    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(pool), decode_workers=0)
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))

    def evaluate(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"platform": platform})
        return shard_discovery_sensor(context)

    first = evaluate(None)
    assert [request.partition_key for request in first.run_requests] == ["00000", "00001"]
    (add_request,) = first.dynamic_partitions_requests
    instance.add_dynamic_partitions(shard_partitions.name, list(add_request.partition_keys))

    result = dg.materialize([validated_samples, shard_reconciles], partition_key="00001", instance=instance,
                            resources={"platform": platform})
    assert result.success
    metadata = result.asset_materializations_for_node("validated_samples")[0].metadata
    assert metadata["accepted"].value + metadata["quarantined"].value == metadata["total"].value > 0
    (check,) = result.get_asset_check_evaluations()
    assert check.passed

    assert evaluate(first.cursor).run_requests == []  # nothing new, nothing re-run
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(pool / f"00001{suffix}", pool / f"00002{suffix}")
    third = evaluate(first.cursor)
    assert [request.partition_key for request in third.run_requests] == ["00002"]
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["00002"]


def test_teacher_and_embedding_partition_materialise(tmp_path: Path, demo_pool_dir: Path) -> None:
    from curation_platform_dagster.defs.embeddings import embeddings, embeddings_meet_expectations
    from curation_platform_dagster.defs.resources import TeacherResource
    from curation_platform_dagster.defs.teachers import no_progress, teacher
    from tests.helpers.teachers import tiny_teacher_dir

    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(demo_pool_dir / "pool"),
                                decode_workers=0)
    teacher_config = TeacherResource(checkpoint=str(tiny_teacher_dir(tmp_path / "teacher")), device="cpu",
                                     workers=0, batch_size=64, gate="warn")  # random weights: see test_teacher_gate
    resources = {"platform": platform, "teacher_config": teacher_config, "training_progress": no_progress}
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    instance.add_dynamic_partitions(shard_partitions.name, ["00000"])

    assert dg.materialize([teacher], instance=instance, resources=resources).success
    result = dg.materialize([validated_samples, embeddings, embeddings_meet_expectations, teacher],
                            selection=[validated_samples, embeddings], partition_key="00000",
                            instance=instance, resources=resources)
    assert result.success
    metadata = result.asset_materializations_for_node("embeddings")[0].metadata
    accepted = result.asset_materializations_for_node("validated_samples")[0].metadata["accepted"].value
    assert metadata["rows"].value == accepted
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["rows"].value == accepted


def test_production_profile_refuses_local_locations(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CURATION_PROFILE", "production")
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    instance.add_dynamic_partitions(shard_partitions.name, ["00000"])
    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(tmp_path / "pool"))
    result = dg.materialize([validated_samples], partition_key="00000", instance=instance,
                            resources={"platform": platform}, raise_on_error=False)
    assert not result.success
    failure = result.all_events[-1].event_specific_data.error.to_string()
    assert "CURATION_PROFILE=production needs remote locations" in failure
