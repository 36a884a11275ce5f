"""Scoring the pool: global artefacts (reference sample, NormSim target) and per-shard score rows.

Every shard is scored against the same versioned artefacts, stored in LanceDB:

* ``reference_sets``: ``N`` (image, text) pairs drawn uniformly from the whole pool's embeddings of
  one teacher. The draw keeps the ``N`` uids with the smallest seeded 64-bit hash, streaming over
  the table once with O(N) memory: uniform without replacement, independent of shard order, and
  identical for the same seed, size and pool.
* ``target_sets``: image embeddings of a target image set (NormSim's downstream-task images).
* ``scores``: one row per accepted sample per teacher with every score of SCORES.md, the log
  importance weight of each domain prompt, and the definition version and parameters.

A domain prompt's column ``iw_<prompt>`` is not part of a row's score identity (``score_params``):
its provenance (prompt text, teacher, a_w, the prompt embedding and its sha256) is recorded once
per teacher in the column's field metadata (:class:`PromptColumn`), so a prompt can be added to a
scored pool (:func:`fill_prompt_columns`, one cheap dot product per sample) without rescoring or
changing any other column, and every later shard is scored with the recorded embedding.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
import re
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from curation_platform import lance_tables
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
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
# ScoreParams fields that only prompt columns depend on: recorded per column, not in a row's score_params
PER_PROMPT_PARAMS = ("prompts", "importance_scale")
PROMPT_METADATA_PREFIX = "curation:prompt:"  # + teacher_id: the field metadata key of a prompt column's provenance
PROMPT_EMBEDDING_TOLERANCE = 1e-3  # most 1 - cosine between a recorded prompt embedding and a fresh encoding


@dataclass(frozen=True)
class ScoreParams:
    """Everything besides the teacher and artefacts that a score value depends on.

    ``prompts`` and ``importance_scale`` concern the prompt columns only: they are recorded with each
    column (:class:`PromptColumn`), not in the rows' ``score_params`` (:data:`PER_PROMPT_PARAMS`).
    """

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


class PromptColumnError(ValueError):
    """A prompt that cannot go into its column: another prompt's column, another a_w or another embedding."""


@dataclass(frozen=True)
class PromptColumn:
    """One domain prompt's log importance weight column for one teacher (SCORES.md s. 6), and its provenance.

    The provenance lives in the scores table's schema: the column's field metadata under
    ``curation:prompt:<teacher_id>`` holds the prompt text, a_w, the prompt embedding and its sha256,
    so a table version pins it. The recorded embedding is the one every later shard is scored with
    (:func:`prepare_prompt_columns`), so a column's values never depend on which device or run
    encoded the prompt.
    """

    prompt: str
    teacher_id: str
    importance_scale: float
    embedding: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        vector = np.array(self.embedding, dtype=np.float32).reshape(-1)  # a writable copy (torch reads it)
        object.__setattr__(self, "embedding", vector)

    @property
    def column(self) -> str:
        return prompt_column(self.prompt)

    @property
    def metadata_key(self) -> str:
        return PROMPT_METADATA_PREFIX + self.teacher_id

    @property
    def embedding_sha256(self) -> str:
        return hashlib.sha256(self.embedding.astype("<f4").tobytes()).hexdigest()

    def values(self, image: np.ndarray) -> np.ndarray:
        """``ln w(i) = a_w s(u_i, v*)`` of L2-normalised image embeddings, float64; row by row, so a row's
        value does not depend on the other rows it is computed with."""
        weights = scores.importance_weights(image, self.embedding, self.importance_scale)
        return np.asarray(np.log(weights), dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "column": self.column, "teacher_id": self.teacher_id,
                "importance_scale": self.importance_scale, "embedding_dim": int(self.embedding.size),
                "embedding_sha256": self.embedding_sha256, "score_version": SCORE_VERSION}

    def metadata_value(self) -> str:
        embedding = base64.b64encode(self.embedding.astype("<f4").tobytes()).decode()
        return json.dumps({**self.describe(), "embedding": embedding}, sort_keys=True)

    def arrow_field(self) -> pa.Field:
        return pa.field(self.column, pa.float64(), metadata={self.metadata_key: self.metadata_value()})

    @classmethod
    def from_metadata(cls, value: bytes | str) -> PromptColumn:
        data = json.loads(value)
        embedding = np.frombuffer(base64.b64decode(data["embedding"]), dtype="<f4")
        column = cls(data["prompt"], data["teacher_id"], float(data["importance_scale"]), embedding)
        if column.embedding_sha256 != data["embedding_sha256"]:
            raise PromptColumnError(f"the recorded embedding of column {column.column} does not match its sha256")
        return column


