"""Import DataComp's precomputed per-shard embeddings (``NNNNN.npz``) instead of recomputing.

DataComp ships float16 ``b32_img``/``b32_txt`` (OpenAI ViT-B/32) and ``l14_img``/``l14_txt``
(OpenAI ViT-L/14) arrays aligned with the shard's parquet rows. They are imported under a
declared ``teacher_id`` (the caller vouches for which model made them; the default ids below name
DataComp's), re-normalised in float32, for the shard's accepted samples only.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation_platform import storage
from curation_platform.embedding.sinks import CommitInfo, EmbeddingSink, record_batch
from curation_platform.pool import ShardRef
from curation_platform.storage import S3Settings

DATACOMP_TEACHERS = {"b32": "datacomp-openai-vit-b-32", "l14": "datacomp-openai-vit-l-14"}
_TEACHER_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{2,127}$")


def import_npz(
    shard: ShardRef,
    samples: pa.Table,
    sink: EmbeddingSink,
    model: str = "l14",
    teacher_id: str | None = None,
    s3: S3Settings | None = None,
    batch_rows: int = 4096,
) -> CommitInfo:
    """Write the shard's ``<model>_img``/``<model>_txt`` rows for its accepted samples to ``sink``."""
    teacher_id = teacher_id or DATACOMP_TEACHERS.get(model)
    if not teacher_id or not _TEACHER_ID.match(teacher_id):
        raise ValueError(f"declare a teacher_id of [a-z0-9_-] for npz model {model!r}")
    if shard.npz is None or shard.parquet is None:
        raise FileNotFoundError(f"shard {shard.name} has no .npz (or no .parquet to align it with)")
    with np.load(io.BytesIO(storage.read_bytes(shard.npz.uri, s3)), allow_pickle=False) as arrays:
        if f"{model}_img" not in arrays or f"{model}_txt" not in arrays:
            raise KeyError(f"{shard.npz.uri} has no {model}_img/{model}_txt arrays (has {sorted(arrays.files)})")
        images, texts = arrays[f"{model}_img"], arrays[f"{model}_txt"]
    filesystem, path = storage.filesystem_for(shard.parquet.uri, s3)
    keys = pq.read_table(path, filesystem=filesystem, columns=["key"]).column("key").to_pylist()
    if not len(keys) == len(images) == len(texts):
        raise ValueError(f"{shard.npz.uri}: {len(images)} / {len(texts)} embeddings for {len(keys)} parquet rows")
    row_of = {key: row for row, key in enumerate(keys)}
    accepted_keys = samples.column("key").to_pylist()
    missing = [key for key in accepted_keys if key not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} accepted samples have no npz row, e.g. key {missing[0]!r}")
    rows = np.array([row_of[key] for key in accepted_keys], dtype=np.int64)
    uids = samples.column("uid").to_pylist()
    dim = images.shape[1]
    with sink.shard_writer(shard.name, teacher_id, dim) as writer:
        for start in range(0, len(rows), batch_rows):
            index = rows[start : start + batch_rows]
            writer.write(record_batch(uids[start : start + batch_rows], teacher_id, shard.name,
                                      _normalise(images[index]), _normalise(texts[index])))
    assert sink.last_commit is not None
    return sink.last_commit


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise ValueError("npz embeddings hold non-finite or zero vectors")
    return vectors / norms
