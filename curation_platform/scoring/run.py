"""Score a whole pool: draw/load the artefacts once, then score and store shard after shard; add a
domain prompt's importance weight column to a scored pool without rescoring it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from curation_platform import lance_tables
from curation_platform.embedding.engine import EmbedConfig, embed_shards
from curation_platform.embedding.loader import ImagePreprocessor, PixelNormaliser
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, MemorySink
from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.scoring.pipeline import (
    REFERENCE_TABLE,
    SCORES_TABLE,
    TARGET_TABLE,
    EmbeddingSet,
    PromptColumn,
    ScoreParams,
    ScoringContext,
    ShardPromptFill,
    draw_reference,
    fill_prompt_columns,
    prepare_prompt_columns,
    record_prompt_provenance,
    save_set,
    score_filter,
    score_rows,
    target_set,
    write_scores,
)
from curation_platform.storage import S3Settings
from curation_platform.teachers import Teacher


@dataclass(frozen=True)
class ShardScores:
    shard: str
    rows: int
    version: int
    prompt_columns: tuple[str, ...] = ()  # the prompt columns scored (the context's and the table's recorded ones)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def embed_target(teacher: Teacher, target_uri: str, config: EmbedConfig = EmbedConfig(),
                 s3: S3Settings | None = None) -> EmbeddingSet:
    """Embed a NormSim target in memory: webdataset shards (validated first) or a local image folder."""
    shards = discover_shards(target_uri, s3=s3)
    if not shards and Path(target_uri).is_dir():
        return _embed_image_folder(teacher, Path(target_uri), config.batch_size)
    if not shards:
        raise FileNotFoundError(f"no shards or images at {target_uri}")
    sink = MemorySink()
    jobs = [(shard, ingest_shard(shard, s3=s3).accepted) for shard in shards]
    embed_shards(teacher, jobs, sink, config, s3)
    return target_set(sink.table(), teacher.teacher_id, target_uri)


def embed_image_bytes(teacher: Teacher, images: Iterable[tuple[str, bytes]], batch_size: int
                      ) -> tuple[list[str], np.ndarray, int]:
    """Embed ``(uid, encoded image)`` pairs in batches: ``(uids, [n, d] image embeddings, undecodable)``.

    A uid seen twice is embedded once (its first image); an image that does not decode is counted.
    """
    preprocess = ImagePreprocessor(teacher.preprocessing)
    normalise = PixelNormaliser(teacher.preprocessing)
    uids: list[str] = []
    vectors: list[np.ndarray] = []
    seen: set[str] = set()
    undecodable = 0
    pixels: list[np.ndarray] = []
    names: list[str] = []

    def flush() -> None:
        if pixels:
            batch = normalise(torch.from_numpy(np.stack(pixels)))
            vectors.append(teacher.encode_images(batch.to(teacher.device)).cpu().numpy())
            uids.extend(names)
            pixels.clear()
            names.clear()

    for uid, data in images:
        if uid in seen:
            continue
        seen.add(uid)
        try:
            pixels.append(preprocess(data))
        except Exception:  # an unreadable file in a user's set is counted, not fatal
            undecodable += 1
            continue
        names.append(uid)
        if len(pixels) == batch_size:
            flush()
    flush()
    dim = teacher.embed_dim
    return uids, np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32), undecodable


def _embed_image_folder(teacher: Teacher, folder: Path, batch_size: int) -> EmbeddingSet:
    """Every decodable image under ``folder`` (recursively); the uid is the sha256 of its bytes."""
    paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())

    def files() -> Iterator[tuple[str, bytes]]:
        for path in paths:
            data = path.read_bytes()
            yield hashlib.sha256(data).hexdigest()[:32], data  # identical files count once

    uids, image, _ = embed_image_bytes(teacher, files(), batch_size)
    if not uids:
        raise FileNotFoundError(f"no decodable images under {folder}")
    table = pa.table({"uid": uids, "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()),
                                                                                         image.shape[1])})
    result = target_set(table, teacher.teacher_id, str(folder))
    result.description.update(files=len(paths), embedded=len(uids))
    return result


def draw_pool_reference(teacher_id: str, lance_uri: str, size: int, seed: int, table: str = EMBEDDINGS_TABLE,
                        s3: S3Settings | None = None) -> EmbeddingSet:
    """Draw the marginal reference uniformly from every stored embedding of the teacher (one streaming pass)."""
    embeddings = lance_tables.connect(lance_uri, s3).open_table(table).to_lance()
    batches = embeddings.to_batches(columns=["uid", "image_embedding", "text_embedding"],
                                    filter=f"teacher_id = {lance_tables.sql_string(teacher_id)}")
    return draw_reference(iter(batches), teacher_id, size, seed)


def scoring_context(teacher: Teacher, params: ScoreParams, reference: EmbeddingSet,
                    target: EmbeddingSet | None = None) -> ScoringContext:
    """What every shard is scored against; refuses artefacts made with another teacher."""
    for artefact in (reference, target):
        if artefact is not None and artefact.teacher_id != teacher.teacher_id:
            raise ValueError(f"{artefact.set_id} was embedded by {artefact.teacher_id}, not by {teacher.teacher_id}: "
                             "draw the reference and embed the target again for this teacher")
    return ScoringContext(teacher.teacher_id, teacher.logit_scale, params, reference, target,
                          embed_prompts(teacher, params.prompts))


def embed_prompts(teacher: Teacher, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Each distinct prompt's text embedding, one prompt per forward pass: its bits do not depend on
    which other prompts are encoded with it."""
    encoded = {}
    for prompt in dict.fromkeys(prompts):
        encoded[prompt] = teacher.encode_texts(teacher.tokenize([prompt]).to(teacher.device)).cpu().numpy()[0]
    return encoded


