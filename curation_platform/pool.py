"""Shard discovery for img2dataset / DataComp pools.

A pool is a directory or ``s3://`` prefix of shards ``NAME.tar`` + ``NAME.parquet`` +
``NAME_stats.json`` (+ DataComp's optional ``NAME.npz``). A shard's identity is its name plus a
sha256 over its files' contents, so a re-uploaded shard is noticed even when its name is reused.
Hashing streams each file once; :class:`ChecksumCache` remembers digests by (uri, size, mtime) so
re-discovering an unchanged pool of millions of shards reads no shard data at all.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


def partition_key_for(shard_name: str) -> str:
    """A Dagster-safe partition key (``[a-z0-9_-]``) for a shard name; raises if none exists."""
    key = re.sub(r"[^a-z0-9_-]", "_", shard_name.lower())
    if not PARTITION_KEY_PATTERN.match(key):
        raise ValueError(f"shard name {shard_name!r} cannot be made into a partition key")
    return key


class ChecksumCache:
    """A small SQLite map (uri, size, mtime_ns) -> sha256, shared by discovery runs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS checksums ("
                " uri TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " sha256 TEXT NOT NULL, PRIMARY KEY (uri, size, mtime_ns))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, entry: FileEntry) -> str | None:
        if entry.mtime_ns is None:
            return None
        with self._lock, self._connect() as db:
            row = db.execute(
                "SELECT sha256 FROM checksums WHERE uri = ? AND size = ? AND mtime_ns = ?",
                (entry.uri, entry.size, entry.mtime_ns),
            ).fetchone()
        return row[0] if row else None

    def put(self, entry: FileEntry, sha256: str) -> None:
        if entry.mtime_ns is None:
            return
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO checksums VALUES (?, ?, ?, ?)",
                (entry.uri, entry.size, entry.mtime_ns, sha256),
            )


def file_sha256(uri: str, s3: S3Settings | None = None) -> str:
    digest = hashlib.sha256()
    with storage.open_input(uri, s3, buffer_size=_HASH_BLOCK) as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _split_shard_file(file_name: str) -> tuple[str, str] | None:
    for suffix, kind in SHARD_FILE_SUFFIXES.items():
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)], kind
    return None


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

    ``pool_uri`` may also name one shard's ``.tar`` (or ``.parquet``) file to address it alone.
    """
    file_name = pool_uri.rstrip("/").rsplit("/", 1)[-1]
    only = _split_shard_file(file_name)
    directory = pool_uri.rstrip("/")[: -len(file_name) - 1] if only else pool_uri
    groups = _group_shard_files(storage.list_files(directory, s3))
    if only:
        groups = {only[0]: groups[only[0]]} if only[0] in groups else {}
        if not groups:
            raise FileNotFoundError(f"no shard at {pool_uri}")

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
