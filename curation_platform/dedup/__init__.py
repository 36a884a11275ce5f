"""Duplicate detection over the validated pool.

:mod:`curation_platform.dedup.exact` finds exact duplicates (same image bytes, same normalised
caption) pool-wide and across shards, with an incremental, per-shard parquet index.
"""

from curation_platform.dedup.exact import (
    DUPLICATE_KINDS,
    INDEX_SCHEMA,
    ExactDuplicateIndex,
    caption_key,
    index_rows,
    normalise_caption,
)

__all__ = ["DUPLICATE_KINDS", "INDEX_SCHEMA", "ExactDuplicateIndex", "caption_key", "index_rows",
           "normalise_caption"]