def build_context(teacher: Teacher, lance_uri: str, params: ScoreParams, target: EmbeddingSet | None = None,
                  table: str = EMBEDDINGS_TABLE, s3: S3Settings | None = None) -> ScoringContext:
    """Draw the reference from the pool's stored embeddings, store the artefacts, embed the prompts."""
    reference = draw_pool_reference(teacher.teacher_id, lance_uri, params.reference_size, params.reference_seed,
                                    table, s3)
    save_set(lance_uri, REFERENCE_TABLE, reference, s3)
    if target is not None:
        save_set(lance_uri, TARGET_TABLE, target, s3)
    return scoring_context(teacher, params, reference, target)


def score_shard(context: ScoringContext, lance_uri: str, shard: str, table: str = EMBEDDINGS_TABLE,
                s3: S3Settings | None = None) -> ShardScores:
    """Score one stored shard of the context's teacher and replace its score rows.

    The prompt columns are the context's prompts and every prompt recorded for the teacher in the
    scores table (old prompts stay), each scored with its recorded embedding and a_w, so a shard
    scored after :func:`add_prompt_columns` gets the very values that added the column.
    """
    prepared = prepare_prompt_columns(lance_uri, context.teacher_id, context.prompt_columns(), s3, with_recorded=True)
    context = context.with_prompt_columns(prepared.columns)
    embeddings = lance_tables.connect(lance_uri, s3).open_table(table).to_lance()
    rows = embeddings.to_table(
        columns=["uid", "shard", "image_embedding", "text_embedding"],
        filter=f"{lance_tables.partition_condition(shard, context.teacher_id)}")
    scored = score_rows(rows, context)
    version = write_scores(lance_uri, scored, shard, context.teacher_id, context.prompt_columns(), s3)
    return ShardScores(shard, scored.num_rows, version, tuple(column.column for column in context.prompt_columns()))


def score_pool(context: ScoringContext, lance_uri: str, shards: list[str] | None = None,
               table: str = EMBEDDINGS_TABLE, s3: S3Settings | None = None,
               on_shard: Callable[[ShardScores], None] | None = None) -> list[ShardScores]:
    """Score every stored shard of the teacher (or the named ones) and replace their score rows."""
    if shards is None:
        embeddings = lance_tables.connect(lance_uri, s3).open_table(table).to_lance()
        names = embeddings.to_table(columns=["shard"],
                                    filter=f"teacher_id = {lance_tables.sql_string(context.teacher_id)}")
        shards = sorted(set(names.column("shard").to_pylist()))
    results = []
    for shard in shards:
        results.append(score_shard(context, lance_uri, shard, table, s3))
        if on_shard:
            on_shard(results[-1])
    return results


