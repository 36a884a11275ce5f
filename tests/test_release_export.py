"""Exporting releases as webdataset training shards: exactly the release's uids, the pool's image bytes, the
release's weights, byte-identical re-exports, refused foreign folders, the CLI, and S3."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from curation_platform.evaluation.export import ExportError, export_release, export_samples
from curation_platform.layout import ShardOutputs
from curation_platform.releases import Release, read_samples, subset_uids
from curation_platform.releases.artefacts import SUBSET
from tests.helpers.releases import releases_of_scored_demo

CLIP_HALF = """
name = "clip-half"
[[stage]]
type = "top_fraction"
score = "clip_score"
fraction = 0.5
"""
WEIGHTED = """
name = "weighted"
[[stage]]
type = "top_fraction"
score = "clip_score"
fraction = 0.3

[weights]
prompt = "circles squares and triangles"
mode = "clipped"
clip_at = 3.0
"""


@pytest.fixture(scope="module")
def releases(scored_demo: dict, demo_pool_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    return releases_of_scored_demo(scored_demo, demo_pool_dir, tmp_path_factory.mktemp("export-releases"),
                                   {"plain": CLIP_HALF, "weighted": WEIGHTED})


def _read_tars(paths: list[str]) -> list[dict]:
    """Every sample of the tars, in order: key, member extensions and contents."""
    samples: list[dict] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isfile() and member.mtime == 1_600_000_000 and member.uid == 0 and not member.uname
                key, _, extension = member.name.partition(".")
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                samples[-1][extension] = tar.extractfile(member).read()
    return samples


def _validated(scored_demo: dict) -> pl.DataFrame:
    return pl.read_parquet(ShardOutputs.samples_root(str(scored_demo["root"] / "validated")))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_exported_shards_hold_exactly_the_release_uids_with_the_pool_bytes(
        releases: dict[str, Release], scored_demo: dict, demo_pool_dir: Path, tmp_path: Path) -> None:
    release = releases["plain"]
    progress: list[int] = []
    exported = export_release(release.uri, str(tmp_path / "out"), samples_per_shard=40, on_shard=progress.append)
    subset_bytes = (Path(release.uri) / SUBSET).read_bytes()
    expected = subset_uids(np.load(Path(release.uri) / SUBSET))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert manifest == exported.manifest and manifest["subset_sha256"] == hashlib.sha256(subset_bytes).hexdigest()
    assert manifest["provenance"] == {name: release.manifest[name]
                                      for name in ("release_id", "name", "version", "samples_sha256")}
    assert exported.samples == manifest["samples"] == len(expected) and manifest["weights"] is False
    assert [shard["samples"] for shard in manifest["shards"]] == progress
    assert progress[:-1] == [40] * (len(progress) - 1) and 0 < progress[-1] <= 40 and sum(progress) == len(expected)
    assert exported.brace_pattern == str(tmp_path / "out" / f"{{00000..{len(progress) - 1:05d}}}.tar")

    samples = _read_tars(exported.shards)
    metas = [json.loads(sample["json"]) for sample in samples]
    assert sorted(meta["uid"] for meta in metas) == sorted(expected)
    assert [meta["key"] for meta in metas] == [sample["key"] for sample in samples]
    assert [meta["key"] for meta in metas] == [f"{index // 40:05d}{index % 40:04d}" for index in range(len(metas))]
    assert all("weight" not in meta for meta in metas)

    # Image bytes are the pool's, captions and metadata the validated samples'; order: source shard, then offset.
    validated = _validated(scored_demo).filter(pl.col("uid").is_in(expected))
    by_uid = {row["uid"]: row for row in validated.to_dicts()}
    with ExitStack() as stack:
        pool_tars = {shard: stack.enter_context(tarfile.open(demo_pool_dir / "pool" / f"{shard}.tar"))
                     for shard in validated["shard"].unique()}
        for sample, meta in zip(samples, metas):
            row = by_uid[meta["uid"]]
            (image_extension,) = set(sample) - {"key", "json", "txt"}
            image = sample[image_extension]
            assert hashlib.sha256(image).hexdigest() == row["image_sha256"]
            assert image == pool_tars[row["shard"]].extractfile(row["image_member"]).read()
            assert sample["txt"].decode() == row["caption"]
            assert (meta["source_shard"], meta["source_key"], meta["url"], meta["width"], meta["height"]) == (
                row["shard"], row["key"], row["url"], row["width"], row["height"])
    order = [(by_uid[meta["uid"]]["shard"], by_uid[meta["uid"]]["image_offset"]) for meta in metas]
    assert order == sorted(order)

    # The tars are exactly what tarfile writes for these members; SHA256SUMS covers every file; webdataset reads
    # the brace pattern.
    rewritten = io.BytesIO()
    with tarfile.open(fileobj=rewritten, mode="w", format=tarfile.PAX_FORMAT) as tar, \
            tarfile.open(exported.shards[0]) as original:
        for member in original.getmembers():
            tar.addfile(member, original.extractfile(member))
    assert rewritten.getvalue() == Path(exported.shards[0]).read_bytes()

    sums = dict(line.split("  ")[::-1] for line in (tmp_path / "out" / "SHA256SUMS").read_text().splitlines())
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert files == set(sums) | {"SHA256SUMS"}
    assert all(hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == digest
               for name, digest in sums.items())
    import webdataset as wds

    read_back = list(wds.WebDataset(exported.brace_pattern, shardshuffle=False))
    assert [item["__key__"] for item in read_back] == [meta["key"] for meta in metas]


def test_weighted_release_exports_its_weights(releases: dict[str, Release], tmp_path: Path) -> None:
    release = releases["weighted"]
    exported = export_release(release.uri, str(tmp_path / "out"))
    assert exported.manifest["weights"] is True and len(exported.shards) == 1
    assert exported.brace_pattern == exported.shards[0] == str(tmp_path / "out" / "00000.tar")
    weights = dict(read_samples(release).select("uid", "weight").iter_rows())
    metas = [json.loads(sample["json"]) for sample in _read_tars(exported.shards)]
    assert {meta["uid"]: meta["weight"] for meta in metas} == weights
    assert len(set(weights.values())) > 1


def test_reexport_is_byte_identical_and_other_exports_are_refused(releases: dict[str, Release],
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_release(releases["plain"].uri, str(out), samples_per_shard=50)
    first = _folder_bytes(out)
    again = export_release(releases["plain"].uri, str(out), samples_per_shard=50)
    assert _folder_bytes(out) == first and again.manifest["shards"] == json.loads(first["manifest.json"])["shards"]
    with pytest.raises(ExportError, match="already holds a different export.*differs in provenance, subset_sha256"):
        export_release(releases["weighted"].uri, str(out))
    with pytest.raises(ExportError, match="differs in samples_per_shard"):
        export_release(releases["plain"].uri, str(out), samples_per_shard=60)
    assert _folder_bytes(out) == first
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "00000.tar").write_bytes(b"someone's shard")
    with pytest.raises(ExportError, match="not empty and holds no export"):
        export_release(releases["plain"].uri, str(tmp_path / "occupied"))
    assert (tmp_path / "occupied" / "00000.tar").read_bytes() == b"someone's shard"


def test_changed_pool_bytes_and_unsafe_shard_names_are_errors(releases: dict[str, Release], scored_demo: dict,
                                                               demo_pool_dir: Path, tmp_path: Path) -> None:
    validated_uri = str(scored_demo["root"] / "validated")
    samples = read_samples(releases["plain"]).select("uid", "shard", "key")
    victim = _validated(scored_demo).filter(pl.col("uid") == samples["uid"][0]).row(0, named=True)
    pool = tmp_path / "pool"
    shutil.copytree(demo_pool_dir / "pool", pool)
    with open(pool / f"{victim['shard']}.tar", "r+b") as tar:
        tar.seek(victim["image_offset"] + victim["image_bytes"] // 2)
        byte = tar.read(1)
        tar.seek(-1, 1)
        tar.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ExportError, match=f"image of uid {victim['uid']} .* does not match its validated sha256"):
        export_samples(samples, str(tmp_path / "out"), pool_uri=str(pool), validated_uri=validated_uri,
                       provenance={"test": "tampered"})
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*.tmp"))

    for bad in ("../00000", "a/b", ".hidden"):
        hostile = samples.head(3).with_columns(pl.lit(bad).alias("shard"))
        with pytest.raises(ExportError, match="refusing shard name"):
            export_samples(hostile, str(tmp_path / "hostile"), pool_uri=str(pool), validated_uri=validated_uri,
                           provenance={})
    unknown = pl.DataFrame({"uid": ["f" * 32], "shard": [samples["shard"][0]], "key": ["000000000"]})
    with pytest.raises(ExportError, match="not among its validated samples"):
        export_samples(unknown, str(tmp_path / "unknown"), pool_uri=str(pool), validated_uri=validated_uri,
                       provenance={})


def test_release_export_command(releases: dict[str, Release], tmp_path: Path) -> None:
    from curation_platform_dagster.cli import main

    release = releases["plain"]
    releases_uri = str(Path(release.uri).parents[1])
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["release", "export", "clip-half", "--releases", releases_uri,
                                       "--out", str(out), "--samples-per-shard", "64"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    shards = len(manifest["shards"])
    assert f"{manifest['samples']:,} samples in {shards} shards at {out}" in result.stdout
    assert f"{out}/{{00000..{shards - 1:05d}}}.tar" in result.stdout
    refused = CliRunner().invoke(main, ["release", "export", "weighted/1", "--releases", releases_uri, "--out", str(out)])
    assert refused.exit_code == 1 and "already holds a different export" in refused.output


@pytest.mark.s3
def test_export_from_and_to_s3_matches_the_local_export(releases: dict[str, Release], scored_demo: dict,
                                                        demo_pool_dir: Path, s3_server, tmp_path: Path) -> None:
    from curation_platform import storage
    from tests.helpers.s3 import upload_directory

    release = releases["plain"]
    samples = read_samples(release).select("uid", "shard", "key")
    pool = upload_directory(s3_server, demo_pool_dir / "pool", "export/pool")
    validated = upload_directory(s3_server, scored_demo["root"] / "validated", "export/validated")
    provenance = {"release_id": release.release_id}
    local = export_samples(samples, str(tmp_path / "local"), pool_uri=str(demo_pool_dir / "pool"),
                           validated_uri=str(scored_demo["root"] / "validated"), provenance=provenance,
                           samples_per_shard=64)
    remote = export_samples(samples, "s3://curation-test/export/out", pool_uri=pool, validated_uri=validated,
                            provenance=provenance, samples_per_shard=64, s3=s3_server)
    assert remote.manifest["shards"] == local.manifest["shards"]
    assert remote.brace_pattern.startswith("s3://curation-test/export/out/{00000..")
    for remote_tar, local_tar in zip(remote.shards, local.shards):
        assert storage.read_bytes(remote_tar, s3_server) == Path(local_tar).read_bytes()
    assert not storage.exists("s3://curation-test/export/out/.export-in-progress.json", s3_server)
    again = export_samples(samples, "s3://curation-test/export/out", pool_uri=pool, validated_uri=validated,
                           provenance=provenance, samples_per_shard=64, s3=s3_server)
    assert again.manifest == remote.manifest
    with pytest.raises(ExportError, match="already holds a different export"):
        export_samples(samples, "s3://curation-test/export/out", pool_uri=pool, validated_uri=validated,
                       provenance={"release_id": "other"}, s3=s3_server)
