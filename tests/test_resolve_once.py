"""Each thing is resolved once: a shard's files are hashed once for ingestion and every later step (which read
what ingestion recorded), checks read the teacher's recorded id instead of loading its weights, and a
changed shard is still noticed (checksum cache keyed by size, mtime and, on S3, the ETag)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import tarfile
from pathlib import Path

import dagster as dg
import pytest

import curation_platform.teachers
from curation_platform import pool as pool_module
from curation_platform import storage
from curation_platform.ingest import ingest_shard, read_shard_ref, write_ingestion
from curation_platform.layout import ShardOutputs
from curation_platform.pool import HASHED, ChecksumCache, HashCount, discover_shards
from curation_platform.storage import FileEntry, S3Settings
from curation_platform_dagster.definitions import build_definitions
from curation_platform_dagster.defs import duplicates, embeddings, scoring, teachers
from curation_platform_dagster.defs.ingestion import shard_discovery_sensor
from curation_platform_dagster.defs.resources import PlatformResource, ScoringResource, TeacherResource
from tests.helpers.s3 import S3_BUCKET, upload_directory
from tests.helpers.teachers import tiny_teacher_dir

SHARD = "00000"
VALIDATED_CHECKS = {"shard_reconciles", "samples_meet_expectations", "quarantine_rate_within_bound", "uids_kept_once"}


def _record_teacher_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every function of the code location that loads the teacher's weights, in call order."""
    callers: list[str] = []
    real = curation_platform.teachers.load_teacher

    def recording(*args, **kwargs):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*args, **kwargs)

    for module in (embeddings, scoring, duplicates, teachers):
        monkeypatch.setattr(module, "load_teacher", recording)
    return callers


def _rewrite_a_caption(tar: Path) -> None:
    """New bytes, same size: the first caption's first character changes, and the mtime moves as a later
    write's would."""
    with tarfile.open(tar) as archive:
        member = next(item for item in archive.getmembers() if item.name.endswith(".txt") and item.size)
    with open(tar, "r+b") as handle:
        handle.seek(member.offset_data)
        first = handle.read(1)
        handle.seek(member.offset_data)
        handle.write(b"Y" if first == b"X" else b"X")
    stat = tar.stat()
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def _hashed_during(action) -> tuple[HashCount, object]:
    before = HASHED.reading()
    result = action()
    return HASHED.reading() - before, result


