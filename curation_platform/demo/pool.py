"""Build the demo pool: four disjoint splits of synthetic image-text shards plus their ground truth.

``out/pool`` is the raw pool with labelled defects, ``out/reference`` a clean split to train a
teacher CLIP on (aligned pairs; a share of its captions are true but under-specified, as web
alt-text is), ``out/target`` a clean split from the target domains only (NormSim's target),
``out/eval`` a class-balanced zero-shot evaluation split. Every split is a directory of
img2dataset shards. The pool's labelled defects are the ``CorruptionKind`` values (see
``corruptions``), among them a handful of ``eval_copy`` samples: near copies of ``eval`` images
(``DemoPoolConfig.eval_copy_rate``), so that decontamination against the eval split can be measured. ``out/ground_truth.parquet`` says what every row really is; the pipeline never
reads it, only tests and reports do. ``out/demo_pool.json`` records the config and the counts.

Shards are independent jobs (their samples depend only on their addresses), so they can be built
in parallel processes and the output is byte-identical for a seed whatever the worker count.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation_platform.demo.attributes import DOMAINS
from curation_platform.demo.corruptions import CORRUPTION_KINDS, CorruptionPlan, CorruptionRates
from curation_platform.demo.evaluation import EVAL_TASKS, eval_label
from curation_platform.demo.samples import (
    EVAL_DOMAIN_MIX,
    DomainMix,
    SampleAddress,
    Stream,
    generate_sample,
    stream_rng,
)
from curation_platform.formats.img2dataset import (
    Img2DatasetShardWriter,
    atomic_output,
    sample_key_digits,
    shard_name,
)
from curation_platform.layout import GROUND_TRUTH_FILE
from curation_platform.processes import worker_context

ProgressCallback = Callable[[str, int, int], None]

# The pool under-represents the target domains, so importance weighting has something to correct.
POOL_DOMAIN_MIX = DomainMix(DOMAINS, (0.2, 0.2, 0.3, 0.3))
MANIFEST_FILE = "demo_pool.json"
# Web alt-text, on which real CLIP teachers are trained, holds many true but under-specified
# captions ("a photo of a dog"); the reference split holds this share of them (see docs/scoring.md).
REFERENCE_UNDERSPECIFIED_SHARE = 0.15
# Share of the pool that are near copies of eval images (rounded up): 8 in the default 2000.
EVAL_COPY_RATE = 0.004
EVAL_LABELS_FILE = "eval_labels.parquet"
EVAL_CLASSES_FILE = "eval_classes.json"
# Stats timestamps are simulated (2023-11-14T22:13:20Z onwards) so output is byte-identical.
_SIMULATED_START_TIME = 1_700_000_000.0
_SIMULATED_SECONDS_PER_SAMPLE = 0.02

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("uid", pa.string()),
        ("domain", pa.string()),
        ("corruption", pa.string()),
        ("duplicate_group", pa.string()),
        ("language", pa.string()),
        ("attributes", pa.string()),
        ("corruption_detail", pa.string()),
    ]
)
EVAL_LABELS_SCHEMA = pa.schema(
    [("key", pa.string()), ("uid", pa.string()), ("task", pa.string()), ("label", pa.string())]
)


@dataclass(frozen=True)
class DemoPoolConfig:
    """What to generate. The defaults build in seconds; sizes scale to millions of samples."""

    out: Path
    shards: int = 4
    samples_per_shard: int = 500
    seed: int = 0
    reference_samples: int = 3000
    target_samples: int = 500
    eval_samples: int = 400
    workers: int = 1
    rates: CorruptionRates = field(default_factory=CorruptionRates)
    target_domains: tuple[str, ...] = ("shapes", "glyphs")
    # Share of reference captions replaced by true but under-specified ones (still clean pairs).
    reference_underspecified_share: float = REFERENCE_UNDERSPECIFIED_SHARE
    # Share of the pool turned into near copies of eval images (ceil(rate x pool samples), at most
    # eval_samples and the clean samples nothing borrows from); every other sample stays as it was.
    eval_copy_rate: float = EVAL_COPY_RATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "target_domains", tuple(self.target_domains))
        for name in ("shards", "samples_per_shard", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("seed", "reference_samples", "target_samples", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.reference_underspecified_share <= 1:
            raise ValueError(
                f"reference_underspecified_share must be in [0, 1], got {self.reference_underspecified_share}"
            )
        if not 0 <= self.eval_copy_rate <= 1:
            raise ValueError(f"eval_copy_rate must be in [0, 1], got {self.eval_copy_rate}")
        unknown = set(self.target_domains) - set(DOMAINS)
        if not self.target_domains or unknown:
            raise ValueError(f"target_domains must be a non-empty subset of {DOMAINS}, got {self.target_domains}")

    @property
    def pool_samples(self) -> int:
        return self.shards * self.samples_per_shard

    @property
    def eval_copies_wanted(self) -> int:
        """ceil(eval_copy_rate x pool samples), at most eval_samples (the plan may hold fewer)."""
        if self.eval_samples == 0 or self.eval_copy_rate == 0:
            return 0
        # round() first, so that float noise (0.07 x 100 = 7.000000000000001) does not add one.
        return min(math.ceil(round(self.eval_copy_rate * self.pool_samples, 9)), self.eval_samples)

    def to_dict(self) -> dict[str, Any]:
        """Everything that determines the output bytes (so not ``out`` nor ``workers``)."""
        return {
            "seed": self.seed,
            "shards": self.shards,
            "samples_per_shard": self.samples_per_shard,
            "reference_samples": self.reference_samples,
            "target_samples": self.target_samples,
            "eval_samples": self.eval_samples,
            "target_domains": list(self.target_domains),
            "reference_underspecified_share": self.reference_underspecified_share,
            "eval_copy_rate": self.eval_copy_rate,
            "rates": self.rates.to_dict(),
        }


@dataclass(frozen=True)
class SplitSummary:
    name: str
    directory: Path
    shards: int
    samples: int
    successes: int
    failed_to_download: int
    domains: dict[str, int]
    corruptions: dict[str, int]

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        directory = self.directory.relative_to(relative_to) if relative_to else self.directory
        return {
            "directory": str(directory),
            "shards": self.shards,
            "samples": self.samples,
            "successes": self.successes,
            "failed_to_download": self.failed_to_download,
            "domains": self.domains,
            "corruptions": self.corruptions,
        }


@dataclass(frozen=True)
class DemoPoolSummary:
    """Where everything was written and how many samples of each kind it holds."""

    out: Path
    config: DemoPoolConfig
    splits: dict[str, SplitSummary]
    ground_truth: Path
    manifest: Path
    eval_labels: Path
    eval_classes: Path

    def to_dict(self, relative: bool = False) -> dict[str, Any]:
        """JSON-ready; ``relative=True`` gives paths relative to ``out`` (as in the manifest)."""
        base = self.out if relative else None

        def path(value: Path) -> str:
            return str(value.relative_to(base)) if base else str(value)

        return {
            **({} if relative else {"out": str(self.out)}),
            "config": self.config.to_dict(),
            "splits": {name: split.to_dict(base) for name, split in self.splits.items()},
            "eval_tasks": {task: list(classes) for task, classes in EVAL_TASKS.items()},
            "files": {
                "ground_truth": path(self.ground_truth),
                "eval_labels": path(self.eval_labels),
                "eval_classes": path(self.eval_classes),
            },
        }


@dataclass(frozen=True)
class _SplitPlan:
    name: str
    samples: int
    mix: DomainMix
    corruptions: CorruptionPlan | None = None  # pool only
    labelled: bool = False  # eval only
    underspecified_share: float = 0.0  # reference only


@dataclass(frozen=True)
class _ShardJob:
    seed: int
    split: _SplitPlan
    directory: Path
    shard_index: int
    start: int
    stop: int
    key_digits: int


@dataclass(frozen=True)
class _ShardResult:
    samples: int
    successes: int
    domains: Counter[str]
    corruptions: Counter[str]
    ground_truth: pa.Table
    eval_labels: pa.Table


def build_demo_pool(config: DemoPoolConfig, progress: ProgressCallback | None = None) -> DemoPoolSummary:
    """Write the four splits, ground truth and manifest under ``config.out`` (empty or absent).

    ``progress(split, shards_done, shards_total)`` is called after every finished shard.
    """
    out = config.out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; the demo pool is only written into a fresh directory")
    splits = _plan_splits(config)
    key_digits = sample_key_digits(config.samples_per_shard)
    jobs = [job for split in splits for job in _shard_jobs(config, split, out / split.name, key_digits)]
    for split in splits:
        (out / split.name).mkdir(parents=True, exist_ok=True)

    totals: dict[str, Counter[str]] = {split.name: Counter() for split in splits}
    domains: dict[str, Counter[str]] = {split.name: Counter() for split in splits}
    corruptions: dict[str, Counter[str]] = {split.name: Counter() for split in splits}
    shards_total = Counter(job.split.name for job in jobs)
    ground_truth_path = out / GROUND_TRUTH_FILE
    eval_labels_path = out / EVAL_LABELS_FILE
    with (
        atomic_output(ground_truth_path) as ground_truth_temporary,
        atomic_output(eval_labels_path) as eval_labels_temporary,
        pq.ParquetWriter(ground_truth_temporary, GROUND_TRUTH_SCHEMA) as ground_truth,
        pq.ParquetWriter(eval_labels_temporary, EVAL_LABELS_SCHEMA) as eval_labels,
    ):
        for job, result in zip(jobs, _run(jobs, config.workers), strict=True):
            name = job.split.name
            ground_truth.write_table(result.ground_truth)
            if result.eval_labels.num_rows:
                eval_labels.write_table(result.eval_labels)
            totals[name].update(shards=1, samples=result.samples, successes=result.successes)
            domains[name].update(result.domains)
            corruptions[name].update(result.corruptions)
            if progress:
                progress(name, totals[name]["shards"], shards_total[name])

    eval_classes_path = out / EVAL_CLASSES_FILE
    with atomic_output(eval_classes_path) as temporary:
        temporary.write_text(json.dumps(EVAL_TASKS, indent=2) + "\n", encoding="utf-8")

    summary = DemoPoolSummary(
        out=out,
        config=config,
        splits={
            split.name: SplitSummary(
                name=split.name,
                directory=out / split.name,
                shards=totals[split.name]["shards"],
                samples=totals[split.name]["samples"],
                successes=totals[split.name]["successes"],
                failed_to_download=totals[split.name]["samples"] - totals[split.name]["successes"],
                domains={domain: domains[split.name][domain] for domain in DOMAINS},
                corruptions={kind.value: corruptions[split.name][kind.value] for kind in CORRUPTION_KINDS},
            )
            for split in splits
        },
        ground_truth=ground_truth_path,
        manifest=out / MANIFEST_FILE,
        eval_labels=eval_labels_path,
        eval_classes=eval_classes_path,
    )
    with atomic_output(summary.manifest) as temporary:
        temporary.write_text(json.dumps(summary.to_dict(relative=True), indent=2) + "\n", encoding="utf-8")
    return summary


def _plan_splits(config: DemoPoolConfig) -> list[_SplitPlan]:
    pool_plan = CorruptionPlan.assign(
        config.rates, config.pool_samples, stream_rng(config.seed, "pool", Stream.PLAN)
    )
    # After the rate-driven plan and from a stream of their own, so no other sample moves.
    pool_plan = pool_plan.with_eval_copies(
        config.eval_copies_wanted, config.eval_samples, stream_rng(config.seed, "pool", Stream.EVAL_COPIES)
    )
    return [
        _SplitPlan("pool", config.pool_samples, POOL_DOMAIN_MIX, corruptions=pool_plan),
        _SplitPlan("reference", config.reference_samples, DomainMix.uniform(DOMAINS),
                   underspecified_share=config.reference_underspecified_share),
        _SplitPlan("target", config.target_samples, DomainMix.uniform(config.target_domains)),
        _SplitPlan("eval", config.eval_samples, EVAL_DOMAIN_MIX, labelled=True),
    ]


def _shard_jobs(config: DemoPoolConfig, split: _SplitPlan, directory: Path, key_digits: int) -> Iterator[_ShardJob]:
    for shard_index in range(math.ceil(split.samples / config.samples_per_shard)):
        start = shard_index * config.samples_per_shard
        stop = min(start + config.samples_per_shard, split.samples)
        # Each job carries only its own window of the pool's corruption plan.
        corruptions = split.corruptions.window(start, stop) if split.corruptions else None
        shard_split = replace(split, corruptions=corruptions)
        yield _ShardJob(config.seed, shard_split, directory, shard_index, start, stop, key_digits)


def _run(jobs: Sequence[_ShardJob], workers: int) -> Iterator[_ShardResult]:
    """Results in job order, from this process or from ``workers`` spawned ones."""
    if workers == 1 or len(jobs) <= 1:
        yield from map(_write_shard, jobs)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=worker_context()) as executor:
        yield from executor.map(_write_shard, jobs)


def _simulated_clock(job: _ShardJob) -> Callable[[], float]:
    """A clock for the shard writer that reads the same start and end times on every run."""
    start = _SIMULATED_START_TIME + job.shard_index * 3600.0
    return iter((start, start + (job.stop - job.start) * _SIMULATED_SECONDS_PER_SAMPLE)).__next__


def _write_shard(job: _ShardJob) -> _ShardResult:
    split = job.split
    mix = split.mix
    ground_truth: dict[str, list[str | None]] = {name: [] for name in GROUND_TRUTH_SCHEMA.names}
    eval_labels: dict[str, list[str]] = {name: [] for name in EVAL_LABELS_SCHEMA.names}
    domains: Counter[str] = Counter()
    corruptions: Counter[str] = Counter()
    successes = 0
    with Img2DatasetShardWriter(job.directory, job.shard_index, job.key_digits, clock=_simulated_clock(job)) as writer:
        for index in range(job.start, job.stop):
            label = eval_label(index) if split.labelled else None
            sample = generate_sample(SampleAddress(job.seed, split.name, index), mix, split.corruptions, label,
                                     split.underspecified_share)
            if sample.image is None:
                key = writer.add_failure(
                    uid=sample.uid, url=sample.url, caption=sample.caption, error_message=sample.error_message or ""
                )
            else:
                key = writer.add_success(
                    uid=sample.uid,
                    url=sample.url,
                    caption=sample.caption,
                    image=sample.image.data,
                    image_format=sample.image.image_format,
                    width=sample.image.width,
                    height=sample.image.height,
                )
                successes += 1
            row = {
                "split": split.name,
                "shard": shard_name(job.shard_index),
                "key": key,
                "uid": sample.uid,
                "domain": sample.domain,
                "corruption": sample.corruption.value,
                "duplicate_group": sample.duplicate_group,
                "language": sample.language,
                "attributes": sample.attributes_json,
                "corruption_detail": sample.corruption_detail,
            }
            for name, column in ground_truth.items():
                column.append(row[name])
            if label:
                for name, value in (("key", key), ("uid", sample.uid), ("task", label.task), ("label", label.label)):
                    eval_labels[name].append(value)
            domains[sample.domain] += 1
            corruptions[sample.corruption.value] += 1
    return _ShardResult(
        samples=job.stop - job.start,
        successes=successes,
        domains=domains,
        corruptions=corruptions,
        ground_truth=pa.table(ground_truth, schema=GROUND_TRUTH_SCHEMA),
        eval_labels=pa.table(eval_labels, schema=EVAL_LABELS_SCHEMA),
    )
