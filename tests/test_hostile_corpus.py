"""The hostile shard corpus (tests/helpers/hostile_corpus.py) ingested case by case: each hostile shard gets its
expected accepted count, exactly its expected quarantine reasons and shard error, full accounting, and returns in
bounded time (issue 15)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.reasons import Reason
from tests.helpers.hostile_corpus import CASES, NOT_IN_CORPUS, HostileCase
from tests.helpers.shards import LIMITS


@pytest.mark.parametrize("hostile", CASES, ids=[hostile.name for hostile in CASES])
def test_hostile_case(hostile: HostileCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    hostile.build(pool)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a relative path a member might escape to lands here, and is checked
    (shard,) = discover_shards(str(pool))
    before = set(tmp_path.rglob("*"))

    started = time.perf_counter()
    ingestion = ingest_shard(shard, limits=LIMITS)
    seconds = time.perf_counter() - started

    report = ingestion.report
    assert seconds < hostile.max_seconds, f"{hostile.name}: ingest took {seconds:.1f} s"
    assert report.accepted == ingestion.accepted.num_rows == hostile.accepted, report.by_reason
    assert report.by_reason == hostile.reasons
    assert Counter(ingestion.quarantine.column("reason").to_pylist()) == Counter(hostile.reasons)
    if hostile.shard_error is None:
        assert report.errors == []
    else:
        assert any(hostile.shard_error in error for error in report.errors), report.errors
    # accounting: every sample, row and hostile member the shard mentions is exactly one record
    assert report.accepted + report.quarantined == report.total
    assert report.quarantined == ingestion.quarantine.num_rows == sum(report.by_reason.values())
    uids = ingestion.accepted.column("uid").to_pylist() + ingestion.quarantine.column("uid").to_pylist()
    assert len(set(uids)) == len(uids) == report.total
    assert set(tmp_path.rglob("*")) == before, "ingest_shard wrote or extracted a file"


def test_every_reason_has_a_hostile_case_or_a_why() -> None:
    """A new reason code fails CI until the corpus produces it or NOT_IN_CORPUS says why it cannot."""
    produced = {code for hostile in CASES for code, count in hostile.reasons.items() if count > 0}
    codes = {reason.value for reason in Reason}  # at run time: reasons added to the enum are caught here
    assert sorted(codes - produced - set(NOT_IN_CORPUS)) == []
    assert sorted(produced & set(NOT_IN_CORPUS)) == [], "listed in NOT_IN_CORPUS but produced by a case"
    assert all(why.strip() and "\n" not in why for why in NOT_IN_CORPUS.values())


def test_case_names_are_unique_and_described() -> None:
    names = [hostile.name for hostile in CASES]
    assert len(names) == len(set(names))
    assert all(hostile.about for hostile in CASES)
