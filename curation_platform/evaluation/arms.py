"""The arms of an evaluation: the release, a seeded random subset of the pool of the same size, the whole pool.

Every arm trains at the same scale (the same samples seen), so the comparison is at equal compute;
the random arm is also at equal size. Each seed of the random arm draws its own subset (seeded by
the seed), so its spread includes the luck of the draw, as a user re-drawing a baseline would see.
A training set is identified by the sha256 of its sorted uids (and weights), so equal sets share
their exported shards and their runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow.dataset as ds

from curation_platform import storage
from curation_platform.layout import ShardOutputs
from curation_platform.storage import S3Settings

ARMS = ("release", "random", "pool")
BASELINES = ("random", "pool")
TRAINING_COLUMNS = ("uid", "shard", "key")


@dataclass(frozen=True)
class TrainingSet:
    """What one arm trains on for one seed."""

    arm: str
    seed: int
    samples: pl.DataFrame  # uid, shard, key (+ weight when weighted)
    weighted: bool

    @property
    def size(self) -> int:
        return self.samples.height

    @property
    def set_sha256(self) -> str:
        columns = ["uid", "weight"] if self.weighted else ["uid"]
        rows = self.samples.select(columns).sort("uid")
        lines = [f"{uid}\t{weight!r}" for uid, weight in rows.iter_rows()] if self.weighted else rows["uid"].to_list()
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def pool_samples(validated_uri: str, shards: list[str], s3: S3Settings | None = None) -> pl.DataFrame:
    """uid, shard and key of every accepted sample of ``shards`` (the pool a release was selected from)."""
    filesystem, local = storage.filesystem_for(ShardOutputs.samples_root(validated_uri), s3)
    table = ds.dataset(local, filesystem=filesystem, format="parquet").to_table(
        columns=list(TRAINING_COLUMNS), filter=ds.field("shard").isin(shards))
    return pl.from_arrow(table).sort("uid")


def random_subset(pool: pl.DataFrame, size: int, seed: int) -> pl.DataFrame:
    """A uniform draw without replacement of ``size`` pool rows: the same pool, size and seed give the same
    rows on any machine (numpy's PCG64 over the uid-sorted pool)."""
    if not 0 < size <= pool.height:
        raise ValueError(f"a random baseline of {size} samples needs a pool of at least that many (has {pool.height})")
    ordered = pool.sort("uid")
    rows = np.random.default_rng([seed, size, pool.height]).choice(pool.height, size=size, replace=False)
    return ordered[np.sort(rows)]


def training_sets(release: pl.DataFrame, pool: pl.DataFrame, seeds: list[int], *, weighted: bool,
                  baselines: tuple[str, ...] = BASELINES) -> list[TrainingSet]:
    """Every (arm, seed) of an evaluation; ``release`` has uid, shard, key and (when ``weighted``) weight."""
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"baselines are {BASELINES}, got {sorted(unknown)}")
    columns = [*TRAINING_COLUMNS, "weight"] if weighted else list(TRAINING_COLUMNS)
    release = release.select(columns)
    sets = [TrainingSet("release", seed, release, weighted) for seed in seeds]
    if "random" in baselines:
        sets += [TrainingSet("random", seed, random_subset(pool, release.height, seed), False) for seed in seeds]
    if "pool" in baselines:
        sets += [TrainingSet("pool", seed, pool.select(TRAINING_COLUMNS), False) for seed in seeds]
    return sets
