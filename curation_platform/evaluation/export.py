"""Materialise a release (or any uid subset of a pool) as webdataset training shards.

:func:`export_samples` writes ``00000.tar``, ``00001.tar``, ... into a folder (local or ``s3://``): for
each sample the pool's image bytes unchanged (checked against the sha256 ingestion recorded), ``KEY.txt``
(the caption) and ``KEY.json`` (uid, new key, source shard and key, url, size, and the weight when there
is one), ``samples_per_shard`` samples a shard. Then ``manifest.json`` (provenance, the shards with their
sha256, sample counts, whether weights are present, ``subset_sha256`` = the sha256 of DataComp's
``subset.npy`` of the exported uids) and ``SHA256SUMS`` over every file, written last.
:func:`export_release` does this for a release folder, reading pool and validated locations from its
manifest. The result's :attr:`ExportedShards.brace_pattern` is what open_clip's ``--train-data`` and
webdataset take.

Streaming: one source shard at a time, only its selected rows of the validated parquet, images read by
their recorded byte ranges in offset order (neighbouring ranges coalesced into reads of at most
:data:`MAX_READ_SPAN` bytes), one output tar open at a time (on local disk, uploaded when complete), so
memory stays bounded by one read span and one shard's rows. The output order is sorted by source shard
then offset, and tar members carry fixed metadata, so re-running an export rewrites identical bytes. A
folder holding a different export (or anything that is not an export) is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.file_modes import apply_default_modes
from curation_platform.formats.img2dataset import (
    TAR_MEMBER_MODE,
    TAR_MEMBER_MTIME,
    sample_key,
    sample_key_digits,
    shard_name,
)
from curation_platform.layout import ShardOutputs
from curation_platform.pool import partition_key_for, shard_file_uri
from curation_platform.releases.artefacts import CHECKSUMS, SAMPLES, SUBSET, npy_bytes, sha256_hex, subset_array
from curation_platform.storage import S3Settings

EXPORT_FORMAT = "webdataset"
EXPORT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IN_PROGRESS = ".export-in-progress.json"  # the export's identity, while its shards are being written
MAX_READ_SPAN = 8 << 20  # bytes read from a pool tar at once (neighbouring members coalesced)
MAX_READ_GAP = 256 << 10  # neighbouring members closer than this are read together
MAX_SHARDS = 100_000  # five-digit shard names
SHARD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
_VALIDATED_COLUMNS = ["uid", "key", "shard", "caption", "url", "width", "height", "image_format", "image_member",
                      "image_offset", "image_bytes", "image_sha256"]


class ExportError(ValueError):
    """An export that cannot be written as asked (bad input, changed pool bytes, an occupied folder)."""


@dataclass(frozen=True)
class ExportedShards:
    uri: str  # output folder (absolute local path or s3://...)
    shards: list[str]  # tar URIs, in order
    samples: int
    manifest: dict  # what manifest.json holds

    @property
    def brace_pattern(self) -> str:
        """``/out/{00000..00003}.tar`` (one shard: its URI): open_clip's ``--train-data``, webdataset's urls."""
        names = [shard["name"] for shard in self.manifest["shards"]]
        if len(names) == 1:
            return self.shards[0]
        return storage.join(self.uri, f"{{{Path(names[0]).stem}..{Path(names[-1]).stem}}}.tar")


# -- public entry points ------------------------------------------------------------------------

def export_release(release_uri: str, out_uri: str, *, samples_per_shard: int = 1000, s3: S3Settings | None = None,
                   on_shard: Callable[[int], None] | None = None) -> ExportedShards:
    """A release's samples (its ``samples.parquet``, checked against the manifest's ``samples_sha256``) ->
    shards. Pool and validated locations come from the manifest's ``sources``; the provenance recorded is
    ``release_id``, ``name``, ``version`` and ``samples_sha256``. The ``weight`` column is exported only
    when the release's recipe has ``[weights]``."""
    import io

    from curation_platform.releases.store import open_release

    release = open_release(release_uri, s3)
    manifest = release.manifest
    sources = manifest.get("sources") or {}
    pool_uri, validated_uri = sources.get("pool_uri"), sources.get("validated_uri")
    if not pool_uri or not validated_uri:
        raise ExportError(f"release {release.release_id} records no pool_uri/validated_uri in its sources "
                          "(create it with the pool's location, e.g. `release create --pool URI`)")
    data = storage.read_bytes(storage.join(release_uri, SAMPLES), s3)
    if sha256_hex(data) != manifest["samples_sha256"]:
        raise ExportError(f"{storage.join(release_uri, SAMPLES)} does not match its manifest's samples_sha256: "
                          "the release was modified (run `release verify`)")
    samples = pl.read_parquet(io.BytesIO(data))
    if manifest.get("weights") is None and "weight" in samples.columns:
        samples = samples.drop("weight")  # unweighted recipes write weight 1 everywhere: not a weighting
    subset_uri = storage.join(release_uri, SUBSET)
    expected_subset = sha256_hex(storage.read_bytes(subset_uri, s3)) if storage.exists(subset_uri, s3) else None
    provenance = {name: manifest[name] for name in ("release_id", "name", "version", "samples_sha256")}
    exported = export_samples(samples, out_uri, pool_uri=pool_uri, validated_uri=validated_uri,
                              provenance=provenance, samples_per_shard=samples_per_shard, s3=s3, on_shard=on_shard)
    if expected_subset is not None and exported.manifest["subset_sha256"] != expected_subset:
        raise ExportError(f"the exported uids differ from {subset_uri} (sha256 {expected_subset[:16]}...)")
    return exported


