"""Shard discovery for img2dataset / DataComp pools.

A pool is a directory or object-store prefix (any :mod:`curation_platform.storage` URI) of shards
``NAME.tar`` + ``NAME.parquet`` + ``NAME_stats.json`` (+ DataComp's optional ``NAME.npz``), whatever the
names (img2dataset's ``00000``, DataComp's ``00000000``); or a list of shard files, one shard's file or a
brace pattern as webdataset takes (``s3://bucket/pool/{00000..00127}.tar``). A shard's identity is its name plus a
sha256 over its files' contents, so a re-uploaded shard is noticed even when its name is reused.
Hashing streams each file once; :class:`ChecksumCache` remembers digests by (uri, size, mtime, and
on S3 the listing's ETag) so re-discovering an unchanged pool of millions of shards reads no shard
data at all. Ingestion records the resolved :class:`ShardRef` in its report, and later steps rebuild
it from there (:meth:`ShardRef.recorded`) instead of resolving the shard again; :data:`HASHED` counts
what hashing is left.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from curation_platform import storage
from curation_platform.storage import FileEntry, S3Settings

SHARD_FILE_SUFFIXES = {".tar": "tar", ".parquet": "parquet", "_stats.json": "stats", ".npz": "npz"}
PARTITION_KEY_PATTERN = re.compile(r"^[a-z0-9_-]{1,128}$")
_HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class ShardRef:
    """One shard of a pool: where its files are and what they contain (by checksum)."""

    name: str
    tar: FileEntry | None
    parquet: FileEntry | None
    stats: FileEntry | None
    npz: FileEntry | None
    checksum: str
    tar_sha256: str | None

    @property
    def shard_id(self) -> str:
        """Name plus a content-checksum prefix: changes when any shard file's bytes change."""
        return f"{self.partition_key}-{self.checksum[:16]}"

    @property
    def partition_key(self) -> str:
        return partition_key_for(self.name)

    @property
    def files(self) -> dict[str, FileEntry]:
        present = {"tar": self.tar, "parquet": self.parquet, "stats": self.stats, "npz": self.npz}
        return {kind: entry for kind, entry in present.items() if entry is not None}

    def records(self) -> dict[str, dict[str, Any]]:
        """Each file's listing (uri, size, mtime_ns, etag) by kind, as ingestion reports record it."""
        return {kind: asdict(entry) for kind, entry in self.files.items()}

    @classmethod
    def recorded(cls, name: str, checksum: str, tar_sha256: str | None,
                 records: dict[str, dict[str, Any]]) -> ShardRef:
        """The shard as :meth:`records` wrote it down: nothing is listed or hashed again."""
        entries = {kind: FileEntry(**records[kind]) if kind in records else None
                   for kind in SHARD_FILE_SUFFIXES.values()}
        return cls(name=name, checksum=checksum, tar_sha256=tar_sha256, **entries)


def partition_key_for(shard_name: str) -> str:
    """A Dagster-safe partition key (``[a-z0-9_-]``) for a shard name; raises if none exists."""
    key = re.sub(r"[^a-z0-9_-]", "_", shard_name.lower())
    if not PARTITION_KEY_PATTERN.match(key):
        raise ValueError(f"shard name {shard_name!r} cannot be made into a partition key")
    return key


class ChecksumCache:
    """A small SQLite map (uri, size, mtime_ns, etag) -> sha256, shared by discovery runs.

    The ETag (S3 listings; empty for local files) is part of the key, so an object re-uploaded within
    the listing's mtime resolution, or with the same size, is hashed again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS checksums ("
                " uri TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " sha256 TEXT NOT NULL, etag TEXT NOT NULL DEFAULT '', PRIMARY KEY (uri, size, mtime_ns))"
            )
            if "etag" not in {column[1] for column in db.execute("PRAGMA table_info(checksums)")}:
                db.execute("ALTER TABLE checksums ADD COLUMN etag TEXT NOT NULL DEFAULT ''")  # local rows stay valid

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, entry: FileEntry) -> str | None:
        if entry.mtime_ns is None:
            return None
        with self._lock, self._connect() as db:
            row = db.execute(
                "SELECT sha256 FROM checksums WHERE uri = ? AND size = ? AND mtime_ns = ? AND etag = ?",
                (entry.uri, entry.size, entry.mtime_ns, entry.etag or ""),
            ).fetchone()
        return row[0] if row else None

    def put(self, entry: FileEntry, sha256: str) -> None:
        if entry.mtime_ns is None:
            return
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO checksums (uri, size, mtime_ns, etag, sha256) VALUES (?, ?, ?, ?, ?)",
                (entry.uri, entry.size, entry.mtime_ns, entry.etag or "", sha256),
            )


def machine_checksum_cache() -> Path:
    """The checksum cache of a remote (``s3://``, ``gs://``, ...) home: a file on this machine, ``$XDG_CACHE_HOME`` (else
    ``~/.cache``) ``/curation_platform/checksums.sqlite``, keyed by what the S3 listing says.

    Not next to the home on S3: SQLite needs a local file with working locks, and an object store has
    neither in-place writes nor locks, so copies uploaded by concurrent runs would drop each other's
    entries. A cache per machine costs at most one hash per shard file on each machine: the discovery
    sensor's daemon then reads no shard data per tick, a run on a fresh worker hashes only the shard it
    ingests, and later steps read the ingestion report instead (:meth:`ShardRef.recorded`).
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "curation_platform", "checksums.sqlite")


