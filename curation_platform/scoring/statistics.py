"""Pool-wide score statistics (SCORES.md s. 7): which rows are analysed, and the analysis written.

One function serves the CLI's ``score --analysis`` and the ``score_statistics`` asset, so both
draw the same uniform uid sample and write the same files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curation_platform import storage
from curation_platform.analysis import write_pool_analysis
from curation_platform.ingest import read_captions
from curation_platform.scoring.pipeline import SCORE_COLUMNS, uid_sample_bound
from curation_platform.scoring.run import count_scores, read_scores
from curation_platform.storage import S3Settings

STATISTICS_MAX_ROWS = 2_000_000  # larger pools are analysed on a uniform uid sample of this size


def summary_uri(out_uri: str) -> str:
    """Where :func:`analyse_pool` writes the per-score summary table under ``out_uri``."""
    return storage.join(out_uri, "summary.parquet")


@dataclass(frozen=True)
class PoolAnalysis:
    """What :func:`analyse_pool` wrote (file name -> URI) and on which rows."""

    pool_rows: int
    rows_analysed: int
    shards: int
    uid_below: str | None  # the uid bound of the sample; None: every row
    reference_ids: list[str]
    columns: list[str]  # scores with values (NormSim / importance columns are NaN without a target / prompt)
    summary: pl.DataFrame
    written: dict[str, str]
    plots: dict[str, bytes]  # PNG bytes by name, for embedding in metadata or reports

    def describe_sample(self, max_rows: int) -> str:
        if self.uid_below is None:
            return "every row"
        return f"uid < {self.uid_below!r} (uniform, at most {max_rows:,} rows)"


def analyse_pool(lance_uri: str, teacher_id: str, out_uri: str, *, validated_uri: str | None = None,
                 shards: Collection[str] | None = None, max_rows: int = STATISTICS_MAX_ROWS,
                 s3: S3Settings | None = None) -> PoolAnalysis:
    """Summary, histograms, correlations and (with ``validated_uri``'s captions) KL-decile n-gram
    coverage of the teacher's scores, as PNG + parquet under ``out_uri`` (local or s3://), on a uniform
    uid sample of at most ``max_rows`` rows; ``shards`` limits it to those shards."""
    pool_rows = count_scores(lance_uri, teacher_id, s3)
    uid_below = uid_sample_bound(pool_rows, max_rows)
    scores = pl.from_arrow(read_scores(lance_uri, teacher_id, s3, columns=["uid", "shard", "reference_id",
                                                                           *SCORE_COLUMNS], uid_below=uid_below))
    if shards is not None:
        scores = scores.filter(pl.col("shard").is_in(sorted(shards)))
    columns = [name for name in SCORE_COLUMNS if scores[name].is_not_nan().any()]
    captions = pl.from_arrow(read_captions(validated_uri, s3, uid_below)) if validated_uri else None
    with tempfile.TemporaryDirectory() as scratch:
        files = write_pool_analysis(scores, columns, scratch, captions)
        summary = pl.read_parquet(files["summary"])
        plots = {name: path.read_bytes() for name, path in files.items() if name.endswith("_png")}
        written = {}
        for name, path in files.items():
            written[name] = storage.join(out_uri, Path(path).name)
            storage.write_bytes_atomic(written[name], path.read_bytes(), s3)
    return PoolAnalysis(pool_rows=pool_rows, rows_analysed=scores.height, shards=scores["shard"].n_unique(),
                        uid_below=uid_below, reference_ids=sorted(scores["reference_id"].unique().to_list()),
                        columns=columns, summary=summary, written=written, plots=plots)
