"""Scoring the pool: global artefacts (reference sample, NormSim target) and per-shard score rows.

Every shard is scored against the same versioned artefacts, stored in LanceDB:

* ``reference_sets``: ``N`` (image, text) pairs drawn uniformly from the whole pool's embeddings of
  one teacher. The draw keeps the ``N`` uids with the smallest seeded 64-bit hash, streaming over
  the table once with O(N) memory: uniform without replacement, independent of shard order, and
  identical for the same seed, size and pool.
* ``target_sets``: image embeddings of a target image set (NormSim's downstream-task images).
* ``scores``: one row per accepted sample per teacher with every score of SCORES.md, the log
  importance weight of each domain prompt, and the definition version and parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from curation_platform import lance_tables
from curation_platform.embedding.sinks import vectors
from curation_platform.scoring import scores
from curation_platform.storage import S3Settings

SCORE_VERSION = "1"
REFERENCE_TABLE = "reference_sets"
TARGET_TABLE = "target_sets"
SCORES_TABLE = "scores"
SCORE_COLUMNS = (
    "clip_score", "neg_clip_loss", "log_ratio_t_given_i", "log_ratio_i_given_t", "kl_image", "kl_text",
    "klr_image", "klr_text", "whitened_kl", "norm_sim_2", "norm_sim_inf",
)


@dataclass(frozen=True)
class ScoreParams:
    """Everything besides the teacher and artefacts that a score value depends on."""

    reference_size: int = 25_000
    reference_seed: int = 0
    neg_clip_batch_size: int = 32_768
    neg_clip_repeats: int = 10
    neg_clip_seed: int = 0
    importance_scale: float = 10.0
    prompts: tuple[str, ...] = ()
    chunk: int = 1024


def prompt_column(prompt: str) -> str:
    """``"a photo of flowers"`` -> ``iw_a_photo_of_flowers`` (log importance weight column)."""
    return "iw_" + re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48]


# -- artefacts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbeddingSet:
    """A versioned set of embeddings (a reference sample or a target set)."""

    set_id: str
    teacher_id: str
    uids: list[str]
    image: np.ndarray
    text: np.ndarray | None = None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.uids)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash of uint64 values (vectorised)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uid_keys(uids: list[str], seed: int) -> np.ndarray:
    digests = [hashlib.blake2b(uid.encode(), digest_size=8).digest() for uid in uids]
    values = np.frombuffer(b"".join(digests), dtype=np.uint64) if digests else np.zeros(0, np.uint64)
    return _mix64(values ^ _mix64(np.array([seed], dtype=np.uint64))[0])


def draw_reference(batches: Iterator[pa.RecordBatch], teacher_id: str, size: int, seed: int) -> EmbeddingSet:
    """Keep the ``size`` pairs with the smallest seeded uid hash over the whole pool (O(size) memory)."""
    kept: pa.Table | None = None
    kept_keys = np.zeros(0, dtype=np.uint64)
    pool_rows = 0
    for batch in batches:
        pool_rows += batch.num_rows
        keys = np.concatenate([kept_keys, _uid_keys(batch.column("uid").to_pylist(), seed)])
        candidates = pa.Table.from_batches([batch]) if kept is None else pa.concat_tables(
            [kept, pa.Table.from_batches([batch]).select(kept.column_names)])
        if len(keys) > size:
            order = np.argpartition(keys, size - 1)[:size]
            candidates, keys = candidates.take(pa.array(order)), keys[order]
        kept, kept_keys = candidates, keys
    if kept is None or kept.num_rows == 0:
        raise ValueError(f"no embeddings of teacher {teacher_id} to draw a reference from")
    kept = kept.sort_by("uid")  # canonical order: how load_set returns it too
    uids = kept.column("uid").to_pylist()
    set_id = "ref-" + hashlib.sha256(json.dumps([teacher_id, seed, size, uids]).encode()).hexdigest()[:16]
    return EmbeddingSet(set_id, teacher_id, uids, vectors(kept, "image_embedding"), vectors(kept, "text_embedding"),
                        {"seed": seed, "requested_size": size, "pool_rows": pool_rows})


def target_set(embeddings: pa.Table, teacher_id: str, source: str) -> EmbeddingSet:
    """A NormSim target from embedded target images; its id hashes the teacher and the uids."""
    uids = embeddings.column("uid").to_pylist()
    set_id = "target-" + hashlib.sha256(json.dumps([teacher_id, sorted(uids)]).encode()).hexdigest()[:16]
    return EmbeddingSet(set_id, teacher_id, uids, vectors(embeddings, "image_embedding"), None, {"source": source})


def _set_schema(dim: int, with_text: bool) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim)
    fields = [
        pa.field("row_key", pa.string(), nullable=False), pa.field("set_id", pa.string(), nullable=False),
        pa.field("teacher_id", pa.string(), nullable=False), pa.field("uid", pa.string(), nullable=False),
        pa.field("image_embedding", vector, nullable=False), pa.field("description", pa.string()),
    ]
    return pa.schema(fields + ([pa.field("text_embedding", vector, nullable=False)] if with_text else []))


def save_set(lance_uri: str, table: str, embedding_set: EmbeddingSet, s3: S3Settings | None = None) -> int:
    """Store a set (replacing rows of the same id); returns the LanceDB table version."""
    dim = embedding_set.image.shape[1]
    text = embedding_set.text
    schema = _set_schema(dim, text is not None)
    n = embedding_set.size
    columns = {
        "row_key": [f"{embedding_set.set_id}/{uid}" for uid in embedding_set.uids],
        "set_id": [embedding_set.set_id] * n,
        "teacher_id": [embedding_set.teacher_id] * n,
        "uid": embedding_set.uids,
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding_set.image.ravel()), dim),
        "description": [json.dumps(embedding_set.description, sort_keys=True)] * n,
    }
    if text is not None:
        columns["text_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), dim)
    data = pa.table(columns).cast(schema)
    database = lance_tables.connect(lance_uri, s3)
    return lance_tables.replace_partition(
        lambda: lance_tables.open_or_create(database, table, schema, ["row_key"]), ["row_key"],
        f"set_id = {lance_tables.sql_string(embedding_set.set_id)}",
        lambda: pa.RecordBatchReader.from_batches(schema, data.to_batches()), update_only_where=None,
    )


def load_set(lance_uri: str, table: str, set_id: str, s3: S3Settings | None = None) -> EmbeddingSet:
    rows = (lance_tables.connect(lance_uri, s3).open_table(table).to_lance()
            .to_table(filter=f"set_id = {lance_tables.sql_string(set_id)}").sort_by("uid"))
    if rows.num_rows == 0:
        raise KeyError(f"no {table} rows for {set_id}")
    has_text = "text_embedding" in rows.column_names
    return EmbeddingSet(set_id, rows.column("teacher_id")[0].as_py(), rows.column("uid").to_pylist(),
                        vectors(rows, "image_embedding"), vectors(rows, "text_embedding") if has_text else None,
                        json.loads(rows.column("description")[0].as_py() or "{}"))


# -- per-shard scores ---------------------------------------------------------------------------

@dataclass
class ScoringContext:
    """What every shard is scored against: built once per run, shared by all shards."""

    teacher_id: str
    logit_scale: float
    params: ScoreParams
    reference: EmbeddingSet
    target: EmbeddingSet | None = None
    prompt_embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference.text is None:
            raise ValueError("the reference set needs text embeddings")
        self.whitening = scores.WhiteningStats.fit(self.reference.image, self.reference.text, self.params.chunk)
        self.target_stats = scores.TargetStats.fit(self.target.image, self.params.chunk) if self.target else None

    def describe(self) -> dict[str, Any]:
        return {
            "score_version": SCORE_VERSION,
            "teacher_id": self.teacher_id,
            "logit_scale": self.logit_scale,
            "reference_id": self.reference.set_id,
            "reference_size": self.reference.size,
            "target_id": self.target.set_id if self.target else None,
            "target_size": self.target.size if self.target else None,
            "params": asdict(self.params),
            "neg_clip_batch_size_effective": min(self.params.neg_clip_batch_size, self.reference.size + 1),
        }


def score_rows(embeddings: pa.Table, context: ScoringContext) -> pa.Table:
    """All score columns for one shard's embedding rows (uid, shard, image/text embeddings)."""
    if embeddings.num_rows == 0:  # a shard whose samples were all quarantined
        return score_schema(list(context.prompt_embeddings)).empty_table()
    image, text = vectors(embeddings, "image_embedding"), vectors(embeddings, "text_embedding")
    a, chunk, params, ref = context.logit_scale, context.params.chunk, context.params, context.reference
    nan = np.full(len(image), np.nan)
    columns: dict[str, Any] = {"clip_score": scores.clip_score(image, text)}
    # One pass over the reference per direction gives D_KL, D_KLR, the log ratio (scores.LogitStats)
    # and, when every negCLIPLoss batch holds the whole reference, negCLIPLoss too.
    image_vs_text = scores.logit_stats(image, ref.text, a, chunk)
    text_vs_image = scores.logit_stats(text, ref.image, a, chunk)
    clip = torch.from_numpy(np.asarray(columns["clip_score"]))
    diagonal = clip * a
    if params.neg_clip_batch_size - 1 >= ref.size:
        columns["neg_clip_loss"] = scores.neg_clip_loss_from_stats(
            clip, image_vs_text.logsumexp, text_vs_image.logsumexp, a).numpy()
    else:
        columns["neg_clip_loss"] = scores.neg_clip_loss(
            image, text, a, batch_size=params.neg_clip_batch_size, repeats=params.neg_clip_repeats,
            seed=params.neg_clip_seed, reference=(ref.image, ref.text), chunk=chunk)
    columns |= {
        "log_ratio_t_given_i": image_vs_text.log_ratio(diagonal).numpy(),
        "log_ratio_i_given_t": text_vs_image.log_ratio(diagonal).numpy(),
        "kl_image": image_vs_text.kl().numpy(),
        "kl_text": text_vs_image.kl().numpy(),
        "klr_image": image_vs_text.kl_reverse().numpy(),
        "klr_text": text_vs_image.kl_reverse().numpy(),
        "whitened_kl": scores.whitened_kl(image, context.whitening, a, chunk),
        "norm_sim_2": scores.norm_sim_2(image, context.target_stats) if context.target_stats else nan,
        "norm_sim_inf": scores.norm_sim_inf(image, context.target.image, chunk) if context.target else nan,
    }
    for prompt, embedding in context.prompt_embeddings.items():
        columns[prompt_column(prompt)] = np.log(scores.importance_weights(image, embedding, params.importance_scale))
    n = embeddings.num_rows
    uids = embeddings.column("uid").to_pylist()
    meta = json.dumps(context.describe(), sort_keys=True)
    table = {
        "row_key": [f"{context.teacher_id}/{uid}" for uid in uids],
        "uid": uids,
        "shard": embeddings.column("shard"),
        "teacher_id": [context.teacher_id] * n,
        **{name: pa.array(np.asarray(values, dtype=np.float64)) for name, values in columns.items()},
        "score_version": [SCORE_VERSION] * n,
        "reference_id": [context.reference.set_id] * n,
        "target_id": [context.target.set_id if context.target else None] * n,
        "score_params": [meta] * n,
    }
    return pa.table(table).cast(score_schema(list(context.prompt_embeddings)))


