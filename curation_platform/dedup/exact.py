"""Exact duplicates: the same image bytes (``image_sha256``) or the same normalised caption, pool-wide.

The :class:`ExactDuplicateIndex` is a folder (local or ``s3://``) holding one parquet file per
ingested shard, ``<partition key>.parquet``, with that shard's ``(uid, shard, image_sha256,
caption_key)`` rows sorted by uid. There is no global file: indexing a shard writes (or replaces)
exactly its own file, so shards can be indexed one at a time, in any order, and re-indexed.

* :meth:`ExactDuplicateIndex.groups` scans every shard file lazily with polars and returns every
  member of every hash shared by two or more rows; the group id is the hash itself (the image's
  sha256, or the caption key), so it is stable however and whenever shards arrive.
* :meth:`ExactDuplicateIndex.duplicates_of` answers, for a shard not yet (or about to be re-)
  indexed, which already indexed samples it repeats, reading only the index's hash columns.

Near duplicates (re-encoded, cropped, reworded) are out of scope here: they share no hash.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.pool import partition_key_for
from curation_platform.storage import S3Settings

DuplicateKind = Literal["image", "caption"]
DUPLICATE_KINDS: tuple[DuplicateKind, ...] = ("image", "caption")
_HASH_COLUMN: dict[str, str] = {"image": "image_sha256", "caption": "caption_key"}

INDEX_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("caption_key", pa.string()),  # null when the caption normalises to ""
    ]
)
GROUPS_SCHEMA = {"group_id": pl.String, "uid": pl.String, "shard": pl.String, "kind": pl.String}
MATCHES_SCHEMA = {"uid": pl.String, "matches_uid": pl.String, "kind": pl.String}
_INDEX_SUFFIX = ".parquet"

Samples = pa.Table | pl.DataFrame


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def normalise_caption(text: str) -> str:
    """The form under which two captions count as the same text.

    In order: Unicode NFKC (compatibility forms such as full-width letters, ligatures and
    non-breaking spaces become their plain equivalents), ``str.casefold`` (case-insensitive,
    also for ``ß`` -> ``ss``), every run of whitespace collapsed to one ASCII space, and
    punctuation (Unicode categories ``P*``) and whitespace stripped from both ends. Punctuation
    inside the text is kept: ``"A red circle."`` and ``"a  RED circle"`` are the same caption,
    ``"a red, circle"`` is another. Returns ``""`` for a caption of only punctuation/whitespace.
    """
    collapsed = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, stop = 0, len(collapsed)
    while start < stop and _is_edge_junk(collapsed[start]):
        start += 1
    while stop > start and _is_edge_junk(collapsed[stop - 1]):
        stop -= 1
    return collapsed[start:stop]


def caption_key(text: str | None) -> str | None:
    """sha256 (hex) of the UTF-8 :func:`normalise_caption` form; ``None`` if that form is empty."""
    if text is None:
        return None
    normalised = normalise_caption(text)
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest() if normalised else None


def index_rows(shard: str, samples: Samples) -> pa.Table:
    """The index rows of one shard's validated samples (needs ``uid``, ``image_sha256``, ``caption``;
    a ``shard`` column, if present, must name ``shard``), sorted by uid."""
    table = samples.to_arrow() if isinstance(samples, pl.DataFrame) else samples
    missing = {"uid", "image_sha256", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(f"samples of shard {shard!r} lack column(s) {sorted(missing)}")
    if "shard" in table.column_names:
        others = set(table.column("shard").to_pylist()) - {shard}
        if others:
            raise ValueError(f"samples given for shard {shard!r} belong to shard(s) {sorted(others)}")
    uids = [str(uid) for uid in table.column("uid").to_pylist()]
    if len(set(uids)) != len(uids):
        raise ValueError(f"samples of shard {shard!r} repeat a uid")
    hashes = table.column("image_sha256").to_pylist()
    keys = [caption_key(caption) for caption in table.column("caption").to_pylist()]
    order = sorted(range(len(uids)), key=uids.__getitem__)
    return pa.table(
        {
            "uid": [uids[i] for i in order],
            "shard": [shard] * len(order),
            "image_sha256": [hashes[i] for i in order],
            "caption_key": [keys[i] for i in order],
        },
        schema=INDEX_SCHEMA,
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class ExactDuplicateIndex:
    """Per-shard hash files under ``uri`` (see the module docstring); ``s3`` for ``s3://`` folders."""

    def __init__(self, uri: str, s3: S3Settings | None = None) -> None:
        self.uri = uri
        self.s3 = s3

    def shard_file(self, shard: str) -> str:
        return storage.join(self.uri, partition_key_for(shard) + _INDEX_SUFFIX)

    def files(self) -> list[str]:
        """Every shard file of the index, sorted by name ([] for an index not yet written)."""
        if not storage.exists(self.uri, self.s3):
            return []
        return [entry.uri for entry in storage.list_files(self.uri, self.s3) if entry.uri.endswith(_INDEX_SUFFIX)]

    def add_shard(self, shard: str, samples: Samples) -> str:
        """Index (or re-index, replacing its file) one shard's validated samples; returns the file's URI.

        The file's bytes depend only on the shard's rows, and an unchanged file is not rewritten.
        """
        uri = self.shard_file(shard)
        data = _parquet_bytes(index_rows(shard, samples))
        if storage.exists(uri, self.s3) and storage.read_bytes(uri, self.s3) == data:
            return uri
        storage.write_bytes_atomic(uri, data, self.s3)
        return uri

    def _scan(self, files: Sequence[str]) -> pl.LazyFrame:
        """Polars reads local files and S3 itself; any other store through the index's own filesystem."""
        if not storage.is_local(self.uri) and not storage.is_s3(self.uri):
            filesystem, _ = storage.filesystem_for(self.uri, self.s3)
            paths = [storage.filesystem_for(uri, self.s3)[1] for uri in files]
            return pl.scan_pyarrow_dataset(ds.dataset(paths, filesystem=filesystem, format="parquet"))
        options = None
        if storage.is_s3(self.uri):
            options = (self.s3 or S3Settings.from_env()).storage_options()
        return pl.scan_parquet(list(files), storage_options=options, hive_partitioning=False)

    def groups(self, kind: DuplicateKind) -> pl.DataFrame:
        """Every member of every exact-duplicate group of ``kind`` (``"image"``: same ``image_sha256``;
        ``"caption"``: same normalised caption) with two or more members, across all indexed shards.

        Columns ``group_id`` (the shared hash), ``uid``, ``shard``, ``kind``; no member is singled out
        as the representative. Sorted by (group_id, shard, uid), so the result does not depend on the
        order in which shards were indexed.
        """
        column = _hash_column(kind)
        files = self.files()
        if not files:
            return pl.DataFrame(schema=GROUPS_SCHEMA)
        return (
            self._scan(files)
            .select("uid", "shard", pl.col(column).alias("group_id"))
            .filter(pl.col("group_id").is_not_null())
            .filter(pl.len().over("group_id") >= 2)
            .select("group_id", "uid", "shard", pl.lit(kind, dtype=pl.String).alias("kind"))
            .sort("group_id", "shard", "uid")
            .collect()
        )

    def duplicates_of(self, shard: str, samples: Samples) -> pl.DataFrame:
        """The already indexed samples that a new shard's samples repeat, as ``(uid, matches_uid, kind)``.

        Only the other shards' index files are read (their ``uid`` and hash columns), never their
        validated samples; the shard's own file, if it was indexed before, is left out, so the answer
        is the same before and after :meth:`add_shard`. Repeats within the new shard are not listed
        here (they appear in :meth:`groups` once it is indexed). Sorted by (uid, kind, matches_uid).
        """
        new = pl.from_arrow(index_rows(shard, samples))
        assert isinstance(new, pl.DataFrame)
        own = self.shard_file(shard)
        files = [uri for uri in self.files() if uri != own]
        if not files or new.is_empty():
            return pl.DataFrame(schema=MATCHES_SCHEMA)
        indexed = self._scan(files)
        found = []
        for kind in DUPLICATE_KINDS:
            column = _hash_column(kind)
            wanted = new.select("uid", column).drop_nulls(column)
            old = (
                indexed.select(pl.col("uid").alias("matches_uid"), column)
                .filter(pl.col(column).is_in(wanted.get_column(column).unique().implode()))
            )
            found.append(
                wanted.lazy()
                .join(old, on=column, how="inner")
                .select("uid", "matches_uid", pl.lit(kind, dtype=pl.String).alias("kind"))
            )
        return pl.concat(found).unique().sort("uid", "kind", "matches_uid").collect()


def _hash_column(kind: str) -> str:
    if kind not in _HASH_COLUMN:
        raise ValueError(f"duplicate kind must be one of {DUPLICATE_KINDS}, got {kind!r}")
    return _HASH_COLUMN[kind]