def scored_shards(lance_uri: str, teacher_id: str, s3: S3Settings | None = None) -> list[str]:
    """The shards with score rows of the teacher (one pass over the scores table's shard column)."""
    table = lance_tables.connect(lance_uri, s3).open_table(SCORES_TABLE).to_lance()
    names: set[str] = set()
    for batch in table.to_batches(columns=["shard"], filter=score_filter(teacher_id)):
        names.update(batch.column("shard").unique().to_pylist())
    return sorted(names)


def add_prompt_columns(lance_uri: str, teacher: Teacher, prompts: Sequence[str], s3: S3Settings | None = None,
                       shards: Sequence[str] | None = None, *, importance_scale: float = ScoreParams.importance_scale,
                       table: str = EMBEDDINGS_TABLE, on_shard: Callable[[ShardPromptFill], None] | None = None,
                       ) -> dict[str, Any]:
    """Add domain prompts' importance weight columns to an already scored pool, without rescoring it.

    Embeds each prompt with the teacher once, adds the missing ``iw_<prompt>`` columns to the scores
    table with their provenance (:func:`~curation_platform.scoring.pipeline.prepare_prompt_columns`),
    then, shard by shard (every scored shard of the teacher, or ``shards``), computes the column from
    the shard's stored image embeddings and writes only its cells
    (:func:`~curation_platform.scoring.pipeline.fill_prompt_columns`). No other column and no row
    changes; running it again writes nothing. A column holding the teacher's values from before
    provenance was recorded is recomputed everywhere and recorded once every shard was done.
    """
    if not prompts:
        raise ValueError("no prompts to add")
    database = lance_tables.connect(lance_uri, s3)
    if SCORES_TABLE not in database.list_tables().tables:
        raise FileNotFoundError(f"no {SCORES_TABLE} table in {lance_uri}: score the pool first")
    requested = [PromptColumn(prompt, teacher.teacher_id, importance_scale, vector)
                 for prompt, vector in embed_prompts(teacher, prompts).items()]
    prepared = prepare_prompt_columns(lance_uri, teacher.teacher_id, requested, s3)
    names = list(shards) if shards is not None else scored_shards(lance_uri, teacher.teacher_id, s3)
    results = []
    for shard in names:
        results.append(fill_prompt_columns(lance_uri, shard, prepared.columns, s3, table, prepared.unrecorded))
        if on_shard:
            on_shard(results[-1])
    unrecorded = prepared.unrecorded
    if unrecorded and shards is None:  # every shard recomputed: the values are now the recorded ones
        record_prompt_provenance(lance_uri, [column for column in prepared.columns if column.column in unrecorded], s3)
        unrecorded = []
    return {
        "teacher_id": teacher.teacher_id,
        "columns": {column.column: column.describe() for column in prepared.columns},
        "unrecorded": unrecorded,
        "shards": len(results),
        "shards_written": sum(result.version is not None for result in results),
        "rows_written": sum(result.written for result in results),
        "missing_embeddings": sum(result.missing_embeddings for result in results),
        "version": int(database.open_table(SCORES_TABLE).version),
    }


def read_scores(lance_uri: str, teacher_id: str, s3: S3Settings | None = None, columns: list[str] | None = None,
                shard: str | None = None, uid_below: str | None = None) -> pa.Table:
    """The teacher's score rows (optionally only some columns, one shard's, or a :func:`uid_sample_bound` sample)."""
    table = lance_tables.connect(lance_uri, s3).open_table(SCORES_TABLE).to_lance()
    return table.to_table(columns=columns, filter=score_filter(teacher_id, shard, uid_below))


def count_scores(lance_uri: str, teacher_id: str, s3: S3Settings | None = None) -> int:
    table = lance_tables.connect(lance_uri, s3).open_table(SCORES_TABLE).to_lance()
    return table.count_rows(filter=score_filter(teacher_id))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney)."""
    values = np.concatenate([positive, negative])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(average, counts)
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
