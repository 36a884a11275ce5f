"""Reading a pool from a real S3 server gives exactly what reading it from disk gives."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation_platform.ingest import ingest_pool, write_ingestion
from curation_platform.pool import discover_shards
from curation_platform.storage import S3Settings
from tests.helpers.s3 import upload_directory
from tests.helpers.shards import LIMITS, hostile_shard

pytestmark = pytest.mark.s3


def _ingest_all(pool_uri: str, s3: S3Settings | None) -> dict[str, tuple]:
    shards = discover_shards(pool_uri, s3=s3)
    results = {}
    for ingestion in ingest_pool(shards, s3=s3, limits=LIMITS, workers=0):
        results[ingestion.report.shard] = (
            ingestion.report.shard_id,
            ingestion.accepted.to_pylist(),
            ingestion.quarantine.sort_by("uid").to_pylist(),
        )
    return results


def test_s3_pool_matches_local_pool(tmp_path: Path, s3_server: S3Settings, demo_pool_dir: Path) -> None:
    pool = demo_pool_dir / "pool"
    hostile_shard(pool_with_hostile := tmp_path / "pool")
    for shard_file in pool.glob("0000[01]*"):
        (pool_with_hostile / shard_file.name.replace("0000", "1000", 1)).write_bytes(shard_file.read_bytes())

    uri = upload_directory(s3_server, pool_with_hostile, "pools/mixed")
    local = _ingest_all(str(pool_with_hostile), None)
    remote = _ingest_all(uri, s3_server)

    assert sorted(local) == ["00000", "10000", "10001"]
    assert remote == local  # same shard ids (content checksums), same accepted rows, same quarantine


def test_ingestion_writes_outputs_to_s3(tmp_path: Path, s3_server: S3Settings) -> None:
    uri = upload_directory(s3_server, hostile_shard(tmp_path / "pool"), "pools/hostile")
    out = "s3://curation-test/validated/hostile"
    (ingestion,) = ingest_pool(discover_shards(uri, s3=s3_server), s3=s3_server, limits=LIMITS)
    paths = write_ingestion(ingestion, out, s3=s3_server)
    filesystem = s3_server.pyarrow_filesystem()
    stored = pq.read_table(paths["quarantine"].removeprefix("s3://"), filesystem=filesystem)
    assert stored.equals(ingestion.quarantine)
