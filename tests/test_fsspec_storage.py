"""Storage the ecosystem already speaks (issue 17): pools, homes and releases on any fsspec filesystem, brace
lists of shards, DataComp's 8-digit names, and S3 settings left to the standard AWS chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.registry import known_implementations

from curation_platform import storage
from curation_platform.dedup import ExactDuplicateIndex
from curation_platform.ingest import ingest_pool, read_accepted, read_shard_ref, write_ingestion
from curation_platform.layout import ProjectLayout
from curation_platform.pool import (
    ChecksumCache,
    discover_shards,
    pool_exists,
    shard_file_uri,
    tar_unchanged,
)
from curation_platform.releases.artefacts import publish_folder, versions_of
from curation_platform.storage import S3Settings
from tests.helpers.s3 import upload_directory
from tests.helpers.shards import LIMITS, ShardBuilder

ROOT = Path(__file__).resolve().parents[1]


def _pool(directory: Path, names: list[str]) -> Path:
    """One small shard per name, each with two samples of uids unique to it."""
    for index, name in enumerate(names):
        ShardBuilder(name).sample(f"{name}0", f"a red square {index}", uid=f"{index:031x}a") \
            .sample(f"{name}1", f"a blue circle {index}", uid=f"{index:031x}b").write(directory)
    (directory / f"{names[0]}_stats.json").write_text(json.dumps({"count": 2}))
    return directory


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory filesystem, removed afterwards."""
    root = f"memory://curation-{uuid.uuid4().hex}"
    yield root
    filesystem = fsspec.filesystem("memory")
    if filesystem.exists(root):
        filesystem.rm(root, recursive=True)


def _upload(local: Path, uri: str) -> str:
    filesystem = fsspec.filesystem("memory")
    for path in sorted(local.iterdir()):
        filesystem.pipe(f"{uri}/{path.name}", path.read_bytes())
    return uri


def _ingested(shards) -> dict[str, tuple]:
    return {item.report.shard: (item.report.shard_id, item.accepted.to_pylist(), item.quarantine.to_pylist())
            for item in ingest_pool(shards, limits=LIMITS, workers=0)}


def test_a_pool_on_a_non_s3_fsspec_filesystem_ingests_like_the_same_pool_on_disk(tmp_path: Path,
                                                                                    memory_root: str) -> None:
    local = _pool(tmp_path / "pool", ["00000000", "00000001"])  # DataComp's 8-digit names
    pool = _upload(local, f"{memory_root}/pool")
    remote = discover_shards(pool, checksum_cache=ChecksumCache(tmp_path / "checksums.sqlite"))
    assert [shard.name for shard in remote] == ["00000000", "00000001"]
    assert [shard.partition_key for shard in remote] == ["00000000", "00000001"]
    assert remote[0].tar.uri == f"{pool}/00000000.tar" and remote[0].stats.uri == f"{pool}/00000000_stats.json"
    assert [shard.shard_id for shard in remote] == [shard.shard_id for shard in discover_shards(str(local))]
    assert _ingested(remote) == _ingested(discover_shards(str(local)))
    assert all(tar_unchanged(shard) for shard in remote)

    validated = f"{memory_root}/home/validated"
    for ingestion in ingest_pool(remote, limits=LIMITS, workers=0):
        write_ingestion(ingestion, validated)
    assert read_shard_ref(validated, "00000001") == remote[1]
    assert read_accepted(validated, remote[1]).num_rows == 2


def test_a_file_url_is_a_local_path(tmp_path: Path) -> None:
    local = _pool(tmp_path / "pool", ["00000", "00001"])
    assert discover_shards(f"file://{local}") == discover_shards(str(local))
    assert storage.absolute(f"file://{local}") == str(local)
    assert ProjectLayout.resolve(f"file://{tmp_path}/home", environ={}).checksum_cache == \
        tmp_path / "home" / "state" / "checksums.sqlite"


def test_a_remote_home_keeps_its_checksum_cache_on_this_machine() -> None:
    assert ProjectLayout.resolve("gs://bucket/home", environ={}).checksum_cache is None
    assert ProjectLayout.resolve("memory://home", environ={}).lancedb == "memory://home/lancedb"