def test_per_shard_graph_hashes_the_shard_once_and_no_check_loads_the_teacher(
        tmp_path: Path, demo_pool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    shutil.copytree(demo_pool_dir / "pool", pool)
    platform = PlatformResource(home_uri=str(tmp_path / "home"), pool_uri=str(pool), decode_workers=0)
    teacher_config = TeacherResource(checkpoint=str(tiny_teacher_dir(tmp_path / "teacher")), device="cpu",
                                     workers=0, batch_size=64, gate="warn")  # random weights: the gate only warns
    scoring_config = ScoringResource(reference_size=100, neg_clip_batch_size=64, neg_clip_repeats=3,
                                     target_uri=str(demo_pool_dir / "target"))
    graph = build_definitions({}, {"platform": platform, "teacher_config": teacher_config, "scoring": scoring_config})
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    instance.add_dynamic_partitions("shards", [SHARD])

    def run(selection: list[str], partition: str | None = None, **kwargs) -> dg.ExecuteInProcessResult:
        return dg.materialize([*graph.assets, *graph.asset_checks], selection=selection, partition_key=partition,
                              instance=instance, resources=graph.resources, **kwargs)

    def sensor(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=graph.resources)
        return shard_discovery_sensor(context)

    assert run(["teacher"]).success and run(["eval_set_embeddings", "normsim_target"]).success
    loads = _record_teacher_loads(monkeypatch)

    def per_shard_graph() -> list[dg.ExecuteInProcessResult]:
        return [run(["validated_samples", "embeddings"], SHARD), run(["reference_sample"]),
                run(["shard_scores", "duplicate_pairs"], SHARD)]

    with monkeypatch.context() as uncached:  # as on a fresh worker: nothing cached, so each step's own hashing counts
        uncached.setattr(PlatformResource, "_checksum_cache", lambda self: None)
        hashed, (ingested, _, scored) = _hashed_during(per_shard_graph)
    files = [pool / f"{SHARD}{suffix}" for suffix in (".tar", ".parquet", "_stats.json")]
    assert hashed == HashCount(files=3, bytes_read=sum(path.stat().st_size for path in files)), "each file once"
    metadata = ingested.asset_materializations_for_node("validated_samples")[0].metadata
    assert metadata["hashes_computed"].value == 3 and metadata["bytes_hashed"].value == hashed.bytes_read
    checks = {check.check_name for result in (ingested, scored) for check in result.get_asset_check_evaluations()}
    assert checks == VALIDATED_CHECKS | {"embeddings_meet_expectations", "scores_meet_expectations"}
    assert loads == ["embeddings", "shard_scores"], "only the steps that embed or score load the weights"
    checksum = metadata["shard_id"].value.rsplit("-", 1)[1]
    embedded = ingested.asset_materializations_for_node("embeddings")[0].tags["dagster/data_version"]
    assert embedded.startswith(checksum), "downstream data versions use the recorded checksum"

    # The sensor requests only the shard not ingested yet; a second tick hashes nothing.
    first = sensor(None)
    assert [request.partition_key for request in first.run_requests] == ["00001"]
    hashed, idle = _hashed_during(lambda: sensor(first.cursor))
    assert hashed.files == 0 and idle.run_requests == []

    # Bytes rewritten: rediscovered with a new checksum (only the tar is hashed), refused downstream until
    # re-ingested, then ingested without hashing again (the sensor's digest is cached).
    _rewrite_a_caption(pool / f"{SHARD}.tar")
    hashed, changed = _hashed_during(lambda: sensor(first.cursor))
    (request,) = changed.run_requests
    assert hashed.files == 1 and request.partition_key == SHARD and request.run_key != metadata["shard_id"].value
    refused = run(["embeddings"], SHARD, raise_on_error=False)
    assert not refused.success
    assert "changed since it was ingested" in refused.get_step_failure_events()[0].step_failure_data.error.message
    hashed, again = _hashed_during(lambda: run(["validated_samples"], SHARD))
    assert hashed.files == 0
    assert again.asset_materializations_for_node("validated_samples")[0].metadata["shard_id"].value == request.run_key


def test_the_report_records_the_shard_it_validated(tmp_path: Path, demo_pool_dir: Path) -> None:
    (shard, _) = discover_shards(str(demo_pool_dir / "pool"))
    write_ingestion(ingest_shard(shard), str(tmp_path))
    assert read_shard_ref(str(tmp_path), shard.name) == shard

    report_uri = ShardOutputs.of(str(tmp_path), shard.name).report
    old = {key: value for key, value in json.loads(Path(report_uri).read_text()).items()
           if key not in ("files", "tar_sha256")}
    Path(report_uri).write_text(json.dumps(old))
    assert read_shard_ref(str(tmp_path), shard.name) is None, "a report from before files were recorded"
    with pytest.raises(FileNotFoundError):
        read_shard_ref(str(tmp_path), "00001")


def test_checksum_cache_keys_on_the_etag(tmp_path: Path) -> None:
    path = tmp_path / "checksums.sqlite"
    with sqlite3.connect(path) as db:  # a cache written before ETags were part of the key
        db.execute("CREATE TABLE checksums (uri TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                   " sha256 TEXT NOT NULL, PRIMARY KEY (uri, size, mtime_ns))")
        db.execute("INSERT INTO checksums VALUES ('/pool/a.tar', 10, 5, 'old')")
    cache = ChecksumCache(path)
    assert cache.get(FileEntry("/pool/a.tar", 10, 5)) == "old"

    listed = FileEntry("s3://bucket/pool/a.tar", 10, 5, etag="e1")
    cache.put(listed, "first")
    assert cache.get(listed) == "first"
    assert cache.get(FileEntry(listed.uri, 10, 5, etag="e2")) is None, "a re-upload within the same second"
    assert cache.get(FileEntry(listed.uri, 11, 5, etag="e1")) is None
    assert cache.get(FileEntry(listed.uri, 10, 5)) is None


@pytest.mark.s3
def test_s3_discovery_rehashes_only_what_the_listing_says_changed(
        tmp_path: Path, s3_server: S3Settings, demo_pool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url), ("AWS_REGION", s3_server.region),
                        ("AWS_ACCESS_KEY_ID", s3_server.access_key_id),
                        ("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key), ("XDG_CACHE_HOME", str(tmp_path))):
        monkeypatch.setenv(name, value)
    pool_uri = upload_directory(s3_server, demo_pool_dir / "pool", f"resolve-once/{tmp_path.name}/pool")
    platform = PlatformResource(home_uri=f"s3://{S3_BUCKET}/resolve-once/{tmp_path.name}/home", pool_uri=pool_uri)

    hashed, first = _hashed_during(platform.discover)
    assert hashed.files == 6 and all(entry.etag for shard in first for entry in shard.files.values())
    assert (tmp_path / "curation_platform" / "checksums.sqlite").exists(), "an s3:// home's cache is on this machine"
    hashed, again = _hashed_during(platform.discover)
    assert hashed.files == 0 and again == first
    hashed, alone = _hashed_during(lambda: platform.shard(SHARD))
    assert hashed.files == 0 and alone == first[0]

    filesystem = s3_server.pyarrow_filesystem()
    tar = first[0].tar
    data = bytearray(storage.read_bytes(tar.uri, s3_server))
    data[-1] ^= 1  # the end-of-archive padding: same size, other bytes, other ETag
    with filesystem.open_output_stream(tar.uri.removeprefix("s3://")) as stream:
        stream.write(bytes(data))
    stats = first[1].stats
    with filesystem.open_output_stream(stats.uri.removeprefix("s3://")) as stream:
        stream.write(storage.read_bytes(stats.uri, s3_server) + b"\n")  # a size change
    hashed, changed = _hashed_during(platform.discover)
    assert hashed == HashCount(files=2, bytes_read=tar.size + stats.size + 1)
    assert [shard.checksum != before.checksum for shard, before in zip(changed, first, strict=True)] == [True, True]
    assert changed[0].tar.etag != tar.etag and changed[0].parquet == first[0].parquet
    assert pool_module.tar_unchanged(changed[0], s3_server) and not pool_module.tar_unchanged(first[0], s3_server)
