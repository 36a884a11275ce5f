"""Hostile command lines and pools that once hung, exhausted memory or passed: each now a clear exit code, reason
or error in bounded time (issue 15). Single-shard hostile inputs live in the hostile corpus
(tests/helpers/hostile_corpus.py, run by tests/test_hostile_corpus.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curation_platform.cli import main
from curation_platform.pool import discover_shards
from tests.helpers.shards import LIMITS, ShardBuilder


def test_ingest_exits_non_zero_on_a_shard_error(tmp_path: Path) -> None:
    pool = ShardBuilder().sample("000000001", "a red circle").write(tmp_path / "pool")
    (pool / "00000.tar").write_bytes(gzip.compress((pool / "00000.tar").read_bytes()))
    result = CliRunner().invoke(main, ["ingest", str(pool), "--out", str(tmp_path / "validated"), "--workers", "0"])
    assert result.exit_code == 1, result.output
    report = json.loads(next((tmp_path / "validated" / "reports").iterdir()).read_text())
    assert any("compressed_tar" in error for error in report["errors"])


@pytest.mark.parametrize("arguments", [
    ["score", "--lance", "x", "--repeats", "0"],
    ["score", "--lance", "x", "--reference-size", "-1"],
    ["validate", "pool", "--workers", "-3"],
    ["validate", "pool", "--max-pixels", "-5"],
    ["validate", "pool", "--min-side", "-1"],
    ["embed", "--validated", "v", "--lance", "x", "--batch-size", "0"],
])
def test_out_of_range_options_are_refused_before_any_work(arguments: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output


def test_schema_drift_is_a_quarantine_reason_and_the_pool_goes_on(tmp_path: Path) -> None:
    """Wrong types in the img2dataset metadata quarantine their sample (invalid_metadata); the shard and the
    pool's other shards are still written."""
    from curation_platform.ingest import ingest_pool, write_ingestion
    from curation_platform.reasons import Reason
    from tests.helpers.shards import jpeg_bytes

    pool = tmp_path / "pool"
    drifted = ShardBuilder(name="00000")
    for key, meta in (("000000001", {"url": {"href": "x"}}), ("000000002", {"original_width": 1e400}),
                      ("000000003", {"original_width": 2**40}), ("000000004", {"url": "http://x/4"})):
        drifted.file(f"{key}.jpg", jpeg_bytes()).file(f"{key}.txt", b"a red circle")
        drifted.file(f"{key}.json", json.dumps({"key": key, **meta}).replace("Infinity", "1e400").encode())
    drifted.write(pool)
    (pool / "00000.parquet").unlink()  # json-only: the json is the metadata
    ShardBuilder(name="00001").sample("000000005", "a blue square").write(pool)
    schema = pa.schema([("key", pa.string()), ("url", pa.int64()), ("caption", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string())])
    pq.write_table(pa.Table.from_pylist([{"key": "000000005", "url": 5, "caption": "c", "status": "success",
                                          "error_message": None}], schema=schema), pool / "00001.parquet")
    ShardBuilder(name="00002").sample("000000006", "a green star").write(pool)
    results = {item.report.shard: item for item in ingest_pool(discover_shards(str(pool)), limits=LIMITS)}
    for item in results.values():
        write_ingestion(item, str(tmp_path / "validated"))
    reasons = results["00000"].quarantine.column("reason").to_pylist()
    assert reasons == [Reason.INVALID_METADATA.value] * 3 and results["00000"].accepted.num_rows == 1
    assert results["00001"].quarantine.column("reason").to_pylist() == [Reason.INVALID_METADATA.value]
    assert results["00002"].accepted.num_rows == 1, "a healthy shard after the drifted ones is written"
    assert len(list((tmp_path / "validated" / "reports").iterdir())) == 3
