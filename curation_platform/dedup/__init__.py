"""Duplicate detection over the validated pool.

:mod:`curation_platform.dedup.exact` finds exact duplicates (same image bytes, same normalised
caption) pool-wide and across shards, with an incremental, per-shard parquet index;
:mod:`curation_platform.dedup.near` finds near duplicates (SemDeDup on teacher image embeddings).
"""

from curation_platform.dedup.exact import (
    DUPLICATE_KINDS,
    INDEX_SCHEMA,
    ExactDuplicateIndex,
    caption_key,
    index_rows,
    normalise_caption,
)
from curation_platform.dedup.near import DEFAULT_EPS, read_image_embeddings, semdedup

__all__ = ["DEFAULT_EPS", "DUPLICATE_KINDS", "INDEX_SCHEMA", "ExactDuplicateIndex", "caption_key", "index_rows",
           "normalise_caption", "read_image_embeddings", "semdedup"]