@dataclass(frozen=True)
class HashCount:
    """Files :func:`file_sha256` hashed and bytes it read; subtract two readings to count one step."""

    files: int = 0
    bytes_read: int = 0

    def __sub__(self, other: HashCount) -> HashCount:
        return HashCount(self.files - other.files, self.bytes_read - other.bytes_read)


class HashCounter:
    """What :func:`file_sha256` has done in this process: re-hashing a shard's tar (350 MB for a 10k-sample
    DataComp shard) is what resolving a shard once saves, so runs report it and tests assert it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = HashCount()

    def add(self, bytes_read: int) -> None:
        with self._lock:
            self._count = HashCount(self._count.files + 1, self._count.bytes_read + bytes_read)

    def reading(self) -> HashCount:
        return self._count


HASHED = HashCounter()


def file_sha256(uri: str, s3: S3Settings | None = None) -> str:
    digest = hashlib.sha256()
    read = 0
    with storage.open_input(uri, s3, buffer_size=_HASH_BLOCK) as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
            read += len(block)
    HASHED.add(read)
    return digest.hexdigest()


def tar_unchanged(shard: ShardRef, s3: S3Settings | None = None) -> bool:
    """Whether the shard's tar still holds the bytes recorded for it: one listing request, and a hash only
    when its listing moved (a ``touch``, a re-upload). Samples are read at the offsets ingestion recorded,
    so a tar replaced since then must be re-ingested before anything reads it."""
    recorded = shard.tar
    if recorded is None:
        return True  # nothing to read, nothing changed
    directory, name = recorded.uri.rsplit("/", 1)
    current = next((entry for entry in storage.list_objects(directory, s3, name) if entry.uri == recorded.uri), None)
    if current is None or current.size != recorded.size:
        return False
    return current == recorded or file_sha256(current.uri, s3) == shard.tar_sha256


def _split_shard_file(file_name: str) -> tuple[str, str] | None:
    for suffix, kind in SHARD_FILE_SUFFIXES.items():
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)], kind
    return None


def _split_uri(uri: str) -> tuple[str, str]:
    """``(folder, file name)`` of a file URI; a bare relative name is in ``.``."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    return folder or ("/" if uri.startswith("/") else "."), name


def _named_files(pool_uri: str) -> list[str] | None:
    """The shard files a pool URI names one by one (a brace pattern, or one shard's file); None for a folder."""
    if "{" in pool_uri:
        return storage.expand_braces(pool_uri)
    return [pool_uri.rstrip("/")] if _split_shard_file(_split_uri(pool_uri)[1]) else None


def pool_exists(pool_uri: str, s3: S3Settings | None = None) -> bool:
    """Whether there is a pool yet: its folder, or any file its list names (discovery reports the others)."""
    named = _named_files(pool_uri)
    return storage.exists(pool_uri, s3) if named is None else any(storage.exists(uri, s3) for uri in named)


def shard_file_uri(pool_uri: str, shard: str, suffix: str = ".tar") -> str:
    """Where shard ``shard``'s ``suffix`` file is in the pool ``pool_uri``, however the pool is given
    (folder, one shard's file, brace pattern): what readers of recorded offsets open."""
    named = _named_files(pool_uri)
    if named is None:
        return storage.join(pool_uri, shard + suffix)
    for uri in named:
        folder, file_name = _split_uri(uri)
        split = _split_shard_file(file_name)
        if split is not None and split[0] == shard:
            return storage.join(folder, shard + suffix)
    raise FileNotFoundError(f"the pool {pool_uri} names no shard {shard!r}")


