"""Pool-wide accounting (issue 15): a uid in two shards is kept once, a failing shard does not stop the
pool, a failed download whose members are present is counted, and commands report what they committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curation_platform import ingest
from curation_platform.cli import main
from curation_platform.embedding.sinks import LanceSink, record_batch
from curation_platform.ingest import ingest_pool, ingest_shard, write_ingestion
from curation_platform.layout import ShardOutputs
from curation_platform.pool import discover_shards
from curation_platform.uid_registry import LanceUidRegistry, MemoryUidRegistry
from tests.helpers.shards import LIMITS, ShardBuilder, jpeg_bytes

SHARED = "5" * 32


def _two_shards_sharing_a_uid(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    ShardBuilder("00000").sample("a0", "a red circle", uid="a" * 32).sample("a1", "the shared one", uid=SHARED) \
        .write(pool)
    ShardBuilder("00001").sample("b0", "the shared one again", uid=SHARED).sample("b1", "a blue square",
                                                                                  uid="b" * 32).write(pool)
    return pool


def _by_shard(pool: Path, registry, names: list[str] | None = None) -> dict[str, ingest.ShardIngestion]:
    shards = [shard for shard in discover_shards(str(pool)) if names is None or shard.name in names]
    return {item.report.shard: item for item in ingest_pool(shards, limits=LIMITS, registry=registry)}


def test_a_uid_in_two_shards_is_kept_by_the_first_name(tmp_path: Path) -> None:
    results = _by_shard(_two_shards_sharing_a_uid(tmp_path), MemoryUidRegistry())
    first, second = results["00000"], results["00001"]
    assert first.report.accepted == 2 and not first.report.by_reason
    assert second.report.accepted == 1 and second.report.by_reason == {"cross_shard_duplicate": 1}
    (row,) = second.quarantine.to_pylist()
    assert row["uid"] == SHARED and "shard 00000" in row["detail"] and row["members"] == ["b0.jpg", "b0.txt", "b0.json"]
    assert second.report.accepted + second.report.quarantined == second.report.total == 2


def test_the_owner_does_not_depend_on_ingestion_order(tmp_path: Path) -> None:
    """The later-named shard ingested first keeps the uid until the owner arrives, which names it;
    re-ingesting it then quarantines its copy. Re-runs are idempotent."""
    pool = _two_shards_sharing_a_uid(tmp_path)
    registry = LanceUidRegistry(ShardOutputs.uid_registry(str(tmp_path / "validated")))
    early = _by_shard(pool, registry, ["00001"])["00001"]
    assert early.report.accepted == 2
    owner = _by_shard(pool, registry, ["00000"])["00000"]
    assert owner.report.accepted == 2 and owner.report.displaced == {"00001": 1}
    assert any("re-ingest" in warning and "00001" in warning for warning in owner.report.warnings)
    again = _by_shard(pool, registry, ["00001"])["00001"]
    assert again.report.by_reason == {"cross_shard_duplicate": 1}
    settled = _by_shard(pool, registry, ["00000"])["00000"]
    assert settled.report.displaced == {} and not settled.report.warnings
    assert _by_shard(pool, registry, ["00001"])["00001"].quarantine.equals(again.quarantine)


def test_cli_ingest_quarantines_the_second_copy(tmp_path: Path) -> None:
    pool = _two_shards_sharing_a_uid(tmp_path)
    out = tmp_path / "validated"
    result = CliRunner().invoke(main, ["ingest", str(pool), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "cross_shard_duplicate=1" in result.output
    assert (out / "uids").is_dir()


def test_an_unexpected_error_in_one_shard_does_not_stop_the_pool(tmp_path: Path, monkeypatch) -> None:
    pool = _two_shards_sharing_a_uid(tmp_path)
    original = ingest.check_content

    def broken(image, caption, limits):
        if caption == b"a red circle":  # a sample of shard 00000
            raise RuntimeError("a reader bug")
        return original(image, caption, limits)

    monkeypatch.setattr(ingest, "check_content", broken)
    results = _by_shard(pool, MemoryUidRegistry())
    failed = results["00000"].report
    assert failed.errors == ["ingestion failed: RuntimeError: a reader bug"] and failed.total == 0
    assert results["00001"].report.accepted == 2  # nothing of the failed shard was registered
    paths = write_ingestion(results["00000"], str(tmp_path / "validated"))
    assert Path(paths["report"]).exists()


def test_a_failed_download_with_members_present_is_kept_and_counted(tmp_path: Path) -> None:
    pool = ShardBuilder().sample("k0", "present although the parquet says failed", status="failed_to_download") \
        .sample("k1", "an ordinary sample").write(tmp_path / "pool")
    (shard,) = discover_shards(str(pool))
    report = ingest_shard(shard, limits=LIMITS).report
    assert report.accepted == 2
    (warning,) = report.warnings
    assert warning.startswith("1 samples have members in the tar although their parquet/json status is not 'success'")


def test_a_status_that_is_not_a_string_is_invalid_metadata(tmp_path: Path) -> None:
    builder = ShardBuilder().file("k1.jpg", jpeg_bytes()).file("k1.txt", b"a caption").file("k1.json", b'{"status": 0}')
    pool = builder.write(tmp_path / "pool")
    (pool / "00000.parquet").unlink()  # json only, as some img2dataset outputs are
    (shard,) = discover_shards(str(pool))
    ingestion = ingest_shard(shard, limits=LIMITS)
    assert ingestion.report.by_reason == {"invalid_metadata": 1}
    assert ingestion.quarantine.column("detail").to_pylist() == ["status is int, expected a string"]


@pytest.mark.parametrize("overlap", [0, 1])
def test_embed_reports_the_rows_it_committed(tmp_path: Path, overlap: int) -> None:
    """A staged row whose uid another shard's rows hold is refused by the table and counted as such."""
    sink = LanceSink(str(tmp_path / "lance"))
    vectors = np.eye(4, dtype=np.float32)[:3]
    with sink.shard_writer("00000", "teacher", 4) as writer:
        writer.write(record_batch(["a" * 32, "b" * 32, "c" * 32], "teacher", "00000", vectors, vectors))
    uids = ["c" * 32 if overlap else "d" * 32, "e" * 32, "f" * 32]
    with sink.shard_writer("00001", "teacher", 4) as writer:
        writer.write(record_batch(uids, "teacher", "00001", vectors, vectors))
    assert sink.last_commit.rows == 3 - overlap and sink.last_commit.refused == overlap
