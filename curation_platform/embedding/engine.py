"""The embedding engine: accepted samples of a shard -> unit-norm teacher embeddings in a sink.

One code path for CPU and CUDA. DataLoader workers decode, resize and tokenize chunks of
consecutive samples (see :mod:`curation_platform.embedding.loader`); the main process gathers
chunks into large batches, copies them to the device from pinned memory without blocking,
normalises pixels on the device, runs both towers (fp16/bf16 autocast on CUDA) and streams the
L2-normalised float32 embeddings to the sink, which commits the shard atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch

from curation_platform.embedding.loader import ChunkDataset, ImagePreprocessor, PixelNormaliser, plan_chunks
from curation_platform.embedding.sinks import CommitInfo, EmbeddingSink, record_batch
from curation_platform.pool import ShardRef
from curation_platform.processes import worker_context
from curation_platform.storage import S3Settings
from curation_platform.teachers import Teacher


@dataclass(frozen=True)
class EmbedConfig:
    """Device and throughput knobs; none of them changes an embedding beyond float rounding."""

    device: str = "auto"
    batch_size: int = 256
    chunk_size: int = 32
    workers: int = 2
    prefetch_factor: int = 4
    precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU; or fp32 / fp16 / bf16

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        precision = self.precision
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True)
class EmbedReport:
    shard: str
    teacher_id: str
    rows: int
    seconds: float
    device: str
    commit: CommitInfo | None = None

    @property
    def pairs_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def embed_shards(
    teacher: Teacher,
    jobs: list[tuple[ShardRef, pa.Table]],
    sink: EmbeddingSink,
    config: EmbedConfig = EmbedConfig(),
    s3: S3Settings | None = None,
    on_shard: Callable[[EmbedReport], None] | None = None,
) -> list[EmbedReport]:
    """Embed each shard's accepted samples (ingestion's table) and commit shard by shard.

    One DataLoader serves all shards, so worker start-up is paid once; a shard is committed as
    soon as its last chunk is encoded, and a failure leaves later shards untouched.
    """
    for shard, samples in jobs:
        _check_validated_from(shard, samples)
    device = config.resolved_device()
    teacher.to(device)
    chunks = [chunk for job, (shard, samples) in enumerate(jobs)
              for chunk in plan_chunks(job, shard.tar.uri, samples, config.chunk_size)]
    loader = torch.utils.data.DataLoader(
        ChunkDataset(chunks, ImagePreprocessor(teacher.preprocessing), teacher.tokenizer, s3),
        batch_size=None,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=config.prefetch_factor if config.workers else None,
        multiprocessing_context=worker_context() if config.workers else None,
    )
    encoder = _BatchEncoder(teacher, device, config.autocast_dtype(device))
    batches = iter(loader)
    reports = []
    lookahead = next(batches, None)
    for job, (shard, samples) in enumerate(jobs):
        started = time.perf_counter()
        with sink.shard_writer(shard.name, teacher.teacher_id, teacher.embed_dim) as writer:
            pending: list[dict] = []
            pending_rows = 0
            while lookahead is not None and lookahead["job"] == job:
                pending.append(encoder.stage(lookahead))
                pending_rows += len(lookahead["uids"])
                if pending_rows >= config.batch_size:
                    writer.write(encoder(pending, shard.name))
                    pending, pending_rows = [], 0
                lookahead = next(batches, None)
            if pending:
                writer.write(encoder(pending, shard.name))
        reports.append(EmbedReport(shard=shard.name, teacher_id=teacher.teacher_id, rows=samples.num_rows,
                                   seconds=time.perf_counter() - started, device=str(device),
                                   commit=sink.last_commit))
        if on_shard:
            on_shard(reports[-1])
    return reports


def embed_shard(teacher: Teacher, shard: ShardRef, samples: pa.Table, sink: EmbeddingSink,
                config: EmbedConfig = EmbedConfig(), s3: S3Settings | None = None) -> EmbedReport:
    """Embed one shard (see :func:`embed_shards`)."""
    return embed_shards(teacher, [(shard, samples)], sink, config, s3)[0]


def _check_validated_from(shard: ShardRef, samples: pa.Table) -> None:
    if shard.tar is None:
        raise ValueError(f"shard {shard.name} has no tar")
    recorded = set(samples.column("shard_id").to_pylist()) if samples.num_rows else {shard.shard_id}
    if recorded != {shard.shard_id}:
        raise ValueError(f"samples were validated from {sorted(recorded)}, the shard is now {shard.shard_id}: "
                         "re-ingest it before embedding")


class _BatchEncoder:
    """Chunks -> one device batch -> a RecordBatch of normalised embeddings.

    On CUDA each chunk is copied to the device as soon as it arrives, from pinned memory on a side
    stream, so host-to-device copies overlap the previous batch's compute; on CPU staging is a no-op.
    """

    def __init__(self, teacher: Teacher, device: torch.device, autocast: torch.dtype | None) -> None:
        self.teacher = teacher
        self.device = device
        self.autocast = autocast
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.normalise = PixelNormaliser(teacher.preprocessing, device)
        self.dim = teacher.embed_dim

    def stage(self, chunk: dict) -> dict:
        if self.copy_stream is None:
            return chunk
        with torch.cuda.stream(self.copy_stream):
            return {**chunk, "pixels": chunk["pixels"].to(self.device, non_blocking=True),
                    "tokens": chunk["tokens"].to(self.device, non_blocking=True)}

    def __call__(self, chunks: list[dict], shard: str) -> pa.RecordBatch:
        uids = [uid for chunk in chunks for uid in chunk["uids"]]
        if self.copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            for chunk in chunks:  # the caching allocator must not recycle these before compute is done
                chunk["pixels"].record_stream(compute)
                chunk["tokens"].record_stream(compute)
        pixels = torch.cat([chunk["pixels"] for chunk in chunks])
        tokens = torch.cat([chunk["tokens"] for chunk in chunks])
        pixels = self.normalise(pixels)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            images = self.teacher.encode_images(pixels)
            texts = self.teacher.encode_texts(tokens)
        return record_batch(uids, self.teacher.teacher_id, shard, images.cpu().numpy(), texts.cpu().numpy())
