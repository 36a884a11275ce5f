"""A crafted hostile shard: every sample accounted for, right reason codes, no crash, no escape."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation_platform.ingest import ingest_shard, make_executor, write_ingestion
from curation_platform.pool import discover_shards
from curation_platform.reasons import Reason
from tests.helpers.shards import LIMITS, UID, ShardBuilder, hostile_shard, jpeg_bytes

EXPECTED_REASONS = {
    "000000001": Reason.UNSAFE_MEMBER_TYPE,
    "000000002": Reason.UNSAFE_MEMBER_TYPE,
    "000000003": Reason.UNSAFE_MEMBER_TYPE,
    "000000004": Reason.UNSAFE_MEMBER_TYPE,
    "000000005": Reason.DECOMPRESSION_BOMB,
    "000000006": Reason.UNDECODABLE_IMAGE,
    "000000007": Reason.INVALID_UTF8,
    "000000008": Reason.MISSING_MEMBER,
    "000000009": Reason.NOT_DOWNLOADED,
    "000000011": Reason.DUPLICATE_UID,
    "000000012": Reason.MISSING_PARQUET_ROW,
    "000000013": Reason.OVERSIZE_MEMBER,
    "000000014": Reason.IMAGE_TOO_SMALL,
    "000000015": Reason.MISSING_CAPTION,
    "000000016": Reason.INVALID_UID,
    "000000017": Reason.INVALID_JSON,
    "README": Reason.MALFORMED_MEMBER_NAME,
    "000000018": Reason.MISSING_IMAGE,
    "../../escaped.jpg": Reason.UNSAFE_MEMBER_PATH,
    "/tmp/absolute_escape.txt": Reason.UNSAFE_MEMBER_PATH,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_hostile_shard_is_fully_accounted(tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    pool = hostile_shard(work / "pool")
    monkeypatch.chdir(work)
    before = set(tmp_path.rglob("*"))
    (shard,) = discover_shards(str(pool))

    executor = make_executor(workers)
    try:
        ingestion = ingest_shard(shard, limits=LIMITS, executor=executor, batch_size=3)
    finally:
        if executor:
            executor.shutdown()
    paths = write_ingestion(ingestion, str(work / "out"))

    report = ingestion.report
    reasons = dict(zip(ingestion.quarantine["key"].to_pylist(), ingestion.quarantine["reason"].to_pylist()))
    accepted = ingestion.accepted["key"].to_pylist()
    assert accepted == ["000000000", "000000010", "sub/000000019"]
    assert ingestion.accepted["uid"].to_pylist()[:2] == ["a" * 32, UID]
    assert {key: reasons.get(key) for key in EXPECTED_REASONS} == EXPECTED_REASONS
    assert reasons["000000000"] == Reason.DUPLICATE_KEY  # the non-consecutive repeat of key 0
    # accounting: every key and every hostile member is one record, nothing twice or lost
    assert report.accepted + report.quarantined == report.total == len(accepted) + len(reasons)
    assert report.total == len(EXPECTED_REASONS) + 4
    assert report.parquet_rows == 19
    assert report.errors == []
    assert sum(report.by_reason.values()) == report.quarantined
    assert len(set(ingestion.quarantine["uid"].to_pylist()) | set(ingestion.accepted["uid"].to_pylist())) == report.total

    # nothing was written outside the output directory; nothing escaped from the tar
    created = set(tmp_path.rglob("*")) - before
    assert all(str(path).startswith(str(work / "out")) for path in created)
    assert not Path("/tmp/absolute_escape.txt").exists()
    assert not (tmp_path / "escaped.jpg").exists()
    assert pq.read_table(paths["quarantine"]).num_rows == report.quarantined


def test_truncated_and_garbage_tars_do_not_crash(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    b = ShardBuilder(name="00000")
    for index in range(6):
        b.sample(f"00000{index:04d}", f"sample number {index}", image=jpeg_bytes(64 + index, 64))
    b.write(pool)
    tar_path = pool / "00000.tar"
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])
    ShardBuilder(name="00001").row("000010000").row("000010001").write(pool)
    (pool / "00001.tar").write_bytes(b"this is not a tar file at all" * 50)

    first, second = discover_shards(str(pool))
    truncated = ingest_shard(first)
    assert truncated.report.total == 6 == truncated.report.accepted + truncated.report.quarantined
    assert truncated.report.errors and "tar unreadable" in truncated.report.errors[0]
    assert set(truncated.report.by_reason) <= {Reason.TRUNCATED_SHARD, Reason.MISSING_MEMBER}
    assert truncated.report.accepted >= 1

    garbage = ingest_shard(second)
    assert garbage.report.total == 2 and garbage.report.quarantined == 2
    assert garbage.report.by_reason == {Reason.MISSING_MEMBER: 2}


def test_tar_cut_between_members_is_reported(tmp_path: Path) -> None:
    """``tarfile`` reads a tar cut at a header boundary as a complete archive; ingestion must not."""
    import tarfile

    pool = tmp_path / "pool"
    b = ShardBuilder(name="00000")
    for index in range(4):
        b.sample(f"00000{index:04d}", f"sample number {index}", image=jpeg_bytes(64, 64 + index))
    b.write(pool)
    tar_path = pool / "00000.tar"
    with tarfile.open(tar_path) as archive:
        members = archive.getmembers()
    last = members[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tar_path.write_bytes(tar_path.read_bytes()[:end])  # no end-of-archive blocks

    (shard,) = discover_shards(str(pool))
    report = ingest_shard(shard).report
    assert report.errors and "no end-of-archive block" in report.errors[0]
    assert report.total == 4 == report.accepted + report.quarantined
    assert report.by_reason.get(Reason.TRUNCATED_SHARD, 0) == 1
