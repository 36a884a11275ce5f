"""The crafted hostile shard through worker processes: every sample accounted for, right reason codes per key, no
crash, no escape, outputs written. Each single-shard hostile case (and this shard, ingested in process) is in the
hostile corpus: tests/helpers/hostile_corpus.py, run by tests/test_hostile_corpus.py."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation_platform.ingest import ingest_shard, make_executor, write_ingestion
from curation_platform.pool import discover_shards
from curation_platform.reasons import Reason
from tests.helpers.shards import LIMITS, UID, hostile_shard

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


def test_hostile_shard_is_fully_accounted_by_worker_processes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    pool = hostile_shard(work / "pool")
    monkeypatch.chdir(work)
    before = set(tmp_path.rglob("*"))
    (shard,) = discover_shards(str(pool))

    executor = make_executor(2)  # in process (workers=0): the corpus case kitchen_sink
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