def export_samples(samples: pl.DataFrame, out_uri: str, *, pool_uri: str, validated_uri: str, provenance: dict,
                   samples_per_shard: int = 1000, s3: S3Settings | None = None,
                   on_shard: Callable[[int], None] | None = None) -> ExportedShards:
    """samples: at least columns uid, shard (the pool shard name), key; optional weight (float).

    ``on_shard`` is called after each output shard is written, with the number of samples it holds.
    """
    samples = _checked_samples(samples, samples_per_shard)
    weighted = "weight" in samples.columns
    out_uri = storage.absolute(out_uri)

    identity = _normalised({
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "provenance": provenance,
        "subset_sha256": sha256_hex(npy_bytes(subset_array(samples["uid"].to_list()))),
        "samples": samples.height, "samples_per_shard": samples_per_shard, "weights": weighted,
    })
    _claim(out_uri, identity, s3)
    writer = _ShardWriter(out_uri, samples_per_shard, s3, on_shard)
    with writer:
        for (shard,), rows in samples.sort("shard", maintain_order=True).group_by("shard", maintain_order=True):
            for row, image in _source_samples(str(shard), rows, pool_uri, validated_uri, s3):
                writer.add(row, image, weighted)
    manifest = {**identity, "sources": {"pool_uri": pool_uri, "validated_uri": validated_uri},
                "key_digits": writer.key_digits, "shards": writer.finished}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    storage.write_bytes_atomic(storage.join(out_uri, MANIFEST), manifest_bytes, s3)
    sums = {shard["name"]: shard["sha256"] for shard in writer.finished} | {MANIFEST: sha256_hex(manifest_bytes)}
    checksums = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    storage.write_bytes_atomic(storage.join(out_uri, CHECKSUMS), checksums.encode(), s3)
    _delete(storage.join(out_uri, IN_PROGRESS), s3)
    return ExportedShards(out_uri, [storage.join(out_uri, shard["name"]) for shard in writer.finished],
                          samples.height, manifest)


# -- input checks -------------------------------------------------------------------------------

