"""Data-quality facts about one shard's embeddings: what the asset checks and tests assert."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from curation_platform.embedding.sinks import vectors


@dataclass(frozen=True)
class EmbeddingQuality:
    rows: int
    expected: int
    missing: int
    unexpected: int
    duplicates: int
    non_finite: int
    max_norm_error: float
    dim: int

    @property
    def passed(self) -> bool:
        """One finite unit-norm row per accepted sample, nothing else."""
        return (self.rows == self.expected and not (self.missing or self.unexpected or self.duplicates)
                and self.non_finite == 0 and self.max_norm_error < 1e-3)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def embedding_quality(rows: pa.Table, accepted_uids: list[str], dim: int) -> EmbeddingQuality:
    """Compare a shard's stored embeddings (uid, image_embedding, text_embedding) with its accepted uids."""
    uids = rows.column("uid").to_pylist()
    stored, expected = set(uids), set(accepted_uids)
    non_finite, norm_error = 0, 0.0
    for column in ("image_embedding", "text_embedding"):
        size = rows.schema.field(column).type.list_size
        if size != dim:
            raise ValueError(f"{column} has dimension {size}, expected {dim}")
        values = vectors(rows, column).astype(np.float64)
        finite = np.isfinite(values).all(axis=1)
        non_finite += int((~finite).sum())
        if finite.any():
            norm_error = max(norm_error, float(np.abs(np.linalg.norm(values[finite], axis=1) - 1).max()))
    return EmbeddingQuality(
        rows=len(uids),
        expected=len(expected),
        missing=len(expected - stored),
        unexpected=len(stored - expected),
        duplicates=len(uids) - len(stored),
        non_finite=non_finite,
        max_norm_error=norm_error,
        dim=dim,
    )
