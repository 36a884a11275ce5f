"""Where embeddings go: LanceDB in production, Arrow files or nowhere for measuring.

Every sink writes one (shard, teacher) at a time and makes it visible in one step: rows are
staged (in a local Arrow IPC file, so memory stays bounded) and committed at the end. A run killed
mid-shard therefore leaves the previous state untouched, and a retry replaces exactly that shard's
rows for that teacher: no duplicates, no leftovers. Staging files carry their writer's pid, so the
next writer removes those of killed processes (:func:`remove_orphaned_staging`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from curation_platform import lance_tables, storage
from curation_platform.storage import S3Settings

EMBEDDINGS_TABLE = "embeddings"
PRIMARY_KEY = ("row_key",)
STAGING_PREFIX = "embeddings-"


def row_keys(teacher_id: str, uids: list[str]) -> list[str]:
    """The single-column primary key ``teacher_id/uid``: LanceDB detects concurrent writes of the same
    keys only for a single-column key (compound keys are not supported), so (uid, teacher) is fused."""
    return [f"{teacher_id}/{uid}" for uid in uids]


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list vector column as a float32 (rows, d) array."""
    values = table.column(column).combine_chunks()
    dim = table.schema.field(column).type.list_size  # explicit, so an empty table still reshapes
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), dim).astype(np.float32)


def embedding_schema(dim: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            pa.field("row_key", pa.string(), nullable=False),
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
            "row_key": pa.array(row_keys(teacher_id, uids), pa.string()),
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
    """What a shard's commit wrote: ``rows`` in the table afterwards; ``refused`` staged rows whose uid
    another shard's rows already hold (the table keeps the first shard's row)."""

    rows: int
    location: str
    version: int | None = None
    refused: int = 0


class EmbeddingSink(Protocol):
    """Opens a writer for one (shard, teacher); the context commits on success only and then
    sets ``last_commit``."""

    last_commit: CommitInfo | None

    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Any: ...


def staging_dir() -> Path:
    """Where staged shards live: one folder under ``$TMPDIR``, so a sweep lists only them."""
    folder = Path(tempfile.gettempdir()) / "curation-platform-staging"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def remove_orphaned_staging(folder: Path | None = None) -> list[Path]:
    """Delete staging files whose writer process no longer exists (a killed ``embed``)."""
    removed = []
    for path in (folder or staging_dir()).glob(f"{STAGING_PREFIX}*.arrow"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class _StagedWriter:
    """Rows of one shard staged in a temporary Arrow IPC file on local disk."""

    def __init__(self, schema: pa.Schema) -> None:
        folder = staging_dir()
        remove_orphaned_staging(folder)
        handle, path = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", suffix=".arrow", dir=folder)
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


class MemorySink:
    """Keeps committed shards in memory (small sets such as a NormSim target)."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], pa.Table] = {}
        self.last_commit: CommitInfo | None = None

    @contextmanager
    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Iterator[_StagedWriter]:
        staged = _StagedWriter(embedding_schema(dim))
        try:
            yield staged
            self.tables[(shard, teacher_id)] = staged.reader().read_all()
            self.last_commit = CommitInfo(rows=staged.rows, location="memory")
        finally:
            staged.discard()

    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables.values())


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

    One commit per shard through :func:`curation_platform.lance_tables.replace_partition` on the
    primary key ``row_key = teacher_id/uid``.
    """

    def __init__(self, uri: str, table: str = EMBEDDINGS_TABLE, s3: S3Settings | None = None,
                 max_attempts: int = 8) -> None:
        self.uri = uri
        self.table_name = table
        self.s3 = s3
        self.max_attempts = max_attempts
        self.last_commit: CommitInfo | None = None

    def open_table(self, dim: int) -> Any:
        """Open (or create) the table, checking that its vectors have this teacher's dimension."""
        schema = embedding_schema(dim)
        table = lance_tables.open_or_create(lance_tables.connect(self.uri, self.s3), self.table_name, schema,
                                            PRIMARY_KEY)
        existing = table.schema.field("image_embedding").type
        if existing != schema.field("image_embedding").type:
            raise ValueError(
                f"LanceDB table {self.table_name!r} holds {existing} vectors, this teacher makes {dim}-d ones: "
                "give this teacher its own table name"
            )
        return table

    def read_shard(self, shard: str, teacher_id: str, dim: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's rows for one teacher (a fresh handle, so other writers' commits are seen)."""
        condition = lance_tables.partition_condition(shard, teacher_id)
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
        condition = lance_tables.partition_condition(shard, teacher_id)
        version = lance_tables.replace_partition(lambda: self.open_table(dim), PRIMARY_KEY, condition,
                                                 staged.reader, self.max_attempts)
        committed = self.open_table(dim).count_rows(condition)
        return CommitInfo(rows=committed, location=f"{self.uri}/{self.table_name}", version=version,
                          refused=staged.rows - committed)