def _named_shards(pool_uri: str, named: list[str], s3: S3Settings | None) -> dict[str, dict[str, FileEntry]]:
    """The shards a list of shard files names, each with all its files (its tar names its parquet too). Each
    folder is listed once, under the names' common prefix; a named file that does not exist is an error."""
    wanted: dict[str, dict[str, dict[str, str]]] = {}  # folder -> shard name -> kind -> the URI named
    folders: dict[str, str] = {}
    for uri in named:
        folder, file_name = _split_uri(uri)
        split = _split_shard_file(file_name)
        if split is None:
            raise ValueError(f"{uri} (from {pool_uri}) is not a shard file: NAME.tar, NAME.parquet, "
                             "NAME_stats.json or NAME.npz")
        name, kind = split
        if folders.setdefault(name, folder) != folder:
            raise ValueError(f"{pool_uri} names shard {name!r} in both {folders[name]} and {folder}")
        wanted.setdefault(folder, {}).setdefault(name, {})[kind] = uri
    groups: dict[str, dict[str, FileEntry]] = {}
    missing: list[str] = []
    for folder, names in wanted.items():
        try:
            listed = _group_shard_files(storage.list_objects(folder, s3, os.path.commonprefix(list(names))))
        except FileNotFoundError:
            listed = {}
        for name, uris in names.items():
            missing += [uri for kind, uri in uris.items() if kind not in listed.get(name, {})]
            if name in listed:
                groups[name] = listed[name]
    if missing and len(named) == 1:
        raise FileNotFoundError(f"no shard at {pool_uri}")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of the {len(named)} shard files {pool_uri} names do not exist: "
                                f"{shown}")
    return groups


def _group_shard_files(entries: Iterable[FileEntry]) -> dict[str, dict[str, FileEntry]]:
    groups: dict[str, dict[str, FileEntry]] = {}
    for entry in entries:
        split = _split_shard_file(entry.uri.rsplit("/", 1)[-1])
        if split is not None:
            name, kind = split
            groups.setdefault(name, {})[kind] = entry
    # A stats or npz file alone is not a shard: a shard is mentioned by its tar or its parquet.
    return {name: files for name, files in groups.items() if "tar" in files or "parquet" in files}


def discover_shards(
    pool_uri: str,
    *,
    s3: S3Settings | None = None,
    checksum_cache: ChecksumCache | None = None,
    hash_threads: int = 8,
    on_shard: Callable[[ShardRef], None] | None = None,
) -> list[ShardRef]:
    """List a pool's shards (sorted by name) with content checksums.

    ``pool_uri`` may also name one shard's ``.tar`` (or ``.parquet``) file to address it alone, or list shard
    files with a brace pattern (``/data/{00000..00127}.tar``, ``{a,b}``); a listed file that does not exist
    raises :class:`FileNotFoundError` naming it.
    """
    named = _named_files(pool_uri)
    groups = (_group_shard_files(storage.list_objects(pool_uri, s3)) if named is None
              else _named_shards(pool_uri, named, s3))

    keys: dict[str, str] = {}
    for name in groups:
        key = partition_key_for(name)
        if key in keys:
            raise ValueError(f"shards {keys[key]!r} and {name!r} map to the same partition key {key!r}")
        keys[key] = name

    def digest(entry: FileEntry) -> str:
        cached = checksum_cache.get(entry) if checksum_cache else None
        if cached is None:
            cached = file_sha256(entry.uri, s3)
            if checksum_cache:
                checksum_cache.put(entry, cached)
        return cached

    def build(name: str) -> ShardRef:
        files = groups[name]
        digests = {kind: digest(entry) for kind, entry in sorted(files.items())}
        combined = hashlib.sha256("".join(f"{kind}:{sha}\n" for kind, sha in digests.items()).encode())
        shard = ShardRef(
            name=name,
            tar=files.get("tar"),
            parquet=files.get("parquet"),
            stats=files.get("stats"),
            npz=files.get("npz"),
            checksum=combined.hexdigest(),
            tar_sha256=digests.get("tar"),
        )
        if on_shard:
            on_shard(shard)
        return shard

    with ThreadPoolExecutor(max_workers=max(1, hash_threads)) as pool:
        return list(pool.map(build, sorted(groups)))