def prompt_columns_of(schema: pa.Schema, teacher_id: str) -> dict[str, PromptColumn]:
    """The teacher's recorded prompt columns in a scores table schema, by column name, in schema order."""
    key = (PROMPT_METADATA_PREFIX + teacher_id).encode()
    return {item.name: PromptColumn.from_metadata(item.metadata[key]) for item in schema
            if item.metadata and key in item.metadata}


def pin_prompt_columns(requested: Sequence[PromptColumn], recorded: Mapping[str, PromptColumn]) -> list[PromptColumn]:
    """The requested columns (deduplicated), each replaced by its recorded twin where the table has one.

    The twin must hold the same prompt with the same a_w, encoded (within float tolerance) the same;
    anything else is a :class:`PromptColumnError`, as are two prompts sharing one column name.
    """
    pinned: dict[str, PromptColumn] = {}
    for column in requested:
        name = column.column
        if name in pinned:
            if pinned[name].prompt != column.prompt:
                raise PromptColumnError(f"prompts {pinned[name].prompt!r} and {column.prompt!r} share column {name}: "
                                        "reword one")
            continue
        twin = recorded.get(name)
        if twin is None:
            pinned[name] = column
            continue
        if twin.prompt != column.prompt:
            raise PromptColumnError(f"column {name} holds prompt {twin.prompt!r}, not {column.prompt!r}: reword one")
        if twin.importance_scale != column.importance_scale:
            raise PromptColumnError(f"column {name} of teacher {twin.teacher_id} holds weights with a_w = "
                                    f"{twin.importance_scale}, not {column.importance_scale}: keep that scale or drop "
                                    "the column")
        same_shape = twin.embedding.shape == column.embedding.shape
        cosine = float(np.dot(twin.embedding.astype(np.float64), column.embedding)) if same_shape else float("nan")
        if not 1 - cosine <= PROMPT_EMBEDDING_TOLERANCE:
            raise PromptColumnError(f"teacher {twin.teacher_id} encodes {column.prompt!r} unlike the embedding recorded "
                                    f"for column {name} (cosine {cosine:.6f})")
        pinned[name] = twin
    return list(pinned.values())


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
    prompt_scales: dict[str, float] = field(default_factory=dict)  # a_w of a prompt, where not params'

    def __post_init__(self) -> None:
        if self.reference.text is None:
            raise ValueError("the reference set needs text embeddings")
        self.whitening = scores.WhiteningStats.fit(self.reference.image, self.reference.text, self.params.chunk)
        self.target_stats = scores.TargetStats.fit(self.target.image, self.params.chunk) if self.target else None

    def prompt_columns(self) -> list[PromptColumn]:
        """The prompt columns this context scores (each prompt's a_w: ``prompt_scales``, else the params')."""
        return [PromptColumn(prompt, self.teacher_id, self.prompt_scales.get(prompt, self.params.importance_scale),
                             embedding) for prompt, embedding in self.prompt_embeddings.items()]

    def with_prompt_columns(self, columns: Sequence[PromptColumn]) -> ScoringContext:
        """This context scoring exactly these prompt columns (the fitted statistics are shared, not refitted)."""
        other = copy.copy(self)
        other.prompt_embeddings = {column.prompt: column.embedding for column in columns}
        other.prompt_scales = {column.prompt: column.importance_scale for column in columns}
        return other

    def describe_prompts(self) -> dict[str, dict[str, Any]]:
        """Each prompt column's provenance (what :func:`prompt_columns_of` reads back, less the embedding)."""
        return {column.column: column.describe() for column in self.prompt_columns()}

    def describe(self) -> dict[str, Any]:
        """The score identity every row carries (``score_params``); prompt columns have their own."""
        return {
            "score_version": SCORE_VERSION,
            "teacher_id": self.teacher_id,
            "logit_scale": self.logit_scale,
            "reference_id": self.reference.set_id,
            "reference_size": self.reference.size,
            "target_id": self.target.set_id if self.target else None,
            "target_size": self.target.size if self.target else None,
            "params": {name: value for name, value in asdict(self.params).items() if name not in PER_PROMPT_PARAMS},
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
    prompts = context.prompt_columns()
    if len({column.column for column in prompts}) < len(prompts):
        raise PromptColumnError(f"two prompts share a column: {[column.prompt for column in prompts]}")
    for column in prompts:
        columns[column.column] = column.values(image)
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


def score_schema(prompts: Sequence[str | PromptColumn]) -> pa.Schema:
    """The score rows' schema; a :class:`PromptColumn` (not a bare prompt) carries its provenance metadata."""
    fields = [pa.field("row_key", pa.string(), nullable=False), pa.field("uid", pa.string(), nullable=False),
              pa.field("shard", pa.string(), nullable=False), pa.field("teacher_id", pa.string(), nullable=False)]
    fields += [pa.field(name, pa.float64()) for name in SCORE_COLUMNS]
    fields += [prompt.arrow_field() if isinstance(prompt, PromptColumn) else pa.field(prompt_column(prompt), pa.float64())
               for prompt in prompts]
    fields += [pa.field("score_version", pa.string(), nullable=False), pa.field("reference_id", pa.string()),
               pa.field("target_id", pa.string()), pa.field("score_params", pa.string())]
    return pa.schema(fields)


def write_scores(lance_uri: str, rows: pa.Table, shard: str, teacher_id: str, prompts: Sequence[PromptColumn],
                 s3: S3Settings | None = None) -> int:
    """Replace the shard's score rows for the teacher (idempotent, like the embeddings).

    ``prompts`` are the prompt columns ``rows`` hold (:meth:`ScoringContext.prompt_columns`). A column
    the table lacks is added first (:func:`prepare_prompt_columns`); the table's other columns (other
    prompts, other teachers' prompts) stay: a replaced row keeps its value there and a new row gets
    NULL (``run.score_shard`` scores every prompt recorded for the teacher, so its rows miss none).
    """
    columns = list(prompts)
    prepared = prepare_prompt_columns(lance_uri, teacher_id, columns, s3)
    drifted = [given.column for given, pinned in zip(columns, prepared.columns, strict=True)
               if given.embedding_sha256 != pinned.embedding_sha256]
    if drifted:
        raise PromptColumnError(f"the rows' {drifted} were computed with other prompt embeddings than the table records: "
                                "score through run.score_shard, which uses the recorded ones")
    schema = score_schema([column.prompt for column in columns])
    database = lance_tables.connect(lance_uri, s3)

    def open_table() -> Any:
        table = database.open_table(SCORES_TABLE)
        missing = [name for name in schema.names if name not in table.schema.names]
        if missing:
            raise ValueError(f"the {SCORES_TABLE} table lacks columns {missing} (dropped while scoring?)")
        return table

    return lance_tables.replace_partition(
        open_table, ["row_key"], lance_tables.partition_condition(shard, teacher_id),
        lambda: pa.RecordBatchReader.from_batches(schema, rows.select(schema.names).cast(schema).to_batches()),
    )


# -- prompt columns: schema evolution and per-shard fills ---------------------------------------

MAX_ATTEMPTS = 8


def _retry_later(error: Exception, attempt: int) -> None:
    """Re-raise unless ``error`` is a commit conflict (or a racing schema change) and attempts are left."""
    text = str(error).lower()
    retryable = any(word in text for word in ("conflict", "retryable", "concurrent", "precondition", "already exists"))
    if attempt == MAX_ATTEMPTS or not retryable or isinstance(error, PromptColumnError):
        raise error
    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))


