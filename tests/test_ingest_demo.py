"""Ingesting the demo pool: the quarantine matches the ground truth the pipeline never reads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation_platform.ingest import ingest_pool, write_ingestion
from curation_platform.pool import ChecksumCache, discover_shards


def test_demo_pool_quarantine_matches_ground_truth(demo_pool_dir: Path, tmp_path: Path) -> None:
    shards = discover_shards(str(demo_pool_dir / "pool"))
    results = list(ingest_pool(shards, workers=2))
    accepted = pa.concat_tables([result.accepted for result in results])
    quarantine = pa.concat_tables([result.quarantine for result in results])
    truth = {row["uid"]: row for row in pq.read_table(demo_pool_dir / "ground_truth.parquet").to_pylist()
             if row["split"] == "pool"}

    assert accepted.num_rows + quarantine.num_rows == len(truth)  # every parquet row accounted for
    reasons = dict(zip(quarantine["uid"].to_pylist(), quarantine["reason"].to_pylist()))
    declared = {row["uid"]: row for path in sorted((demo_pool_dir / "pool").glob("*.parquet"))
                for row in pq.read_table(path, columns=["uid", "width", "height"]).to_pylist()}
    for uid, row in truth.items():
        corruption = row["corruption"]
        if corruption == "failed_download":
            assert reasons[uid] == "not_downloaded"
        elif corruption == "undecodable":
            assert reasons[uid] == "undecodable_image"
        elif corruption == "tiny" and min(declared[uid]["width"], declared[uid]["height"]) < 32:
            assert reasons[uid] == "image_too_small"
        elif corruption in ("clean", "misaligned", "generic_caption", "exact_duplicate", "near_duplicate"):
            assert uid not in reasons, (uid, corruption, reasons.get(uid))

    languages = dict(zip(accepted["uid"].to_pylist(), accepted["language"].to_pylist()))
    non_english = [uid for uid, row in truth.items() if row["corruption"] == "non_english" and uid in languages]
    assert non_english and sum(languages[uid] != "en" for uid in non_english) >= 0.9 * len(non_english)
    clean = [uid for uid, row in truth.items() if row["corruption"] == "clean"]
    assert sum(languages[uid] == "en" for uid in clean) >= 0.97 * len(clean)
    sizes = accepted.select(["width", "height", "aspect_ratio"]).to_pylist()
    assert all(row["aspect_ratio"] >= 1 and min(row["width"], row["height"]) >= 32 for row in sizes)

    # idempotent: a second ingestion writes byte-identical samples and quarantine files
    out = tmp_path / "validated"
    first = {name: Path(path).read_bytes() for name, path in write_ingestion(results[0], str(out)).items()}
    (again,) = ingest_pool(shards[:1], workers=0)
    second = {name: Path(path).read_bytes() for name, path in write_ingestion(again, str(out)).items()}
    assert first["samples"] == second["samples"] and first["quarantine"] == second["quarantine"]


def test_replaced_shard_gets_a_new_id_and_the_cache_skips_unchanged(demo_pool_dir: Path, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for path in (demo_pool_dir / "pool").iterdir():
        (pool / path.name).write_bytes(path.read_bytes())
    cache = ChecksumCache(tmp_path / "checksums.sqlite")
    before = {shard.name: shard.shard_id for shard in discover_shards(str(pool), checksum_cache=cache)}
    assert discover_shards(str(pool), checksum_cache=cache) == discover_shards(str(pool))

    (pool / "00001.tar").write_bytes((demo_pool_dir / "pool" / "00000.tar").read_bytes())
    after = {shard.name: shard.shard_id for shard in discover_shards(str(pool), checksum_cache=cache)}
    assert after["00000"] == before["00000"]
    assert after["00001"] != before["00001"] and after["00001"].startswith("00001-")
