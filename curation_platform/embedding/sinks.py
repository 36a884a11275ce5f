"""Where embeddings go: LanceDB in production, Arrow files or nowhere for measuring.

Every sink writes one (shard, teacher) at a time and makes it visible in one step: rows are
staged (in a local Arrow IPC file, so memory stays bounded) and committed at the end. A run killed
mid-shard therefore leaves the previous state untouched, and a retry replaces exactly that shard's
rows for that teacher: no duplicates, no leftovers.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from curation_platform import storage
from curation_platform.storage import S3Settings

EMBEDDINGS_TABLE = "embeddings"


def embedding_schema(dim: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("teacher_id", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("image_embedding", vector, nullable=False),
            pa.field("text_embedding", vector, nullable=False),
        ]
    )


def record_batch(uids: list[str], teacher_id: str, shard: str, images: np.ndarray, texts: np.ndarray) -> pa.RecordBatch:
    """Rows of the embeddings schema from float32 (N, d) arrays."""
    dim = images.shape[1]
    vector = pa.list_(pa.float32(), dim)
    return pa.record_batch(
        {
            "uid": pa.array(uids, pa.string()),
            "teacher_id": pa.array([teacher_id] * len(uids), pa.string()),
            "shard": pa.array([shard] * len(uids), pa.string()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(images.astype(np.float32).ravel()), dim)
            .cast(vector),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(texts.astype(np.float32).ravel()), dim)
            .cast(vector),
        }
    )


@dataclass(frozen=True)
class CommitInfo:
    rows: int
    location: str
    version: int | None = None


class EmbeddingSink(Protocol):
    """Opens a writer for one (shard, teacher); the context commits on success only and then
    sets ``last_commit``."""

    last_commit: CommitInfo | None

    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Any: ...


class _StagedWriter:
    """Rows of one shard staged in a temporary Arrow IPC file on local disk."""

    def __init__(self, schema: pa.Schema) -> None:
        handle, path = tempfile.mkstemp(prefix="embeddings-", suffix=".arrow")
        os.close(handle)
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(str(self.path), schema)

    def write(self, batch: pa.RecordBatch) -> None:
        assert self._writer is not None, "staged rows are already closed"
        self._writer.write_batch(batch.cast(self.schema) if batch.schema != self.schema else batch)
        self.rows += batch.num_rows

    def reader(self) -> pa.RecordBatchReader:
        """Stream the staged rows back (callable again for a retried commit)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        source = pa.ipc.open_file(pa.memory_map(str(self.path)))
        batches = (source.get_batch(i) for i in range(source.num_record_batches))
        return pa.RecordBatchReader.from_batches(self.schema, batches)

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.path.unlink(missing_ok=True)


class NullSink:
    """Counts rows and drops them: measures the engine without any storage cost."""

    def __init__(self) -> None:
        self.rows = 0
        self.last_commit: CommitInfo | None = None

    @contextmanager
    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Iterator[NullSink]:
        before = self.rows
        yield self
        self.last_commit = CommitInfo(rows=self.rows - before, location="null")

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows


class ArrowSink:
    """``<root>/<teacher_id>/<shard>.arrow`` files, replaced atomically per shard."""

    def __init__(self, root: str, s3: S3Settings | None = None) -> None:
        self.root = root
        self.s3 = s3
        self.last_commit: CommitInfo | None = None

    def path(self, shard: str, teacher_id: str) -> str:
        return storage.join(self.root, teacher_id, f"{shard}.arrow")

    @contextmanager
    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Iterator[_StagedWriter]:
        staged = _StagedWriter(embedding_schema(dim))
        try:
            yield staged
            staged.reader()  # closes the IPC file so its bytes are complete
            storage.write_bytes_atomic(self.path(shard, teacher_id), staged.path.read_bytes(), self.s3)
            self.last_commit = CommitInfo(rows=staged.rows, location=self.path(shard, teacher_id))
        finally:
            staged.discard()


class LanceSink:
    """The ``embeddings`` table of a LanceDB database (local path or ``s3://``).

    One commit per shard: ``merge_insert`` on the primary key (uid, teacher_id) updates and inserts
    the staged rows and deletes the shard's rows for that teacher that are not in them. Writers of
    different shards may commit at once (from different processes or machines); a commit conflict
    is retried with jittered backoff.
    """

    def __init__(self, uri: str, table: str = EMBEDDINGS_TABLE, s3: S3Settings | None = None,
                 max_attempts: int = 8) -> None:
        self.uri = uri
        self.table_name = table
        self.s3 = s3
        self.max_attempts = max_attempts
        self.last_commit: CommitInfo | None = None

    def connect(self) -> Any:
        import lancedb

        if storage.is_s3(self.uri):
            return lancedb.connect(self.uri, storage_options=(self.s3 or S3Settings.from_env()).storage_options())
        return lancedb.connect(self.uri)

    def open_table(self, dim: int) -> Any:
        """Open (or create) the table, checking that its vectors have this teacher's dimension."""
        database = self.connect()
        schema = embedding_schema(dim)
        try:
            table = database.open_table(self.table_name)
        except (FileNotFoundError, ValueError):
            try:
                table = database.create_table(self.table_name, schema=schema)
                table.set_unenforced_primary_key(["uid", "teacher_id"])
            except (OSError, ValueError, RuntimeError):
                table = database.open_table(self.table_name)  # another writer created it first
        existing = table.schema.field("image_embedding").type
        if existing != schema.field("image_embedding").type:
            raise ValueError(
                f"LanceDB table {self.table_name!r} holds {existing} vectors, this teacher makes {dim}-d ones: "
                "give this teacher its own table name"
            )
        return table

    def read_shard(self, shard: str, teacher_id: str, dim: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's rows for one teacher (a fresh handle, so other writers' commits are seen)."""
        condition = f"shard = {_sql_string(shard)} AND teacher_id = {_sql_string(teacher_id)}"
        return self.open_table(dim).to_lance().to_table(columns=columns, filter=condition)

    @contextmanager
    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Iterator[_StagedWriter]:
        staged = _StagedWriter(embedding_schema(dim))
        try:
            yield staged
            self.last_commit = self._commit(shard, teacher_id, dim, staged)
        finally:
            staged.discard()

    def _commit(self, shard: str, teacher_id: str, dim: int, staged: _StagedWriter) -> CommitInfo:
        condition = f"shard = {_sql_string(shard)} AND teacher_id = {_sql_string(teacher_id)}"
        for attempt in range(1, self.max_attempts + 1):
            table = self.open_table(dim)
            try:
                (
                    table.merge_insert(["uid", "teacher_id"])
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .when_not_matched_by_source_delete(condition)
                    .execute(staged.reader())
                )
                return CommitInfo(rows=staged.rows, location=f"{self.uri}/{self.table_name}", version=table.version)
            except (OSError, RuntimeError, ValueError) as error:
                if attempt == self.max_attempts or not _is_conflict(error):
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")


def _is_conflict(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("conflict", "retryable", "concurrent", "precondition", "already exists"))


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