@dataclass(frozen=True)
class PreparedPrompts:
    """Prompt columns the scores table has, pinned to their recorded provenance."""

    columns: list[PromptColumn]
    unrecorded: list[str]  # columns holding the teacher's values from before provenance was recorded


def prepare_prompt_columns(lance_uri: str, teacher_id: str, requested: Sequence[PromptColumn],
                           s3: S3Settings | None = None, with_recorded: bool = False) -> PreparedPrompts:
    """Give the scores table (created if absent) every requested column, with its provenance.

    A missing column is added with LanceDB schema evolution (``add_columns`` of a NULL double: a
    metadata-only commit) carrying the teacher's provenance in its field metadata; an existing column
    without the teacher's provenance gets it (``update_field_metadata``) unless it already holds values
    of the teacher (scored before provenance was recorded: reported in ``unrecorded`` and left so).
    The returned columns are the requested ones pinned to the recorded provenance
    (:func:`pin_prompt_columns`), followed with ``with_recorded`` by the teacher's other recorded columns.
    """
    for column in requested:
        if column.teacher_id != teacher_id:
            raise PromptColumnError(f"prompt column {column.column} is of teacher {column.teacher_id}, not {teacher_id}")
    database = lance_tables.connect(lance_uri, s3)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            table = lance_tables.open_or_create(database, SCORES_TABLE, score_schema(requested), ["row_key"])
            schema = table.schema
            recorded = prompt_columns_of(schema, teacher_id)
            pinned = pin_prompt_columns(requested, recorded)
            missing = [column for column in pinned if column.column not in schema.names]
            if missing:
                table.add_columns([column.arrow_field() for column in missing])
                continue  # read the schema again: its provenance, or a racing writer's
            unrecorded = [column for column in pinned if column.column not in recorded]
            with_values = [column.column for column in unrecorded if _holds_values(table, teacher_id, column.column)]
            to_record = [column for column in unrecorded if column.column not in with_values]
            if to_record:
                _record(table, to_record)
                continue
            others = [column for name, column in recorded.items() if with_recorded and name not in
                      {column.column for column in pinned}]
            return PreparedPrompts(pinned + others, with_values)
        except (OSError, RuntimeError, ValueError) as error:
            _retry_later(error, attempt)
    raise RuntimeError(f"the {SCORES_TABLE} table's prompt columns kept changing under {MAX_ATTEMPTS} attempts")