def _checked_samples(samples: pl.DataFrame, samples_per_shard: int) -> pl.DataFrame:
    missing = {"uid", "shard", "key"} - set(samples.columns)
    if missing:
        raise ExportError(f"the samples frame needs columns uid, shard, key (missing {sorted(missing)})")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ExportError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    if samples.height == 0:
        raise ExportError("nothing to export: the samples frame is empty")
    if math.ceil(samples.height / samples_per_shard) > MAX_SHARDS:
        raise ExportError(f"{samples.height:,} samples at {samples_per_shard} a shard exceed {MAX_SHARDS:,} shards: "
                          "raise samples_per_shard")
    columns = [pl.col("uid").cast(pl.String), pl.col("shard").cast(pl.String), pl.col("key").cast(pl.String)]
    if "weight" in samples.columns:
        columns.append(pl.col("weight").cast(pl.Float64))
    frame = samples.select(columns)
    if frame.null_count().sum_horizontal().item():
        raise ExportError("the samples frame has null uid, shard, key or weight values")
    duplicated = frame.filter(pl.col("uid").is_duplicated())["uid"].unique().sort().head(3).to_list()
    if duplicated:
        raise ExportError(f"uids appear more than once in the samples frame: {duplicated}")
    if "weight" in frame.columns and not frame["weight"].is_finite().all():
        bad = frame.filter(~pl.col("weight").is_finite())["uid"].head(3).to_list()
        raise ExportError(f"weights must be finite numbers (uids {bad})")
    for shard in frame["shard"].unique().to_list():
        _check_shard_name(shard)
    return frame


def _check_shard_name(shard: str) -> None:
    """Shard names become paths (``<pool>/<shard>.tar``): no separators, no ``..``, a valid partition key."""
    if not SHARD_NAME_PATTERN.match(shard) or ".." in shard:
        raise ExportError(f"refusing shard name {shard!r}: not a plain shard name")
    try:
        partition_key_for(shard)
    except ValueError as error:
        raise ExportError(str(error)) from error


def _normalised(value: dict) -> dict:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ExportError(f"provenance must be JSON-serialisable: {error}") from error


# -- the output folder --------------------------------------------------------------------------

_IDENTITY_KEYS = ("format", "format_version", "provenance", "subset_sha256", "samples", "samples_per_shard",
                  "weights")