def test_a_brace_expanded_shard_list_names_exactly_its_shards(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", ["00000", "00001", "00002", "00003"])
    listed = discover_shards(f"{pool}/{{00001..00002}}.tar")
    assert [shard.name for shard in listed] == ["00001", "00002"]
    assert all(shard.parquet is not None for shard in listed)  # the tar names its parquet too
    everything = {shard.name: shard for shard in discover_shards(str(pool))}
    assert listed == [everything["00001"], everything["00002"]]
    assert [shard.name for shard in discover_shards(f"{pool}/{{00003,00000}}.tar")] == ["00000", "00003"]
    assert [shard.name for shard in discover_shards(f"{pool}/00000.{{tar,parquet}}")] == ["00000"]


def test_names_in_a_brace_list_that_do_not_exist_are_named(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", ["00000", "00001"])
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 shard files .* do not exist: .*/00002\.tar, .*/00003\.tar"):
        discover_shards(f"{pool}/{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        discover_shards(f"{tmp_path}/nowhere/{{00000..00001}}.tar")
    with pytest.raises(ValueError, match="not a shard file"):
        discover_shards(f"{pool}/{{00000,notes.txt}}")
    assert pool_exists(f"{pool}/{{00001..00005}}.tar") and not pool_exists(f"{pool}/{{00007..00009}}.tar")


def test_a_brace_list_on_an_fsspec_filesystem_and_where_its_shards_are(tmp_path: Path, memory_root: str) -> None:
    pool = _upload(_pool(tmp_path / "pool", ["00000000", "00000001", "00000002"]), f"{memory_root}/pool")
    pattern = f"{pool}/{{00000000..00000001}}.tar"
    assert [shard.name for shard in discover_shards(pattern)] == ["00000000", "00000001"]
    assert shard_file_uri(pattern, "00000001") == f"{pool}/00000001.tar"
    assert shard_file_uri(pool, "00000002", ".parquet") == f"{pool}/00000002.parquet"
    assert shard_file_uri(f"{pool}/00000002.tar", "00000002") == f"{pool}/00000002.tar"
    with pytest.raises(FileNotFoundError, match="names no shard '00000002'"):
        shard_file_uri(pattern, "00000002")


def test_datacomp_and_img2dataset_names_live_side_by_side(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", ["00000", "00000000", "00000001"])
    assert [shard.name for shard in discover_shards(str(pool))] == ["00000", "00000000", "00000001"]
    assert [shard.name for shard in discover_shards(f"{pool}/{{00000000..00000001}}.tar")] == ["00000000", "00000001"]


def test_brace_patterns_expand_as_webdataset_does() -> None:
    assert storage.expand_braces("s3://b/pool/{00000..00002}.tar") == [
        "s3://b/pool/00000.tar", "s3://b/pool/00001.tar", "s3://b/pool/00002.tar"]
    assert storage.expand_braces("{8..10}") == ["8", "9", "10"]
    assert storage.expand_braces("{098..100}") == ["098", "099", "100"]
    assert storage.expand_braces("/d/{a,b{1..2}}/x") == ["/d/a/x", "/d/b1/x", "/d/b2/x"]
    for bad in ("{a}", "a{b", "a}b", "{1..}"):
        with pytest.raises(ValueError):
            storage.expand_braces(bad)


def test_an_unknown_scheme_or_a_missing_package_is_a_clear_value_error(monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported URI scheme nope:// .*fsspec"):
        storage.exists("nope://bucket/pool")
    with pytest.raises(ValueError, match="unsupported URI scheme nope://"):
        discover_shards("nope://bucket/pool/{00000..00001}.tar")
    monkeypatch.setitem(known_implementations, "notinstalled",
                        {"class": "curation_no_such_package.FileSystem", "err": "Install curation_no_such_package"})
    with pytest.raises(ValueError, match="notinstalled:// URIs need .*Install curation_no_such_package"):
        storage.read_bytes("notinstalled://bucket/file")


def test_releases_publish_on_any_fsspec_filesystem(tmp_path: Path, memory_root: str) -> None:
    staging = tmp_path / "staging"
    (staging / "report").mkdir(parents=True)
    (staging / "report" / "report.md").write_text("# report\n")
    (staging / "SHA256SUMS").write_text("sums\n")
    releases = f"{memory_root}/releases"
    assert publish_folder(staging, releases, "demo", 1, None) == f"{releases}/demo/1"
    assert storage.read_bytes(f"{releases}/demo/1/report/report.md") == b"# report\n"
    assert versions_of(releases, "demo") == [1]
    with pytest.raises(FileExistsError):
        publish_folder(staging, releases, "demo", 1, None)
    local = publish_folder(staging, f"file://{tmp_path}/releases", "demo", 1, None)
    assert local == str(tmp_path / "releases" / "demo" / "1") and Path(local, "SHA256SUMS").is_file()


def test_the_exact_duplicate_index_reads_through_the_fsspec_filesystem(memory_root: str) -> None:
    samples = {"uid": ["a" * 32, "b" * 32], "shard": ["00000000"] * 2, "image_sha256": ["f" * 64] * 2,
               "caption": ["one", "two"]}
    index = ExactDuplicateIndex(f"{memory_root}/duplicates/exact")
    index.add_shard("00000000", pl.DataFrame(samples))
    assert sorted(index.groups("image")["uid"].to_list()) == ["a" * 32, "b" * 32]


def test_s3_settings_force_no_region() -> None:
    empty = S3Settings.from_env({})
    assert empty.region is None and "region" not in empty.storage_options()
    explicit = S3Settings.from_env({"AWS_DEFAULT_REGION": "eu-central-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert explicit.storage_options()["region"] == "eu-central-1"
    assert explicit.storage_options()["endpoint"] == "http://127.0.0.1:1"


def test_an_aws_profile_decides_the_region_when_nothing_else_does(tmp_path: Path) -> None:
    """pyarrow and boto3 resolve the region from ``~/.aws/config`` (here ``AWS_CONFIG_FILE``) themselves; in a
    fresh process, since both SDKs read their configuration once per process."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = eu-west-3\n[profile other]\nregion = ap-south-1\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_PROFILE="other", AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    code = ("from curation_platform.storage import S3Settings; s = S3Settings.from_env(); "
            "print(s.region, s.pyarrow_filesystem().region, s.boto3_client().meta.region_name)")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.split() == ["None", "ap-south-1", "ap-south-1"]


@pytest.mark.s3
def test_a_brace_expanded_shard_list_on_s3(tmp_path: Path, s3_server: S3Settings) -> None:
    pool = upload_directory(s3_server, _pool(tmp_path / "pool", ["00000", "00001", "00002"]),
                            f"pools/braces-{uuid.uuid4().hex[:8]}")
    listed = discover_shards(f"{pool}/{{00000..00001}}.tar", s3=s3_server)
    everything = discover_shards(pool, s3=s3_server)
    assert listed == everything[:2] and listed[0].tar.etag and listed[0].parquet is not None
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 .*/00003\.tar"):
        discover_shards(f"{pool}/{{00000..00003}}.tar", s3=s3_server)