def _holds_values(table: Any, teacher_id: str, column: str) -> bool:
    """Whether the column holds a value of the teacher (the scan stops at the first one)."""
    condition = f"teacher_id = {lance_tables.sql_string(teacher_id)} AND {column} IS NOT NULL"
    return table.to_lance().scanner(columns=["row_key"], filter=condition, limit=1).to_table().num_rows > 0


def _record(table: Any, columns: Sequence[PromptColumn]) -> None:
    table.to_lance().update_field_metadata({column.column: {column.metadata_key: column.metadata_value()}
                                            for column in columns})


def record_prompt_provenance(lance_uri: str, columns: Sequence[PromptColumn], s3: S3Settings | None = None) -> None:
    """Record (or overwrite) the columns' provenance for their teacher: once every value was recomputed."""
    database = lance_tables.connect(lance_uri, s3)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            _record(database.open_table(SCORES_TABLE), columns)
            return
        except (OSError, RuntimeError, ValueError) as error:
            _retry_later(error, attempt)


def recorded_prompt_columns(lance_uri: str, teacher_id: str, s3: S3Settings | None = None) -> dict[str, PromptColumn]:
    """The teacher's recorded prompt columns (none when the scores table does not exist yet)."""
    database = lance_tables.connect(lance_uri, s3)
    if SCORES_TABLE not in database.list_tables().tables:
        return {}
    return prompt_columns_of(database.open_table(SCORES_TABLE).schema, teacher_id)


@dataclass(frozen=True)
class ShardPromptFill:
    """What :func:`fill_prompt_columns` did to one shard."""

    shard: str
    rows: int  # the shard's score rows of the teacher
    written: int  # rows whose prompt values were written (0: nothing to do)
    missing_embeddings: int  # score rows without a stored image embedding (left as they were)
    version: int | None  # the scores table version committed; None when nothing was written


