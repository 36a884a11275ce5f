"""Shard ingestion: every sample a shard mentions becomes an accepted row or a quarantine row.

The parquet (one row per attempted sample) is joined with the tar's samples by key while the tar
streams past. Structure and identity checks run in the main process in stream order; image
decoding and caption checks fan out to worker processes in bounded batches, so memory is bounded
by ``batch_size x workers`` samples whatever the shard size, and results keep stream order.

uids: DataComp's 32-hex ``uid`` (KEY.json or parquet) when present; otherwise
``sha256("curation-platform:uid:v1\\0" + shard name + "\\0" + key)[:32]``, stable across re-runs
and independent of content, so fixing a caption does not change a sample's identity.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.pool import ShardRef, partition_key_for
from curation_platform.processes import worker_context
from curation_platform.reasons import Reason
from curation_platform.shard_reader import TarReadSummary, TarSample, UnsafeEntry, iter_tar_samples
from curation_platform.storage import S3Settings
from curation_platform.validation import ContentOk, ContentRejected, ValidationLimits, check_content

UID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_PARQUET_COLUMNS = ("key", "uid", "url", "status", "error_message", "original_width", "original_height")

ACCEPTED_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("aspect_ratio", pa.float32(), nullable=False),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("image_format", pa.string(), nullable=False),
        pa.field("image_member", pa.string(), nullable=False),
        pa.field("image_offset", pa.int64(), nullable=False),
        pa.field("image_bytes", pa.int64(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("exif_transposed", pa.bool_(), nullable=False),
        pa.field("caption_chars", pa.int32(), nullable=False),
        pa.field("caption_words", pa.int32(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("language_score", pa.float32(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("members", pa.list_(pa.string()), nullable=False),
    ]
)


def derive_uid(shard_name: str, key: str) -> str:
    return hashlib.sha256(f"curation-platform:uid:v1\0{shard_name}\0{key}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ShardReport:
    """Per-shard accounting: ``accepted + quarantined == total`` samples the shard mentions."""

    shard: str
    shard_id: str
    checksum: str
    total: int
    accepted: int
    quarantined: int
    by_reason: dict[str, int]
    parquet_rows: int | None
    tar_samples: int
    ignored_members: int
    tar_directories: int
    errors: list[str]
    bytes_read: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.total if self.total else 0.0


@dataclass
class ShardIngestion:
    report: ShardReport
    accepted: pa.Table
    quarantine: pa.Table


@dataclass
class _Rows:
    """Accepted and quarantined rows tagged with the sample's stream position."""

    accepted: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    quarantine: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    next_seq: int = 0

    def seq(self) -> int:
        self.next_seq += 1
        return self.next_seq

    def reject(self, seq: int, base: dict[str, Any], reason: Reason, detail: str, members: list[str]) -> None:
        row = {"uid": base["uid"], "key": base["key"], "shard": base["shard"], "shard_id": base["shard_id"]}
        self.quarantine.append((seq, {**row, "reason": reason.value, "detail": detail, "members": members}))

    def table(self, which: str, schema: pa.Schema) -> pa.Table:
        rows = [row for _, row in sorted(getattr(self, which), key=lambda item: item[0])]
        return pa.Table.from_pylist(rows, schema=schema)


def _content_batch(
    items: list[tuple[int, bytes | None, bytes | None]], limits: ValidationLimits
) -> list[tuple[int, ContentOk | ContentRejected]]:
    """Worker entry point: check a batch of (seq, image, caption)."""
    return [(seq, check_content(image, caption, limits)) for seq, image, caption in items]


