"""Shard ingestion: every sample a shard mentions becomes an accepted row or a quarantine row.

The parquet (one row per attempted sample) is joined with the tar's samples by key while the tar
streams past. Structure and identity checks run in the main process in stream order; image
decoding and caption checks fan out to worker processes in bounded batches, so memory is bounded
by ``batch_size x workers`` samples whatever the shard size, and results keep stream order.

uids: DataComp's 32-hex ``uid`` (KEY.json or parquet) when present; otherwise
``sha256("curation-platform:uid:v1\\0" + shard name + "\\0" + key)[:32]``, stable across re-runs
and independent of content, so fixing a caption does not change a sample's identity. A uid that
another shard also accepts is kept once pool-wide (:mod:`curation_platform.uid_registry`).

When the parquet (or json) says a sample was not downloaded but the tar holds its members, the tar
wins: its bytes are what webdataset and DataComp's resharder read, and they pass every check here.
The disagreement is counted in the shard report's ``warnings``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.layout import ShardOutputs
from curation_platform.pool import ShardRef
from curation_platform.processes import worker_context
from curation_platform.reasons import Reason
from curation_platform.shard_reader import TarReadSummary, TarSample, UnsafeEntry, iter_tar_samples
from curation_platform.storage import S3Settings
from curation_platform.uid_registry import MemoryUidRegistry, UidRegistry, claim
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
    warnings: list[str] = field(default_factory=list)
    displaced: dict[str, int] = field(default_factory=dict)  # later shard -> this shard's uids it kept
    tar_sha256: str | None = None  # with files: the ShardRef ingested, for read_shard_ref
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> uri, size, mtime_ns, etag

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


TarProgress = Callable[[int], None]  # bytes of the shard's tar read so far, after each of its samples


class _CountingStream:
    """A read stream that counts what was read (pyarrow's input streams cannot ``tell()``)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.bytes_read = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        return data


def make_executor(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for image decoding (see :mod:`curation_platform.processes`)."""
    if workers <= 0:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=worker_context())


class ShardIngester:
    """Validates one shard: indexes its parquet, streams its tar, fans content checks out to
    ``executor`` in bounded batches (at most ``batches_in_flight`` of ``batch_size`` samples), and
    accounts for every sample either shard file mentions; ``on_tar_bytes`` hears how far the tar was read."""

    def __init__(self, shard: ShardRef, *, s3: S3Settings | None = None, limits: ValidationLimits = ValidationLimits(),
                 executor: Executor | None = None, batch_size: int = 64, batches_in_flight: int = 4,
                 registry: UidRegistry | None = None, on_tar_bytes: TarProgress | None = None) -> None:
        self.shard, self.s3, self.limits, self.executor, self.registry = shard, s3, limits, executor, registry
        self.on_tar_bytes = on_tar_bytes
        self.batch_size, self.batches_in_flight = batch_size, batches_in_flight
        self.rows = _Rows()
        self.errors: list[str] = []
        self.base = {"shard": shard.name, "shard_id": shard.shard_id}
        self.by_key: dict[str, dict[str, Any]] = {}
        self.seen_keys: set[str] = set()
        self.seen_uids: set[str] = set()
        self.batch: list[tuple[int, bytes | None, bytes | None]] = []
        self.pending: dict[int, dict[str, Any]] = {}
        self.in_flight: deque[Future] = deque()
        self.summary = TarReadSummary()
        self.tar_samples = self.ignored_members = self.status_disagreements = 0
        self.integer_keys = False  # schema drift: img2dataset writes string keys ("000000001")
        self.displaced: dict[str, int] = {}

    def run(self) -> ShardIngestion:
        started = time.perf_counter()
        parquet_rows, parquet_error = _read_parquet_rows(self.shard, self.s3)
        if parquet_error:
            self.errors.append(parquet_error)
        self._index_parquet(parquet_rows or [])
        if self.shard.tar is None:
            self.errors.append("shard has no tar file")
        else:
            self._read_tar(parquet_rows is not None, parquet_error)
        self._account_unmatched_parquet_rows()
        self._claim_uids()
        return self._result(parquet_rows, time.perf_counter() - started)

    def _reject(self, seq: int, uid: str, key: str, reason: Reason, detail: str, members: list[str]) -> None:
        self.rows.reject(seq, {**self.base, "uid": uid, "key": key}, reason, detail, members)

    def _index_parquet(self, parquet_rows: list[dict[str, Any]]) -> None:
        """Parquet rows by key; a keyless or repeated row is quarantined on its own."""
        for row in parquet_rows:
            key = "" if row.get("key") is None else str(row["key"])
            if key in self.by_key or not key:
                seq = self.rows.seq()
                reason, detail = ((Reason.MISSING_KEY, "parquet row with a null or empty key") if not key
                                  else (Reason.DUPLICATE_KEY, "key appears twice in the parquet"))
                self._reject(seq, derive_uid(self.shard.name, f"parquet-row:{seq}:{key}"), key, reason, detail, [])
                continue
            self.integer_keys = self.integer_keys or isinstance(row["key"], int)
            self.by_key[key] = row

    def _read_tar(self, has_parquet: bool, parquet_error: str | None) -> None:
        with storage.open_input(self.shard.tar.uri, self.s3) as raw:
            stream = _CountingStream(raw) if self.on_tar_bytes else raw
            for item in iter_tar_samples(stream, self.summary, self.limits):
                if self.on_tar_bytes:
                    self.on_tar_bytes(stream.bytes_read)
                seq = self.rows.seq()
                if isinstance(item, UnsafeEntry):
                    self._reject(seq, derive_uid(self.shard.name, f"member:{seq}:{item.name}"), item.name, item.reason,
                                 item.detail, [item.name])
                    continue
                self.tar_samples += 1
                self.ignored_members += item.ignored_members
                sample = _identify(item, seq, self.by_key, has_parquet, parquet_error, self.shard, self.seen_keys,
                                   self.seen_uids, self.integer_keys)
                if isinstance(sample, tuple):
                    reason, detail, uid = sample
                    self._reject(seq, uid, item.key, reason, detail, item.member_names)
                    continue
                self.status_disagreements += sample.pop("status_disagrees")
                self.pending[seq] = {**self.base, **sample}
                self.batch.append((seq, item.payloads.get("image"), item.payloads.get("txt")))
                if len(self.batch) >= self.batch_size:
                    self._flush(limit=self.batches_in_flight)
        self._flush(limit=0)
        summary = self.summary
        if summary.error:
            self.errors.append(f"tar unreadable past byte {summary.bytes_read}: {summary.error}")
        elif self.shard.tar_sha256 and summary.sha256 != self.shard.tar_sha256:
            self.errors.append("tar content changed since discovery (sha256 differs); re-discover the pool")

    def _flush(self, limit: int) -> None:
        """Hand the batch to the workers, then wait until at most ``limit`` batches are in flight."""
        if self.batch:
            if self.executor is None:
                self._collect(_content_batch(self.batch, self.limits))
            else:
                self.in_flight.append(self.executor.submit(_content_batch, self.batch, self.limits))
            self.batch = []
        while len(self.in_flight) > limit:
            self._collect(self.in_flight.popleft().result())

    def _collect(self, results: list[tuple[int, ContentOk | ContentRejected]]) -> None:
        for seq, result in results:
            sample = self.pending.pop(seq)
            if isinstance(result, ContentRejected):
                self.rows.reject(seq, sample, result.reason, result.detail, sample["members"])
                continue
            aspect = max(result.width, result.height) / min(result.width, result.height)
            accepted = {name: sample[name] for name in ("uid", "key", "shard", "shard_id", "url")}
            accepted |= {
                "original_width": sample["original_width"],
                "original_height": sample["original_height"],
                "image_member": sample["image_member"],
                "image_offset": sample["image_offset"],
                "aspect_ratio": aspect,
                "members": sample["members"],
                **asdict(result),
            }
            self.rows.accepted.append((seq, accepted))

    def _account_unmatched_parquet_rows(self) -> None:
        """Parquet rows whose key never appeared in the tar: not downloaded, or missing members."""
        tar_note = f"; tar error: {self.summary.error}" if self.summary.error else ""
        for key, row in self.by_key.items():
            if key in self.seen_keys:
                continue
            seq = self.rows.seq()
            uid = row.get("uid") if UID_PATTERN.match(str(row.get("uid") or "")) else derive_uid(self.shard.name, key)
            status = "success" if row.get("status") is None else row["status"]
            if not isinstance(status, str):
                self._reject(seq, uid, key, Reason.INVALID_METADATA,
                             f"status is {type(status).__name__}, expected a string", [])
            elif status != "success":
                detail = f"status {status!r}: {row.get('error_message') or 'no error message'}"
                self._reject(seq, uid, key, Reason.NOT_DOWNLOADED, detail, [])
            else:
                detail = "parquet says success but the tar has no members for this key" + tar_note
                self._reject(seq, uid, key, Reason.MISSING_MEMBER, detail, [])

    def _claim_uids(self) -> None:
        """Quarantine accepted copies of uids that an earlier-named shard keeps (see uid_registry)."""
        if self.registry is None:
            return
        decided = claim(self.registry, self.shard.name, [row["uid"] for _, row in self.rows.accepted])
        self.displaced = decided.displaced
        kept = []
        for seq, row in self.rows.accepted:
            owner = decided.owners.get(row["uid"])
            if owner is None:
                kept.append((seq, row))
            else:
                self.rows.reject(seq, row, Reason.CROSS_SHARD_DUPLICATE,
                                 f"uid {row['uid']} is also in shard {owner}, which keeps it (its name sorts first)",
                                 row["members"])
        self.rows.accepted = kept

    def _warnings(self) -> list[str]:
        warnings = []
        if self.status_disagreements:
            warnings.append(f"{self.status_disagreements} samples have members in the tar although their parquet/json "
                            "status is not 'success': the tar wins (they were checked like any other sample)")
        if self.displaced:
            shards = ", ".join(f"{name} ({count})" for name, count in self.displaced.items())
            warnings.append(f"shards that sort later kept copies of this shard's uids: {shards}; re-ingest them")
        return warnings

    def _result(self, parquet_rows: list[dict[str, Any]] | None, seconds: float) -> ShardIngestion:
        accepted = self.rows.table("accepted", ACCEPTED_SCHEMA)
        quarantine = self.rows.table("quarantine", QUARANTINE_SCHEMA)
        report = ShardReport(
            shard=self.shard.name,
            shard_id=self.shard.shard_id,
            checksum=self.shard.checksum,
            total=accepted.num_rows + quarantine.num_rows,
            accepted=accepted.num_rows,
            quarantined=quarantine.num_rows,
            by_reason=dict(sorted(Counter(quarantine.column("reason").to_pylist()).items())),
            parquet_rows=len(parquet_rows) if parquet_rows is not None else None,
            tar_samples=self.tar_samples,
            ignored_members=self.ignored_members,
            tar_directories=self.summary.directories,
            errors=self.errors,
            bytes_read=self.summary.bytes_read,
            seconds=round(seconds, 3),
            warnings=self._warnings(),
            displaced=self.displaced,
            tar_sha256=self.shard.tar_sha256,
            files=self.shard.records(),
        )
        return ShardIngestion(report=report, accepted=accepted, quarantine=quarantine)


def ingest_shard(shard: ShardRef, *, s3: S3Settings | None = None, limits: ValidationLimits = ValidationLimits(),
                 executor: Executor | None = None, batch_size: int = 64, batches_in_flight: int = 4,
                 registry: UidRegistry | None = None, on_tar_bytes: TarProgress | None = None) -> ShardIngestion:
    """Validate one shard (see :class:`ShardIngester`); ``executor`` (:func:`make_executor`) parallelises
    decoding; with a ``registry`` a uid another shard keeps is quarantined as ``cross_shard_duplicate``."""
    return ShardIngester(shard, s3=s3, limits=limits, executor=executor, batch_size=batch_size,
                         batches_in_flight=batches_in_flight, registry=registry, on_tar_bytes=on_tar_bytes).run()


def _identify(
    item: TarSample,
    seq: int,
    by_key: dict[str, dict[str, Any]],
    has_parquet: bool,
    parquet_error: str | None,
    shard: ShardRef,
    seen_keys: set[str],
    seen_uids: set[str],
    integer_keys: bool = False,
) -> dict[str, Any] | tuple[Reason, str, str]:
    """Resolve key, parquet row and uid of a tar sample, or say why it is quarantined.

    A quarantined repeat gets a uid derived from its stream position ``seq``, unique in the shard.
    """
    fallback_uid = derive_uid(shard.name, item.key)
    repeat_uid = derive_uid(shard.name, f"dup:{seq}:{item.key}")
    if item.key in seen_keys:
        return Reason.DUPLICATE_KEY, "key appeared earlier in the tar", repeat_uid
    seen_keys.add(item.key)
    row = by_key.get(item.key)
    if item.problem:
        reason, detail = item.problem
        return reason, detail, _row_uid(row) or fallback_uid
    if parquet_error:
        return Reason.MISSING_PARQUET_ROW, parquet_error, fallback_uid
    if has_parquet and row is None:
        note = " (the parquet's keys are integers: a key with leading zeros cannot match)" if integer_keys else ""
        return Reason.MISSING_PARQUET_ROW, "no parquet row for this key" + note, fallback_uid

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
        return Reason.DUPLICATE_UID, f"uid {uid} already used in this shard", repeat_uid
    seen_uids.add(uid)

    source = row or meta
    problem = _metadata_problem(source)
    if problem:
        return Reason.INVALID_METADATA, problem, uid
    status = source.get("status")
    return {
        "uid": uid,
        "key": item.key,
        "status_disagrees": status is not None and status != "success",
        "url": source.get("url"),
        "original_width": _int_or_none(source.get("original_width")),
        "original_height": _int_or_none(source.get("original_height")),
        "image_member": f"{item.key}.{item.image_ext}" if item.image_ext else "",
        "image_offset": item.offsets.get("image", -1),
        "members": item.member_names,
    }


_INT32_MAX = 2**31 - 1


def _metadata_problem(source: dict[str, Any]) -> str | None:
    """Why the img2dataset fields ingestion reads (url, status, original size) cannot be used, or None.

    Schema drift (an int url, a json object, a width of 1e400 or beyond int32) becomes this sample's
    quarantine reason instead of an Arrow error that would stop the shard and the pool's ingest.
    """
    for name in ("url", "status"):
        value = source.get(name)
        if value is not None and not isinstance(value, str):
            return f"{name} is {type(value).__name__}, expected a string"
    for name in ("original_width", "original_height"):
        value = source.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value != int(value) or not 0 <= value <= _INT32_MAX:
            return f"{name} is {value!r:.40}, expected a pixel count in [0, {_INT32_MAX}]"
    return None


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
    registry: UidRegistry | None = None,
    on_tar_bytes: TarProgress | None = None,
) -> Iterator[ShardIngestion]:
    """Ingest shards in name order, sharing one pool of decode workers and one uid registry (by default
    one for this run only); ``on_tar_bytes`` hears, within each shard, how far its tar was read.

    A shard that fails unexpectedly yields an empty ingestion whose report names the error, so the
    pool's other shards are still ingested and the failed one is still accounted for.
    """
    registry = registry if registry is not None else MemoryUidRegistry()
    executor = make_executor(workers)
    try:
        for shard in sorted(shards, key=lambda ref: ref.name):
            try:
                yield ingest_shard(shard, s3=s3, limits=limits, executor=executor, registry=registry,
                                   on_tar_bytes=on_tar_bytes)
            except Exception as error:  # noqa: BLE001 - one shard's failure must not stop the pool
                yield failed_ingestion(shard, error)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def failed_ingestion(shard: ShardRef, error: Exception) -> ShardIngestion:
    """An ingestion that accepted nothing because of ``error``: its report is a shard-level error."""
    report = ShardReport(shard=shard.name, shard_id=shard.shard_id, checksum=shard.checksum, total=0, accepted=0,
                         quarantined=0, by_reason={}, parquet_rows=None, tar_samples=0, ignored_members=0,
                         tar_directories=0, errors=[f"ingestion failed: {type(error).__name__}: {error}"],
                         bytes_read=0, seconds=0.0, tar_sha256=shard.tar_sha256, files=shard.records())
    return ShardIngestion(report, ACCEPTED_SCHEMA.empty_table(), QUARANTINE_SCHEMA.empty_table())


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_shard_ref(out_uri: str, shard_name: str, s3: S3Settings | None = None) -> ShardRef | None:
    """The shard as its ingestion's report recorded it, so later steps neither list the pool nor hash the
    shard's files again; None for a report written before reports recorded files."""
    path = ShardOutputs.of(out_uri, shard_name).report
    if not storage.exists(path, s3):
        raise FileNotFoundError(f"shard {shard_name} has not been ingested into {out_uri}")
    report = json.loads(storage.read_bytes(path, s3))
    if not report.get("files"):
        return None
    return ShardRef.recorded(report["shard"], report["checksum"], report["tar_sha256"], report["files"])


def read_accepted(out_uri: str, shard: ShardRef, s3: S3Settings | None = None) -> pa.Table:
    """The accepted samples ingestion wrote for ``shard``; refuses outputs of another shard version."""
    path = ShardOutputs.of(out_uri, shard.name).samples
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
    outputs = ShardOutputs.of(out_uri, ingestion.report.shard)
    storage.write_bytes_atomic(outputs.samples, _parquet_bytes(ingestion.accepted), s3)
    storage.write_bytes_atomic(outputs.quarantine, _parquet_bytes(ingestion.quarantine), s3)
    report = json.dumps(ingestion.report.to_dict(), indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(outputs.report, report, s3)
    return outputs.files()


def read_captions(out_uri: str, s3: S3Settings | None = None, uid_below: str | None = None) -> pa.Table:
    """uid and caption of every accepted sample under ``out_uri`` (or of those with ``uid < uid_below``)."""
    filesystem, local = storage.filesystem_for(ShardOutputs.samples_root(out_uri), s3)
    condition = None if uid_below is None else ds.field("uid") < uid_below
    return ds.dataset(local, filesystem=filesystem, format="parquet").to_table(columns=["uid", "caption"],
                                                                             filter=condition)