def fill_prompt_columns(lance_uri: str, shard: str, columns: Sequence[PromptColumn], s3: S3Settings | None = None,
                        embeddings_table: str = EMBEDDINGS_TABLE, recompute: Collection[str] = ()) -> ShardPromptFill:
    """Write the prompt columns' values into the shard's existing score rows, and nothing else.

    The columns must exist (:func:`prepare_prompt_columns`). A cell is written when it is NULL or, for
    a ``recompute`` column, when it differs from the recomputed value: a second run writes nothing.
    Values are :meth:`PromptColumn.values` of the shard's stored image embeddings, the same bits that
    :func:`score_rows` gives. Each fragment holding rows to write gets one new data file with only the
    written columns (``LanceFragment.update_columns``, committed as one ``Update`` with
    ``rewrite_columns``): the other columns' files are not rewritten and no row moves.
    """
    import lance

    if not columns:
        raise ValueError("no prompt columns to fill")
    teacher_id = columns[0].teacher_id
    condition = lance_tables.partition_condition(shard, teacher_id)
    names = [column.column for column in columns]
    database = lance_tables.connect(lance_uri, s3)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        dataset = database.open_table(SCORES_TABLE).to_lance()
        current = dataset.to_table(columns=["row_key", "uid", *names], filter=condition, with_row_address=True)
        nulls = {name: current.column(name).is_null().to_numpy(zero_copy_only=False) for name in names}
        if not any(nulls[name].any() for name in names) and not set(recompute) & set(names):
            return ShardPromptFill(shard, current.num_rows, 0, 0, None)
        embeddings = database.open_table(embeddings_table).to_lance().to_table(
            columns=["uid", "image_embedding"], filter=condition)
        position = {uid: index for index, uid in enumerate(embeddings.column("uid").to_pylist())}
        where = np.array([position.get(uid, -1) for uid in current.column("uid").to_pylist()], dtype=np.int64)
        found = where >= 0
        image = vectors(embeddings, "image_embedding")[where[found]]
        new: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # column -> (values, still NULL)
        write = np.zeros(current.num_rows, dtype=bool)
        for column in columns:
            name = column.column
            values = current.column(name).fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
            computed = np.zeros(current.num_rows)
            computed[found] = column.values(image)
            differs = nulls[name] | (values.view(np.uint64) != computed.view(np.uint64))
            cells = found & differs & (nulls[name] | (name in recompute))
            if cells.any():
                values[cells] = computed[cells]
                new[name] = (values, nulls[name] & ~cells)
                write |= cells
        if not write.any():
            return ShardPromptFill(shard, current.num_rows, 0, int((~found).sum()), None)
        source_schema = pa.schema([pa.field("row_key", pa.string(), nullable=False),
                                   *(pa.field(name, pa.float64()) for name in new)])
        fragments = np.asarray(current.column("_rowaddr").to_numpy(zero_copy_only=False)) >> np.uint64(32)
        updated, modified = [], set()
        try:
            for fragment_id in np.unique(fragments[write]):
                rows = write & (fragments == fragment_id)
                source = pa.table([current.column("row_key").filter(pa.array(rows)),
                                   *(pa.array(values[rows], mask=null[rows]) for values, null in new.values())],
                                  schema=source_schema)
                metadata, fields = dataset.get_fragment(int(fragment_id)).update_columns(
                    source, left_on="row_key", right_on="row_key")
                updated.append(metadata)
                modified.update(fields)
            committed = lance.LanceDataset.commit(dataset, lance.LanceOperation.Update(
                updated_fragments=updated, fields_modified=sorted(modified), update_mode="rewrite_columns"),
                read_version=dataset.version)
            return ShardPromptFill(shard, current.num_rows, int(write.sum()), int((~found).sum()), committed.version)
        except (OSError, RuntimeError, ValueError) as error:  # another writer changed these fragments: again
            _retry_later(error, attempt)
    raise AssertionError("unreachable")