def _claim(out_uri: str, identity: dict, s3: S3Settings | None) -> None:
    """Refuse a folder holding another export or anything else; else record this export's identity."""
    for name in (MANIFEST, IN_PROGRESS):
        uri = storage.join(out_uri, name)
        if storage.exists(uri, s3):
            try:
                existing = json.loads(storage.read_bytes(uri, s3))
            except ValueError as error:
                raise ExportError(f"{uri} is not an export manifest: refusing to write into {out_uri}") from error
            found = {key: existing.get(key) for key in _IDENTITY_KEYS}
            if found != identity:
                differs = [key for key in _IDENTITY_KEYS if found[key] != identity[key]]
                raise ExportError(f"{out_uri} already holds a different export (provenance "
                                  f"{json.dumps(found['provenance'], sort_keys=True)}; differs in "
                                  f"{', '.join(differs)}): choose another output folder or remove it")
            break
    else:
        if storage.exists(out_uri, s3) and (storage.list_dirs(out_uri, s3) or any(storage.list_files(out_uri, s3))):
            raise ExportError(f"{out_uri} is not empty and holds no export: choose an empty or new folder")
    storage.write_bytes_atomic(storage.join(out_uri, IN_PROGRESS),
                               (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode(), s3)


def _delete(uri: str, s3: S3Settings | None) -> None:
    filesystem, path = storage.filesystem_for(uri, s3)
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        filesystem.delete_file(path)


TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK


def _tar_header(name: str, size: int) -> bytes:
    """The ustar header ``tarfile`` writes for a regular member with the platform's fixed metadata (mode
    0644, uid/gid 0, no owner names, mtime :data:`TAR_MEMBER_MTIME`), built directly: 4x faster than
    ``TarInfo.tobuf``, and the tests check it is byte-identical to it."""
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8 ** 11:
        raise ExportError(f"tar member {name!r} ({size} bytes) does not fit a ustar header")
    header = bytearray(TAR_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = b"%07o\0" % TAR_MEMBER_MODE
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % TAR_MEMBER_MTIME
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class _TarStream:
    """A tar written member by member into a file, hashed and counted as it goes."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.hash = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self.hash.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(_tar_header(name, len(data)))
        self._write(data)
        if len(data) % TAR_BLOCK:
            self._write(bytes(TAR_BLOCK - len(data) % TAR_BLOCK))

    def close(self) -> None:
        """End-of-archive blocks, padded to whole records, as ``tarfile`` ends an archive."""
        self._write(bytes(2 * TAR_BLOCK))
        if self.size % TAR_RECORD:
            self._write(bytes(TAR_RECORD - self.size % TAR_RECORD))


class _ShardWriter:
    """Output tars, one open at a time, rolled over every ``samples_per_shard`` samples. Each is written to
    a hidden temporary file (in the folder itself when local, else in a scratch folder) and moved or
    uploaded into place when complete."""

    def __init__(self, out_uri: str, samples_per_shard: int, s3: S3Settings | None,
                 on_shard: Callable[[int], None] | None) -> None:
        self.out_uri = out_uri
        self.samples_per_shard = samples_per_shard
        self.key_digits = sample_key_digits(samples_per_shard)
        self.s3 = s3
        self.on_shard = on_shard
        self.local = storage.is_local(out_uri)
        self.finished: list[dict[str, Any]] = []
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._temporary: Path | None = None
        self._handle: BinaryIO | None = None
        self._tar: _TarStream | None = None
        self._count = 0

    def __enter__(self) -> Self:
        if self.local:
            Path(self.out_uri).mkdir(parents=True, exist_ok=True)
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="export-")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc is None and self._tar is not None:
                self._finish()
        finally:
            self._discard()
            if self._scratch is not None:
                self._scratch.cleanup()

    def add(self, row: dict[str, Any], image: bytes, weighted: bool) -> None:
        if self._tar is None:
            self._open()
        index = len(self.finished)
        key = sample_key(index, self._count, self.key_digits)
        meta = {"uid": row["uid"], "key": key, "source_shard": row["shard"], "source_key": row["key"],
                "url": row["url"], "width": row["width"], "height": row["height"]}
        if weighted:
            meta["weight"] = row["weight"]
        members = {row["extension"]: image, "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(),
                   "txt": (row["caption"] or "").encode("utf-8")}
        for extension in sorted(members):  # webdataset's TarWriter order
            self._tar.add(f"{key}.{extension}", members[extension])
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def _open(self) -> None:
        name = f"{shard_name(len(self.finished))}.tar"
        folder = Path(self.out_uri) if self.local else Path(self._scratch.name)
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        self._temporary = Path(temporary)
        self._handle = os.fdopen(descriptor, "wb", buffering=1 << 20)
        self._tar = _TarStream(self._handle)
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._handle is not None
        tar, self._tar = self._tar, None
        tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        name = f"{shard_name(len(self.finished))}.tar"
        target = storage.join(self.out_uri, name)
        assert self._temporary is not None
        if self.local:
            apply_default_modes(Path(self._temporary))  # mkstemp's 0600 would hide the shards from other users
            os.replace(self._temporary, target)
        else:
            filesystem, path = storage.filesystem_for(target, self.s3)
            with open(self._temporary, "rb") as source, filesystem.open_output_stream(path) as stream:
                shutil.copyfileobj(source, stream, 8 << 20)
            self._temporary.unlink()
        self._temporary = None
        self.finished.append({"name": name, "samples": self._count, "bytes": tar.size,
                              "sha256": tar.hash.hexdigest()})
        if self.on_shard is not None:
            self.on_shard(self._count)

    def _discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._tar = None
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)
            self._temporary = None


# -- reading one source shard -------------------------------------------------------------------

def _source_samples(shard: str, rows: pl.DataFrame, pool_uri: str, validated_uri: str,
                    s3: S3Settings | None) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The selected samples of one pool shard in tar-offset order, each with its verified image bytes."""
    validated = _validated_rows(shard, rows, validated_uri, s3)
    tar_uri = shard_file_uri(pool_uri, shard)
    filesystem, path = storage.filesystem_for(tar_uri, s3)
    try:
        tar = filesystem.open_input_file(path)
    except OSError as error:
        raise ExportError(f"cannot open pool shard {tar_uri}: {error}") from error
    with tar:
        tar_size = tar.size()
        records = validated.to_dicts()
        for record, image in zip(records, _read_ranges(tar, tar_uri, tar_size, records)):
            if sha256_hex(image) != record["image_sha256"]:
                raise ExportError(f"image of uid {record['uid']} in {tar_uri} (offset {record['image_offset']}) does "
                                  "not match its validated sha256: the pool shard changed since ingestion, re-ingest it")
            yield record, image


def _validated_rows(shard: str, rows: pl.DataFrame, validated_uri: str, s3: S3Settings | None) -> pl.DataFrame:
    uri = ShardOutputs.of(validated_uri, shard).samples
    if not storage.exists(uri, s3):
        raise ExportError(f"shard {shard} has no validated samples at {uri}")
    filesystem, path = storage.filesystem_for(uri, s3)
    uids = rows["uid"].to_list()
    table = pq.read_table(path, filesystem=filesystem, columns=_VALIDATED_COLUMNS, filters=[("uid", "in", uids)])
    found = pl.from_arrow(table)
    assert isinstance(found, pl.DataFrame)
    if found["uid"].is_duplicated().any():
        raise ExportError(f"{uri} holds uid {found.filter(pl.col('uid').is_duplicated())['uid'][0]} more than once")
    joined = rows.join(found.rename({"key": "validated_key", "shard": "validated_shard"}), on="uid", how="left")
    missing = joined.filter(pl.col("image_sha256").is_null())["uid"].head(3).to_list()
    if missing:
        count = joined["image_sha256"].null_count()
        raise ExportError(f"{count} selected uids of shard {shard} are not among its validated samples "
                          f"(e.g. {missing}) in {validated_uri}")
    wrong = joined.filter((pl.col("validated_key") != pl.col("key")) | (pl.col("validated_shard") != shard))
    if wrong.height:
        raise ExportError(f"uid {wrong['uid'][0]} is key {wrong['validated_key'][0]} of shard "
                          f"{wrong['validated_shard'][0]} in the validated samples, not key {wrong['key'][0]} of {shard}")
    return joined.with_columns(_extension(joined)).sort("image_offset", "uid")


def _extension(frame: pl.DataFrame) -> pl.Series:
    """The image member's extension: from the decoded format, else the pool member's own (when an image one)."""
    values = []
    for image_format, member in frame.select("image_format", "image_member").iter_rows():
        extension = FORMAT_EXTENSIONS.get(image_format) or member.rpartition(".")[2].lower()
        if extension not in IMAGE_EXTENSIONS:
            raise ExportError(f"unsupported image format {image_format!r} (member {member!r})")
        values.append(extension)
    return pl.Series("extension", values, dtype=pl.String)


def _read_ranges(tar: pafs.NativeFile, tar_uri: str, tar_size: int, records: list[dict]) -> Iterator[bytes]:
    """Each record's ``image_bytes`` at ``image_offset``, records in offset order; neighbouring ranges are
    read together (at most :data:`MAX_READ_SPAN` bytes a read, one member alone when larger)."""
    index = 0
    while index < len(records):
        start = records[index]["image_offset"]
        end = _range_end(records[index], tar_uri, tar_size)
        last = index + 1
        while last < len(records):
            offset = records[last]["image_offset"]
            following = _range_end(records[last], tar_uri, tar_size)
            if offset - end > MAX_READ_GAP or max(end, following) - start > MAX_READ_SPAN:
                break
            end = max(end, following)
            last += 1
        block = tar.read_at(end - start, start)
        if len(block) != end - start:
            raise ExportError(f"{tar_uri} ended early reading bytes {start}..{end}")
        for record in records[index:last]:
            offset = record["image_offset"] - start
            yield block[offset:offset + record["image_bytes"]]
        index = last


def _range_end(record: dict, tar_uri: str, tar_size: int) -> int:
    offset, size = record["image_offset"], record["image_bytes"]
    if offset is None or size is None or offset < 0 or size < 0 or offset + size > tar_size:
        raise ExportError(f"uid {record['uid']}: image range {offset}+{size} lies outside {tar_uri} ({tar_size} bytes)")
    return offset + size
