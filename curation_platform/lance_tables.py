"""LanceDB tables the platform writes: connect, create with a primary key, replace one partition.

Every per-shard table (embeddings, scores) is written the same way: one ``merge_insert`` on the
primary key that updates and inserts the new rows and deletes the partition's rows that are not
among them, so a commit replaces exactly one (shard, teacher) and nothing else. Writers of
different partitions may commit at once from different processes or machines (LanceDB commits by
conditional PUT on S3); a commit conflict is retried with jittered backoff.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from curation_platform import storage
from curation_platform.storage import S3Settings


def connect(uri: str, s3: S3Settings | None = None) -> Any:
    import lancedb

    if storage.is_s3(uri):
        return lancedb.connect(uri, storage_options=(s3 or S3Settings.from_env()).storage_options())
    return lancedb.connect(uri)


def with_primary_key(schema: pa.Schema, primary_key: Sequence[str]) -> pa.Schema:
    """Mark the key columns (non-nullable) as Lance's unenforced primary key, in order."""
    fields = []
    for field in schema:
        if field.name in primary_key:
            metadata = {**(field.metadata or {}), b"lance-schema:unenforced-primary-key": b"true",
                        b"lance-schema:unenforced-primary-key:position": str(primary_key.index(field.name)).encode()}
            field = field.with_nullable(False).with_metadata(metadata)
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def open_or_create(database: Any, name: str, schema: pa.Schema, primary_key: Sequence[str]) -> Any:
    """Open ``name``, creating it when absent with the primary key in its very first version.

    The key must be there from version 1: a writer that commits against a version without it gets
    no duplicate detection, and concurrent ``merge_insert`` of the same keys then duplicates rows.
    """
    try:
        return database.open_table(name)
    except (FileNotFoundError, ValueError):
        try:
            return database.create_table(name, schema=with_primary_key(schema, list(primary_key)))
        except (OSError, ValueError, RuntimeError):
            return database.open_table(name)  # another writer created it first


SAME_SHARD = "target.shard = source.shard"


def replace_partition(
    open_table: Callable[[], Any],
    primary_key: Sequence[str],
    condition: str,
    rows: Callable[[], pa.RecordBatchReader],
    max_attempts: int = 8,
    update_only_where: str | None = SAME_SHARD,
) -> int:
    """Make the rows matching ``condition`` exactly ``rows()``; returns the committed table version.

    ``open_table`` and ``rows`` are called again on every attempt (a fresh handle sees the other
    writers' commits; a reader can be consumed once). A matched row is only overwritten where
    ``update_only_where`` holds: by default a shard never takes over another shard's rows (the same
    uids in two shards), so such rows stay missing from the second shard, where its check sees them.
    """
    for attempt in range(1, max_attempts + 1):
        table = open_table()
        try:
            (
                table.merge_insert(list(primary_key))
                .when_matched_update_all(where=update_only_where)
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(condition)
                .execute(rows())
            )
            return int(table.version)
        except (OSError, RuntimeError, ValueError) as error:
            if attempt == max_attempts or not _is_conflict(error):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def partition_condition(shard: str, teacher_id: str) -> str:
    return f"shard = {sql_string(shard)} AND teacher_id = {sql_string(teacher_id)}"


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _is_conflict(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("conflict", "retryable", "concurrent", "precondition", "already exists"))


def index_column(table: Any, column: str, index_type: str = "BITMAP") -> bool:
    """Make equality filters on ``column`` an index lookup (a release reads the scores table one shard at a
    time: without the index each shard's read scans the whole table). Rows written since the index was
    built are indexed again; returns whether the index changed. A commit conflict with a concurrent
    writer leaves the index as it was: filters stay correct, only slower."""
    indices = [index for index in table.list_indices() if list(index.columns) == [column]]
    if indices and not table.index_stats(indices[0].name).num_unindexed_rows:
        return False
    try:
        table.create_scalar_index(column, index_type=index_type, replace=True)
    except (OSError, RuntimeError, ValueError) as error:
        if not _is_conflict(error):
            raise
        return False
    return True

