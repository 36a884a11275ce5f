"""Evaluation-set contamination: pool samples whose image nearly copies an evaluation image.

Same definition as the pool's near duplicates (cosine of the teacher's image embeddings >= ``1 -
eps``). An evaluation set is registered by name and location, in any of the layouts users have:

* img2dataset / webdataset shards (the demo's ``eval`` split), validated and embedded like a target;
* a clip_benchmark ``wds`` dataset root (``<root>/test/*.tar`` holding ``<key>.webp|jpg|png``);
* a folder of image files.

The sets are embedded once by the teacher (:func:`embed_evaluation_set`, stored like the NormSim
target) and every shard is compared against all of them in bounded blocks
(:func:`copies_in_shard`); evaluation sets are small, so this is an exact search.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curation_platform.dedup.near import DEFAULT_EPS, FLOAT_TOLERANCE, unit_rows
from curation_platform.embedding.engine import EmbedConfig
from curation_platform.scoring.pipeline import EmbeddingSet
from curation_platform.scoring.run import IMAGE_SUFFIXES, embed_image_bytes, embed_target
from curation_platform.storage import S3Settings
from curation_platform.teachers import Teacher

EVALUATION_TABLE = "evaluation_sets"
COPIES_SCHEMA = {"uid": pl.String, "eval_set": pl.String, "eval_uid": pl.String, "similarity": pl.Float64}
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # an evaluation image larger than this is skipped, not read


@dataclass(frozen=True)
class EvaluationSet:
    """A registered evaluation set: ``name`` flags contaminated samples, ``uri`` says where its images are."""

    name: str
    uri: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"an evaluation set name is a non-empty string without '/', got {self.name!r}")


def _wds_images(root: Path) -> Iterator[tuple[str, bytes]]:
    """Image members of a clip_benchmark wds root's test split, by ``<tar>/<key>``; streamed, bounded."""
    for path in sorted((root / "test").glob("*.tar")):
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                suffix = Path(member.name).suffix.lower()
                if not member.isfile() or suffix not in IMAGE_SUFFIXES or member.size > MAX_MEMBER_BYTES:
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    yield f"{path.stem}/{Path(member.name).stem}", handle.read()


def _is_wds_root(uri: str) -> bool:
    root = Path(uri)
    return root.is_dir() and any((root / "test").glob("*.tar")) and not any(root.glob("*.parquet"))


def embed_evaluation_set(teacher: Teacher, evaluation: EvaluationSet, config: EmbedConfig | None = None,
                         s3: S3Settings | None = None) -> EmbeddingSet:
    """The teacher's image embeddings of one evaluation set; its id hashes the name, teacher and uids."""
    config = config or EmbedConfig()
    if _is_wds_root(evaluation.uri):
        uids, image, undecodable = embed_image_bytes(teacher, _wds_images(Path(evaluation.uri)), config.batch_size)
        if not uids:
            raise FileNotFoundError(f"evaluation set {evaluation.name!r}: no decodable images in {evaluation.uri}")
        description = {"undecodable": undecodable}
    else:
        embedded = embed_target(teacher, evaluation.uri, config, s3)
        uids, image, description = embedded.uids, embedded.image, dict(embedded.description)
    digest = hashlib.sha256(json.dumps([evaluation.name, teacher.teacher_id, sorted(uids)]).encode()).hexdigest()
    description.update(name=evaluation.name, source=evaluation.uri)
    return EmbeddingSet(f"eval-{evaluation.name}-{digest[:16]}", teacher.teacher_id, list(uids),
                        np.asarray(image, np.float32), None, description)


def copies_in_shard(uids: Sequence[str], images: np.ndarray, sets: Sequence[EmbeddingSet],
                    eps: float = DEFAULT_EPS, chunk_rows: int = 4096) -> pl.DataFrame:
    """Every (shard sample, evaluation image) pair with cosine >= ``1 - eps``, as ``(uid, eval_set,
    eval_uid, similarity)`` sorted by (uid, eval_set, eval_uid); blocks of ``chunk_rows`` x ``chunk_rows``
    float32 pick candidates, a float64 dot decides each (so the answer does not depend on the block)."""
    if not 0 <= eps < 2:
        raise ValueError(f"eps must be in [0, 2), got {eps}")
    threshold = 1.0 - eps - FLOAT_TOLERANCE
    pool = unit_rows(images) if len(uids) else np.zeros((0, 1), np.float32)
    found: list[tuple[str, str, str, float]] = []
    for evaluation in sets:
        name = evaluation.description.get("name", evaluation.set_id)
        targets = unit_rows(evaluation.image)
        for start in range(0, len(uids), chunk_rows):
            block = pool[start:start + chunk_rows]
            for other in range(0, len(targets), chunk_rows):
                sims = block @ targets[other:other + chunk_rows].T
                rows, columns = np.nonzero(sims >= threshold - 1e-4)
                exact = np.einsum("ij,ij->i", block[rows].astype(np.float64),
                                  targets[other + columns].astype(np.float64))
                for row, column, value in zip(rows.tolist(), columns.tolist(), exact.tolist()):
                    if value >= threshold:
                        found.append((uids[start + row], name, evaluation.uids[other + column], min(value, 1.0)))
    return pl.DataFrame(found, schema=COPIES_SCHEMA, orient="row").sort("uid", "eval_set", "eval_uid")