def score_filter(teacher_id: str, shard: str | None = None, uid_below: str | None = None) -> str:
    """The SQL filter on the scores table: the teacher's rows, optionally of one shard and below a uid bound."""
    condition = (lance_tables.partition_condition(shard, teacher_id) if shard
                 else f"teacher_id = {lance_tables.sql_string(teacher_id)}")
    return condition if uid_below is None else f"{condition} AND uid < {lance_tables.sql_string(uid_below)}"


def uid_sample_bound(rows: int, max_rows: int) -> str | None:
    """An upper bound on uids that keeps about ``max_rows`` of ``rows`` (None: keep every row).

    uids are 128-bit hashes (DataComp's, and this platform's), so ``uid < bound`` is a uniform,
    seed-free sample that the scores table and the sample parquet files both filter on pushdown,
    and that picks the same samples on every run.
    """
    if rows <= max_rows:
        return None
    return f"{int(max_rows / rows * 16**8):08x}"


def score_schema(prompts: list[str]) -> pa.Schema:
    fields = [pa.field("row_key", pa.string(), nullable=False), pa.field("uid", pa.string(), nullable=False),
              pa.field("shard", pa.string(), nullable=False), pa.field("teacher_id", pa.string(), nullable=False)]
    fields += [pa.field(name, pa.float64()) for name in SCORE_COLUMNS]
    fields += [pa.field(prompt_column(prompt), pa.float64()) for prompt in prompts]
    fields += [pa.field("score_version", pa.string(), nullable=False), pa.field("reference_id", pa.string()),
               pa.field("target_id", pa.string()), pa.field("score_params", pa.string())]
    return pa.schema(fields)


def write_scores(lance_uri: str, rows: pa.Table, shard: str, teacher_id: str, prompts: list[str],
                 s3: S3Settings | None = None) -> int:
    """Replace the shard's score rows for the teacher (idempotent, like the embeddings)."""
    schema = score_schema(prompts)
    database = lance_tables.connect(lance_uri, s3)

    def open_table() -> Any:
        table = lance_tables.open_or_create(database, SCORES_TABLE, schema, ["row_key"])
        missing = [name for name in schema.names if name not in table.schema.names]
        if missing:
            raise ValueError(f"the {SCORES_TABLE} table lacks columns {missing}: score into a new LanceDB database "
                             "or table when the prompts change")
        return table

    return lance_tables.replace_partition(
        open_table, ["row_key"], lance_tables.partition_condition(shard, teacher_id),
        lambda: pa.RecordBatchReader.from_batches(schema, rows.select(schema.names).cast(schema).to_batches()),
    )