def _read_parquet_rows(shard: ShardRef, s3: S3Settings | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    if shard.parquet is None:
        return None, None
    try:
        fs, path = storage.filesystem_for(shard.parquet.uri, s3)
        schema_names = set(pq.read_schema(path, filesystem=fs).names)
        if "key" not in schema_names:
            return None, "parquet has no 'key' column"
        columns = [name for name in _PARQUET_COLUMNS if name in schema_names]
        return pq.read_table(path, filesystem=fs, columns=columns).to_pylist(), None
    except (OSError, pa.ArrowException) as error:
        return None, f"parquet unreadable: {type(error).__name__}: {error}"


def make_executor(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for image decoding (see :mod:`curation_platform.processes`)."""
    if workers <= 0:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=worker_context())


def ingest_shard(
    shard: ShardRef,
    *,
    s3: S3Settings | None = None,
    limits: ValidationLimits = ValidationLimits(),
    executor: Executor | None = None,
    batch_size: int = 64,
    batches_in_flight: int = 4,
) -> ShardIngestion:
    """Validate one shard; ``executor`` (see :func:`make_executor`) parallelises decoding.

    At most ``batches_in_flight`` batches of ``batch_size`` samples wait on the workers.
    """
    started = time.perf_counter()
    rows = _Rows()
    errors: list[str] = []
    reasons: Counter[str] = Counter()

    parquet_rows, parquet_error = _read_parquet_rows(shard, s3)
    if parquet_error:
        errors.append(parquet_error)
    by_key: dict[str, dict[str, Any]] = {}
    seen_uids: set[str] = set()
    seen_keys: set[str] = set()
    base = {"shard": shard.name, "shard_id": shard.shard_id}

    for row in parquet_rows or []:
        key = str(row.get("key") or "")
        if key in by_key or not key:
            seq = rows.seq()
            uid = derive_uid(shard.name, f"parquet-row:{seq}:{key}")
            detail = "parquet row without key" if not key else "key appears twice in the parquet"
            rows.reject(seq, {**base, "uid": uid, "key": key}, Reason.DUPLICATE_KEY, detail, [])
            continue
        by_key[key] = row

    in_flight: deque[Future] = deque()
    batch: list[tuple[int, bytes | None, bytes | None]] = []
    pending: dict[int, dict[str, Any]] = {}

    def collect(results: list[tuple[int, ContentOk | ContentRejected]]) -> None:
        for seq, result in results:
            sample = pending.pop(seq)
            if isinstance(result, ContentRejected):
                rows.reject(seq, sample, result.reason, result.detail, sample["members"])
                continue
            aspect = max(result.width, result.height) / min(result.width, result.height)
            accepted = {name: sample[name] for name in ("uid", "key", "shard", "shard_id", "url")}
            accepted |= {
                "original_width": sample["original_width"],
                "original_height": sample["original_height"],
                "image_member": sample["image_member"],
                "image_offset": sample["image_offset"],
                "aspect_ratio": aspect,
                **asdict(result),
            }
            rows.accepted.append((seq, accepted))

    def flush(limit: int) -> None:
        nonlocal batch
        if batch:
            if executor is None:
                collect(_content_batch(batch, limits))
            else:
                in_flight.append(executor.submit(_content_batch, batch, limits))
            batch = []
        while len(in_flight) > limit:
            collect(in_flight.popleft().result())

    summary = TarReadSummary()
    tar_samples = ignored_members = 0
    if shard.tar is None:
        errors.append("shard has no tar file")
    else:
        with storage.open_input(shard.tar.uri, s3) as stream:
            for item in iter_tar_samples(stream, summary, limits):
                seq = rows.seq()
                if isinstance(item, UnsafeEntry):
                    unsafe = {**base, "uid": derive_uid(shard.name, f"member:{item.name}"), "key": item.name}
                    rows.reject(seq, unsafe, item.reason, item.detail, [item.name])
                    continue
                tar_samples += 1
                ignored_members += item.ignored_members
                sample = _identify(item, by_key, parquet_rows is not None, parquet_error, shard, seen_keys, seen_uids)
                if isinstance(sample, tuple):
                    reason, detail, uid = sample
                    rows.reject(seq, {**base, "uid": uid, "key": item.key}, reason, detail, item.member_names)
                    continue
                pending[seq] = {**base, **sample}
                batch.append((seq, item.payloads.get("image"), item.payloads.get("txt")))
                if len(batch) >= batch_size:
                    flush(limit=batches_in_flight)
        flush(limit=0)
        if summary.error:
            errors.append(f"tar unreadable past byte {summary.bytes_read}: {summary.error}")
        elif shard.tar_sha256 and summary.sha256 != shard.tar_sha256:
            errors.append("tar content changed since discovery (sha256 differs); re-discover the pool")

    tar_note = f"; tar error: {summary.error}" if summary.error else ""
    for key, row in by_key.items():
        if key in seen_keys:
            continue
        seq = rows.seq()
        uid = row.get("uid") if UID_PATTERN.match(str(row.get("uid") or "")) else derive_uid(shard.name, key)
        status = row.get("status") or "success"
        if status != "success":
            detail = f"status {status!r}: {row.get('error_message') or 'no error message'}"
            rows.reject(seq, {**base, "uid": uid, "key": key}, Reason.NOT_DOWNLOADED, detail, [])
        else:
            detail = "parquet says success but the tar has no members for this key" + tar_note
            rows.reject(seq, {**base, "uid": uid, "key": key}, Reason.MISSING_MEMBER, detail, [])

    accepted = rows.table("accepted", ACCEPTED_SCHEMA)
    quarantine = rows.table("quarantine", QUARANTINE_SCHEMA)
    reasons.update(quarantine.column("reason").to_pylist())
    report = ShardReport(
        shard=shard.name,
        shard_id=shard.shard_id,
        checksum=shard.checksum,
        total=accepted.num_rows + quarantine.num_rows,
        accepted=accepted.num_rows,
        quarantined=quarantine.num_rows,
        by_reason=dict(sorted(reasons.items())),
        parquet_rows=len(parquet_rows) if parquet_rows is not None else None,
        tar_samples=tar_samples,
        ignored_members=ignored_members,
        tar_directories=summary.directories,
        errors=errors,
        bytes_read=summary.bytes_read,
        seconds=round(time.perf_counter() - started, 3),
    )
    return ShardIngestion(report=report, accepted=accepted, quarantine=quarantine)


def _identify(
    item: TarSample,
    by_key: dict[str, dict[str, Any]],
    has_parquet: bool,
    parquet_error: str | None,
    shard: ShardRef,
    seen_keys: set[str],
    seen_uids: set[str],
) -> dict[str, Any] | tuple[Reason, str, str]:
    """Resolve key, parquet row and uid of a tar sample, or say why it is quarantined."""
    fallback_uid = derive_uid(shard.name, item.key)
    if item.key in seen_keys:
        return Reason.DUPLICATE_KEY, "key appeared earlier in the tar", derive_uid(shard.name, f"dup:{item.key}")
    seen_keys.add(item.key)
    row = by_key.get(item.key)
    if item.problem:
        reason, detail = item.problem
        return reason, detail, _row_uid(row) or fallback_uid
    if parquet_error:
        return Reason.MISSING_PARQUET_ROW, parquet_error, fallback_uid
    if has_parquet and row is None:
        return Reason.MISSING_PARQUET_ROW, "no parquet row for this key", fallback_uid

    meta: dict[str, Any] = {}
    if "json" in item.payloads:
        try:
            meta = json.loads(item.payloads["json"])
        except (ValueError, UnicodeDecodeError) as error:
            return Reason.INVALID_JSON, f"KEY.json: {error}", _row_uid(row) or fallback_uid
        if not isinstance(meta, dict):
            return Reason.INVALID_JSON, "KEY.json is not an object", _row_uid(row) or fallback_uid

    candidates = {source: str(value) for source, value in (("json", meta.get("uid")), ("parquet", (row or {}).get("uid"))) if value}
    for source, value in candidates.items():
        if not UID_PATTERN.match(value):
            return Reason.INVALID_UID, f"{source} uid {value[:64]!r} is not 32 lowercase hex digits", fallback_uid
    if len(set(candidates.values())) > 1:
        return Reason.UID_CONFLICT, f"json uid {candidates['json']} != parquet uid {candidates['parquet']}", fallback_uid
    uid = next(iter(candidates.values()), fallback_uid)
    if uid in seen_uids:
        return Reason.DUPLICATE_UID, f"uid {uid} already used in this shard", derive_uid(shard.name, f"dup:{item.key}")
    seen_uids.add(uid)

    source = row or meta
    return {
        "uid": uid,
        "key": item.key,
        "url": source.get("url"),
        "original_width": _int_or_none(source.get("original_width")),
        "original_height": _int_or_none(source.get("original_height")),
        "image_member": f"{item.key}.{item.image_ext}" if item.image_ext else "",
        "image_offset": item.offsets.get("image", -1),
        "members": item.member_names,
    }


def _row_uid(row: dict[str, Any] | None) -> str | None:
    uid = str((row or {}).get("uid") or "")
    return uid if UID_PATTERN.match(uid) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def ingest_pool(
    shards: list[ShardRef],
    *,
    s3: S3Settings | None = None,
    limits: ValidationLimits = ValidationLimits(),
    workers: int = 0,
) -> Iterator[ShardIngestion]:
    """Ingest shards one after another, sharing one pool of decode workers."""
    executor = make_executor(workers)
    try:
        for shard in shards:
            yield ingest_shard(shard, s3=s3, limits=limits, executor=executor)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def output_paths(out_uri: str, shard_name: str) -> dict[str, str]:
    """Where :func:`write_ingestion` puts a shard's files."""
    name = partition_key_for(shard_name)
    return {
        "samples": storage.join(out_uri, "samples", f"{name}.parquet"),
        "quarantine": storage.join(out_uri, "quarantine", f"{name}.parquet"),
        "report": storage.join(out_uri, "reports", f"{name}.json"),
    }


def read_accepted(out_uri: str, shard: ShardRef, s3: S3Settings | None = None) -> pa.Table:
    """The accepted samples ingestion wrote for ``shard``; refuses outputs of another shard version."""
    path = output_paths(out_uri, shard.name)["samples"]
    if not storage.exists(path, s3):
        raise FileNotFoundError(f"shard {shard.name} has not been ingested into {out_uri}")
    filesystem, local = storage.filesystem_for(path, s3)
    table = pq.read_table(local, filesystem=filesystem)
    if table.num_rows and set(table.column("shard_id").to_pylist()) != {shard.shard_id}:
        raise ValueError(f"{path} was validated from another version of shard {shard.name}: re-ingest it")
    return table


def write_ingestion(ingestion: ShardIngestion, out_uri: str, s3: S3Settings | None = None) -> dict[str, str]:
    """Write ``samples/``, ``quarantine/`` and ``reports/`` files for the shard, atomically.

    Files are named by the shard's partition key, so re-ingesting (also a replaced shard)
    overwrites exactly that shard's outputs: idempotent, no leftovers.
    """
    paths = output_paths(out_uri, ingestion.report.shard)
    storage.write_bytes_atomic(paths["samples"], _parquet_bytes(ingestion.accepted), s3)
    storage.write_bytes_atomic(paths["quarantine"], _parquet_bytes(ingestion.quarantine), s3)
    report = json.dumps(ingestion.report.to_dict(), indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(paths["report"], report, s3)
    return paths


def read_captions(out_uri: str, s3: S3Settings | None = None, uid_below: str | None = None) -> pa.Table:
    """uid and caption of every accepted sample under ``out_uri`` (or of those with ``uid < uid_below``)."""
    filesystem, local = storage.filesystem_for(storage.join(out_uri, "samples"), s3)
    condition = None if uid_below is None else ds.field("uid") < uid_below
    return ds.dataset(local, filesystem=filesystem, format="parquet").to_table(columns=["uid", "caption"],
                                                                             filter=condition)
